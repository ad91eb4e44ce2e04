# The two commands of the README: `make demo` runs kiban, `make test` runs every test.
.PHONY: demo test lint bootstrap

bootstrap:
	./scripts/bootstrap.sh

demo:
	./scripts/demo.sh

lint: bootstrap
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .

test: lint
	.venv/bin/pytest
