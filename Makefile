# hf_zero: the README's two commands are `make demo` and `make test`; both set up first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install test test-compat demo bench gpu-check lint clean

install: $(VENV)/.installed

# compat/newest.txt: the newest tested versions (torch 2.13.0's CPU wheel), a constraint, not a dependency.
$(VENV)/.installed: pyproject.toml compat/newest.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c compat/newest.txt -e ".[test]"
	touch $@

test: install
	$(BIN)/python -m pytest -q

# The parity and integration subset on the oldest supported versions (compat/oldest.txt), in a venv
# of its own. First run downloads about 3.5 GB (torch 2.6.0 is a CUDA build on PyPI; it runs on CPU);
# tests about 3 minutes on 2 idle cores (4.5 min CPU), 10+ on a shared machine.
# Not part of `make test` / CI (docs/design.md, "Dependency ranges").
COMPAT_VENV ?= .venv-compat
COMPAT_TESTS := tests/test_parity.py tests/test_checkpoint.py tests/test_stage3.py tests/test_offload.py \
	tests/test_integrations.py tests/test_pretrained_loading.py tests/test_upstream_contract.py \
	tests/test_optional_dependencies.py tests/test_partitioned_from_pretrained.py tests/test_state_dict_gather.py \
	integration_tests/test_hf_integrations.py

# Deselected: its script passes TrainingArguments' --activation_checkpointing (absent in transformers 5.22)
# (hf_zero does not use it; the older spelling is --gradient_checkpointing).
COMPAT_DESELECT := integration_tests/test_hf_integrations.py::test_unmodified_script_lora_stage3_checkpointing

test-compat: $(COMPAT_VENV)/.installed
	$(COMPAT_VENV)/bin/python -m pytest -q -p no:cacheprovider $(COMPAT_TESTS) --deselect $(COMPAT_DESELECT)

$(COMPAT_VENV)/.installed: pyproject.toml compat/oldest.txt
	$(PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_VENV)/bin/python -m pip install --quiet --disable-pip-version-check -c compat/oldest.txt \
		-e ".[accelerate,peft]" pytest pytest-timeout
	touch $@

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
	rm -rf $(VENV) $(COMPAT_VENV) out *.egg-info
