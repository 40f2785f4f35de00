# The two commands of the README: `make demo` and `make test`.
# Each creates .venv if it is missing and installs requirements.txt first.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
# Test worker processes (pytest-xdist): 2 by default, auto for one per core, 0 for none.
TEST_JOBS ?= 2
STAMP := $(VENV)/.installed

.PHONY: demo test bench clean-demo

$(STAMP): requirements.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet '$(TORCH)'
	$(BIN)/python -m pip install --quiet -r requirements.txt
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m retina.demo --out demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_JOBS) --dist worksteal tests

bench: $(STAMP)
	$(BIN)/python bench/bench_convert.py
	$(BIN)/python bench/bench_train.py

clean-demo:
	rm -rf demo
