# The two commands of the README: `make demo` runs kiban, `make test` runs every test.
.PHONY: demo test check lint bootstrap bench

bootstrap:
	./scripts/bootstrap.sh

demo:
	./scripts/demo.sh

lint: bootstrap
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .

test: lint
	.venv/bin/pytest

# The contributor's inner loop (under 3 minutes): lint, unit tests and the gateway tests
# that need no inference engine, no image and nothing slow.
check: lint
	.venv/bin/pytest -q -m "not engine and not image and not slow"

# Gateway overhead next to direct, LiteLLM and vllm-router (docs/benchmarks.md); a few minutes.
bench: bootstrap
	.venv/bin/python bench/gateways.py
