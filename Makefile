# Two entry points for a fresh machine: `make demo` (the main job) and `make test`.
# Both create .venv, install torch 2.13.0 (CPU) and rkfac, and fetch what they need.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.rkfac-installed
FASHION_MNIST := /usr/share/datasets/fashion-mnist
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test install data lint bench clean

demo: install data
	$(BIN)/rkfac bench --preset demo

# The tests that read Fashion-MNIST skip (saying so) where it cannot be installed.
test: install
	@$(MAKE) --no-print-directory data || echo "Fashion-MNIST could not be installed: the tests that read it will skip"
	$(BIN)/python -m pytest

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev,peers]'
	touch $(STAMP)

# Fashion-MNIST from Debian's dataset-fashion-mnist package, when it is not there yet.
data:
	@if [ ! -f $(FASHION_MNIST)/train-images-idx3-ubyte.gz ]; then \
		$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq dataset-fashion-mnist; \
	fi

lint: install
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/mypy

bench: install
	$(BIN)/python benchmarks/decomposition.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
