# The two set-up commands of the README: `make demo` and `make test`. Each creates its own venv
# and installs what it needs on a fresh Debian/Ubuntu machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: demo test venv system-deps toolchains clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

venv: $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[dev]'

# Mosquitto for the sync tests and the demo (apt-get as root; otherwise says what to install).
system-deps:
	@bash scripts/install-system-deps.sh

demo: venv system-deps
	$(BIN)/python examples/demo.py

test: venv system-deps
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build dist *.egg-info demo-out
