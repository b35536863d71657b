# hf_zero: the README's two commands are `make demo` and `make test`; both set up first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install test demo bench gpu-check lint clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[test]"
	touch $@

test: install
	$(BIN)/python -m pytest -q

demo: install
	$(BIN)/torchrun --standalone --nproc_per_node 2 -m hf_zero.demo

bench: install
	$(BIN)/python benchmarks/zero_stages.py

# One command for a GPU machine (docs/gpu.md): under 8 minutes there; says so and exits 0 without CUDA.
gpu-check: install
	$(BIN)/python benchmarks/gpu_check.py

lint: install
	$(BIN)/python -m pip install --quiet ruff mypy
	$(BIN)/python -m ruff check hf_zero hf_zero_kernels tests benchmarks integration_tests
	$(BIN)/python -m mypy   # files and settings: pyproject.toml [tool.mypy]

clean:
	rm -rf $(VENV) out *.egg-info
