# The commands the README names; each script installs what it needs.
.PHONY: demo test lint bench clean

demo:
	scripts/demo.sh

test:
	scripts/test.sh

lint:
	scripts/bootstrap.sh test
	.venv/bin/ruff check . && .venv/bin/ruff format --check . && scripts/typecheck.sh

bench:
	scripts/bootstrap.sh run
	.venv/bin/python benchmarks/bench_invoke.py

clean:
	rm -rf .venv .venv-tflite build *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis
