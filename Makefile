# Two commands on a fresh machine (see README):
#   make demo   — erase a concept from the embedded tiny SD model (offline, CPU)
#   make test   — run the test suite (offline, CPU)
# Both create .venv and install the project with the CPU pins of constraints/cpu.txt first.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test install clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints/cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints/cpu.txt -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/erasepro erase manifests/demo.yaml --out erasures/demo --overwrite
	$(BIN)/erasepro inspect erasures/demo

test: $(STAMP)
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) erasures .pytest_cache
