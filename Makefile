# `make demo` then `make test` on a fresh CPU-only machine (see README.md).
# torch is pinned and installed before the project, then the project is installed with a
# constraint file, so pip never swaps in another torch build.
PYTHON ?= python3
TORCH_VERSION ?= 2.13.0
# e.g. https://download.pytorch.org/whl/cpu to avoid PyPI's multi-GB CUDA build of torch
TORCH_INDEX ?=
VENV ?= .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
RUN ?= runs/demo
# e.g. `make demo THREADS=1` on a shared machine (torch's default uses every core)
THREADS ?=
PYTEST_ARGS ?=

.PHONY: setup demo test bench lint clean nightly peers

$(BIN)/dfplan: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==$(TORCH_VERSION) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	echo "torch==$(TORCH_VERSION)" > $(VENV)/torch-pin.txt
	$(PY) -m pip install -q -c $(VENV)/torch-pin.txt -e '.[dev]'
	@# build the C++ CPU kernels now (into the venv), not in the middle of the first command
	-$(PY) -c "import dfplan.kernels.cpu as c; c.extension()"
	touch $@

setup: $(BIN)/dfplan

# The whole pipeline on the built-in default (tiny teacher on the stdlib corpus), offline.
demo: setup
	$(BIN)/dfplan demo --out $(RUN) $(if $(THREADS),--threads $(THREADS))

# pytest exits 5 when it collects nothing: fine only while no test files exist at all.
test: setup
	@rc=0; $(PY) -m pytest -q $(PYTEST_ARGS) tests || rc=$$?; \
	if [ $$rc -eq 5 ] && ! ls tests/test_*.py >/dev/null 2>&1; then \
		echo "no tests exist yet (pytest exit 5)"; rc=0; fi; exit $$rc

bench: setup
	$(BIN)/dfplan bench kernels --out $(RUN)/bench

# fixed benchmark suite against its history (runs/nightly); SUITE=tiny for a quick smoke run
HISTORY ?= runs/nightly
SUITE ?= full
nightly: setup
	$(BIN)/dfplan bench nightly --history $(HISTORY) --suite $(SUITE)

# optional peers for `dfplan bench e2e`: builds llama.cpp ONCE (niced, minutes) into
# ~/.cache/dfplan/peers; never part of `make test` or CI
peers: setup
	$(PY) -m pip install -q -c $(VENV)/torch-pin.txt transformers gguf sentencepiece
	$(PY) -m dfplan.bench.peers

# ruff (pyflakes, import order) and the import-linter layer contract of pyproject.toml
lint: setup
	$(BIN)/ruff check .
	$(PY) tools/lint_layers.py

clean:
	rm -rf $(VENV) build *.egg-info
