# Two commands do everything on a fresh Debian / Raspberry Pi OS machine:
#   make demo   set up, then replay the bundled real Kona EV log and show what the owner receives
#   make test   set up, then run the whole test suite (starts its own Mosquitto brokers)
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
STAMP := $(VENV)/.installed

.PHONY: setup demo test bench eval-anonymisation docs clean mosquitto

setup: $(STAMP) mosquitto

# editable_mode=compat: the checkout's folder on sys.path (one line in a .pth file); the default
# editable mode imports a finder at every interpreter start (~10 ms of each command). setuptools
# calls compat transitional: where it is gone, the default mode is used
$(STAMP): pyproject.toml Makefile
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python >= 3.11 is needed"' \
	  || { echo "Python 3.11 or newer is needed (found $$($(PYTHON) --version))"; exit 1; }
	@[ -x $(BIN)/python ] || $(PYTHON) -m venv $(VENV) \
	  || { echo "python3 -m venv failed: install it with: $(SUDO) apt-get install -y python3-venv"; exit 1; }
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]" --config-settings editable_mode=compat \
	  || $(BIN)/python -m pip install --quiet -e ".[test]"
	@touch $(STAMP)

mosquitto:
	@command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || { \
	  echo "installing mosquitto with apt-get"; \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq mosquitto; }

demo: setup
	$(BIN)/python -m gateway.demo

test: setup
	$(BIN)/python -m pytest

bench: setup
	$(BIN)/python bench/run.py --markdown docs/benchmarks-table.md

eval-anonymisation: setup
	$(BIN)/python bench/eval_anonymisation.py

docs: setup
	$(BIN)/gateway config --doc > docs/config.md

clean:
	rm -rf $(VENV) .pytest_cache demo-out
