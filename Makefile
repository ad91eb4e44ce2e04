# The two commands of the README: `make demo` runs kiban, `make test` runs every test.
.PHONY: demo test check coverage lint bootstrap bench

bootstrap:
	./scripts/bootstrap.sh

demo:
	./scripts/demo.sh

lint: bootstrap
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/mypy
	.venv/bin/lint-imports  # the layers (pyproject [tool.importlinter], docs/architecture.md)

# The engine environments are built first, outside pytest: on a fresh machine they take minutes
# (llama.cpp compiles), longer than any one test may run.
test: lint
	.venv/bin/kiban envs build vllm-cpu llamacpp-cpu
	.venv/bin/pytest

# The contributor's inner loop (under 3 minutes): lint, unit tests and the gateway tests
# that need no inference engine, no image and nothing slow.
check: lint
	.venv/bin/pytest -q -m "not engine and not image and not slow"

# Line and branch coverage of src/kiban over the `make check` tests, as information (no gate):
# a terminal summary and htmlcov/index.html.
coverage: bootstrap
	.venv/bin/pytest -q -m "not engine and not image and not slow" --cov --cov-report=term --cov-report=html

# Gateway overhead next to direct, LiteLLM and vllm-router (docs/benchmarks.md); a few minutes.
bench: bootstrap
	.venv/bin/python bench/gateways.py
