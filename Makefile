# mlx_tune: `make demo` runs the whole pipeline, `make test` the test suite.
# Works on a fresh Linux or macOS machine with Python 3.10+ (nothing installed by hand).

PYTHON ?= python3
VENV   := .venv
PY     := scripts/python
STAMP  := $(VENV)/.installed
MODEL  := models/SmolLM2-135M-Instruct.Q4_1.gguf

.PHONY: setup test demo bench bench-quick bench-rivals clean help

help:
	@echo "make demo         the whole pipeline on SmolLM2: data -> train -> fuse -> serve -> test"
	@echo "make test         set up .venv and run the test suite"
	@echo "make setup        .venv + package + OpenBLAS (Linux) + demo model"
	@echo "make bench        all benchmarks (long); make bench-quick: under 20 minutes"

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(VENV)/bin/python
	$(VENV)/bin/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

$(MODEL): | $(VENV)/bin/python
	-$(VENV)/bin/python scripts/fetch_demo_model.py

setup: $(STAMP) $(MODEL)
	@scripts/setup_system.sh

test: setup
	@$(PY) -m pytest tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests"; exit 1; fi; exit $$rc

demo: setup
	@scripts/demo.sh

bench: setup
	$(PY) bench/run_all.py

bench-quick: setup
	$(PY) bench/run_all.py --quick

bench-rivals: setup
	bench/install_rivals.sh

clean:
	rm -rf outputs .pytest_cache
