# The two set-up commands of the README: `make demo` (a video from a prompt, offline) and `make test`.
PYTHON ?= python3
VENV ?= .venv
# The CPU wheel is what this project's CI uses; on a GPU machine `make TORCH=torch ...` takes PyPI's CUDA build.
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: demo test test-all install clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

demo: install
	$(BIN)/opendit sample --prompt "a red circle moving to the right" --save_dir samples/demo

test: install
	$(BIN)/python -m pytest -q -m "not slow and not gpu"

test-all: install
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) samples outputs
