# `make run` trains the bundled example, `make test` runs the tests; both set up .venv first.
VENV := .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test bench crashtest clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	# the CPU build of torch first, pinned, so nothing pulls a CUDA build
	$(PYTHON) -m pip install --quiet torch==2.13.0
	$(PYTHON) -m pip install --quiet -e ".[test,wandb,mlflow,s3]"
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/noether-train

# the linters, then the tests: one worker per core; a test file's tests share a worker (and their module fixtures)
test: $(STAMP)
	$(PYTHON) -m ruff check src tests benchmarks
	$(PYTHON) -m ruff format --check src tests benchmarks
	$(PYTHON) -m pytest -q -n auto --dist loadfile

# a run stopped before each of its file operations in turn resumes exactly (make test samples a few)
crashtest: $(STAMP)
	NOETHER_CRASHTEST=all $(PYTHON) -m pytest -q -s tests/training/test_crash_points.py

bench: $(STAMP)
	$(PYTHON) benchmarks/run_all.py

clean:
	rm -rf $(VENV) outputs
