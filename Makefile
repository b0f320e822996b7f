# Shortcuts for the commands in CONTRIBUTING.md. Threads stay at one per process, so the suite
# behaves the same on a shared machine as in CI.
PY ?= python
ENV := OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE

.PHONY: test lint format typecheck bench report

test:  ## the whole suite (CPU; GPU tests skip without CUDA)
	$(ENV) $(PY) -m pytest -q

lint:  ## what .ci/run checks before the tests
	ruff check .
	ruff format --check .
	$(ENV) mypy

format:  ## rewrite the tree in the house style
	ruff check --fix .
	ruff format .

typecheck:
	$(ENV) mypy

bench:  ## the micro-benchmarks (GPU rows skip on CPU); see benchmarks/README.md
	$(ENV) $(PY) -m pytest benchmarks/ --benchmark-only -q

report:  ## the static kernel report: compiles each Triton kernel (no GPU needed); see benchmarks/README.md
	$(PY) -m fastdae.kernel_report
