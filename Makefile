# The two commands of the README: `make demo` runs kiban, `make test` runs every test.
.PHONY: demo test lint bootstrap bench

bootstrap:
	./scripts/bootstrap.sh

demo:
	./scripts/demo.sh

lint: bootstrap
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .

test: lint
	.venv/bin/pytest

# Gateway overhead next to direct, LiteLLM and vllm-router (docs/benchmarks.md); a few minutes.
bench: bootstrap
	.venv/bin/python bench/gateways.py
