# `make test` and `make demo` each set up .venv on first use, so both work on a fresh clone.
VENV ?= .venv
PY := $(VENV)/bin/python
# Without a GPU, install the CPU build of torch first: otherwise pip pulls a multi-GB CUDA build.
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo 1)

.PHONY: setup test test-gpu demo bench lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
ifndef HAS_GPU
	$(PY) -m pip install -q torch==2.13.0 triton==3.7.1
endif
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $@

lint: setup
	$(VENV)/bin/ruff check .

test: lint
	$(VENV)/bin/pytest -q

# GPU tests only (marked `gpu`); on the GPU machine see docs/gpu.md.
test-gpu: setup
	$(VENV)/bin/pytest -q -m gpu

# Prepare the bundled corpus, then train a small hybrid of all four mixer families on it
# (the demo run starts afresh each time: runs/demo is replaced).
demo: setup
	$(VENV)/bin/stripes prepare configs/data/demo.yaml
	rm -rf runs/demo
	$(VENV)/bin/stripes train configs/train/demo.yaml
	$(VENV)/bin/stripes generate runs/demo --prompt "HACKER, n." --max-new-tokens 48

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
