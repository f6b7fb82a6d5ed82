# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# System packages (Debian): apt-get installs them when run as root, else one line names the command and make stops.
SYSTEM_SETUP := PY=$(PY) scripts/system_setup.sh $(if $(wildcard $(BIN)/python),,venv)

.PHONY: demo test lint clean-venv system-demo system-test
.NOTPARALLEL:  # the system step runs before the venv is made and the tests start

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

system-demo:
	@$(SYSTEM_SETUP)

system-test:
	@$(SYSTEM_SETUP) dataset compiler

demo: system-demo $(STAMP)
	$(BIN)/python scripts/demo.py

test: system-test $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .

clean-venv:
	rm -rf $(VENV)
