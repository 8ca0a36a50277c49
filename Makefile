# Two entry points on a fresh machine: `make demo` (install + main job) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
FASHION_MNIST := /usr/share/datasets/fashion-mnist
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test test-all test-gpu lint install data

install: $(STAMP)

# torch/torchvision are pinned to the wheels this project's machines serve from local disk.
# The cuda extra (cupy-cuda13x, a 67 MB wheel) is installed everywhere: its NVRTC bindings let
# tests/test_kernels_compile.py compile the CUDA kernels on machines without a GPU.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[dev,onnx,cuda]'
	touch $(STAMP)

# The bundled default dataset (SPEC section 6) is Debian's dataset-fashion-mnist.
data: $(FASHION_MNIST)
$(FASHION_MNIST):
	$(SUDO) apt-get update -qq
	$(SUDO) apt-get install -y -qq dataset-fashion-mnist

demo: $(STAMP) $(FASHION_MNIST)
	$(BIN)/approxctl train --target sc

test: $(STAMP) $(FASHION_MNIST)
	$(BIN)/ruff check approxctl tests benchmarks
	$(BIN)/python -m pytest -q

test-all: $(STAMP) $(FASHION_MNIST)
	$(BIN)/python -m pytest -q -m "not gpu"

# The GPU suite (CuPy kernels against the torch reference, layers on CUDA vs CPU); needs a GPU.
test-gpu: $(STAMP)
	$(BIN)/python -m pytest -q -m gpu

lint: $(STAMP)
	$(BIN)/ruff check approxctl tests benchmarks
