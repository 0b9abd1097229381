# Two commands on a fresh machine:  `make demo` (install + run the main job)  and  `make test`.
# Both create the virtual environment themselves.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install browser demo test default-model bench-encoder bench-pipeline

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

demo: install
	$(BIN)/videosearch demo

# Debian's chromium and its driver, for the web page's test (tests/e2e/test_service.py)
browser:
	@test -x /usr/bin/chromium -a -x /usr/bin/chromedriver || { \
		SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$SUDO apt-get update -qq && $$SUDO apt-get install -y --no-install-recommends chromium chromium-driver; }

test: install browser
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

# the bundled default model, from scratch (seeded): generate clips, train on Ray Train, evaluate held-out
default-model: install
	$(BIN)/python -m pipeline.samples.bundled_model xclip_core/data/default-model

bench-encoder: install
	$(BIN)/python bench/encoder.py

bench-pipeline: install
	$(BIN)/python bench/pipeline.py
