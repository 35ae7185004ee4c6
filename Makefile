# Quick start: `make demo` (set up + run the demo), `make test` (set up + run the suite).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
# torch is pinned to the CPU wheel that lies on this machine's disk; an unpinned
# torch would pull a multi-GB CUDA build. On a GPU box, install your own torch first.
TORCH_PIN ?= torch==2.13.0
DEMO_OUT ?= runs/demo
REFERENCE_PKGS ?= dinov2==0.0.1.dev2 torchscale-gml==0.2.3 einops==0.8.2

.PHONY: setup test test-fast lint demo bench clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q -e '.[dev]'
	@# Public reference implementations for the equivalence tests (never runtime deps), required:
	@# a missing one fails the setup. --no-deps: their own pins would pull another torch.
	$(PY) -m pip install -q --no-deps $(REFERENCE_PKGS)
	$(PY) -c "import dinov2.loss, torchscale, einops"
	@touch $(STAMP)

setup: $(STAMP)

lint: $(STAMP)
	$(PY) -m ruff check src tests benchmarks

test: $(STAMP) lint
	$(PY) -m pytest -q -n 2 --dist loadfile

# while iterating: everything but the end-to-end runs marked `slow` (make test runs all)
test-fast: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile -m "not slow"

demo: $(STAMP)
	$(VENV)/bin/slidessl demo --out $(DEMO_OUT)

bench: $(STAMP)
	$(VENV)/bin/slidessl bench attention
	$(VENV)/bin/slidessl bench encoder

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
