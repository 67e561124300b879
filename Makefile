# torch is pinned and installed before the project so pip never swaps in a CUDA build.
PYTHON ?= python3
TORCH_VERSION ?= 2.13.0
VENV ?= .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
RUN ?= runs/demo

.PHONY: setup demo test bench lint clean

$(BIN)/dfplan: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==$(TORCH_VERSION)
	echo "torch==$(TORCH_VERSION)" > $(VENV)/torch-pin.txt
	$(PY) -m pip install -q -c $(VENV)/torch-pin.txt -e '.[dev]'
	touch $@

setup: $(BIN)/dfplan

demo: setup
	$(BIN)/dfplan demo --out $(RUN)

test: setup
	$(BIN)/python -m pytest -q tests

bench: setup
	$(BIN)/dfplan bench kernels --out $(RUN)/bench

lint: setup
	$(BIN)/python -m compileall -q dfplan sensitivity planner kernels bench reports

clean:
	rm -rf $(VENV) build *.egg-info
