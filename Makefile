# The two commands of the README. Both create the virtual environment they need.
#   make demo   train the cpu preset for DEMO_STEPS on DEMO_THREADS threads (or reuse the run in RUN), then
#               write its HTML report
#   make test   run the test suite, on TEST_WORKERS processes (pytest-xdist; the tests that start Ray share one)
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
RUN ?= runs/cpu
DEMO_STEPS ?= 7000
DEMO_THREADS ?= 2
TEST_WORKERS ?= 2
BIN := $(VENV)/bin

.PHONY: demo test

# the project and its runtime dependencies (the demo); the dev extra on top (the tests). pip does not
# compile all it installs (about 27,000 modules, 40 s): each module is compiled when first imported and
# its bytecode kept, so the recipes below write bytecode even where PYTHONDONTWRITEBYTECODE is set (the
# tests start many processes, and each would compile all it imports again)
unexport PYTHONDONTWRITEBYTECODE
$(BIN)/.base: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q --no-compile "$(TORCH)"
	$(BIN)/python -m pip install -q --no-compile -e .
	touch $@

$(BIN)/.installed: $(BIN)/.base
	$(BIN)/python -m pip install -q --no-compile -e ".[dev]"
	touch $@

demo: $(BIN)/.base
	$(BIN)/mechlrmc train --preset cpu --steps $(DEMO_STEPS) --out $(RUN) --resume --set train.threads=$(DEMO_THREADS)
	$(BIN)/mechlrmc report $(RUN) -o $(RUN)/report.html
	@echo "report: $(RUN)/report.html"

test: $(BIN)/.installed
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadgroup
