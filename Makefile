# Two commands on a fresh machine:  `make demo` (install + run the main job)  and  `make test`.
# Both create the virtual environment themselves.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install demo test bench-encoder bench-pipeline

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

demo: install
	$(BIN)/videosearch demo

test: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

bench-encoder: install
	$(BIN)/python bench/encoder.py

bench-pipeline: install
	$(BIN)/python bench/pipeline.py
