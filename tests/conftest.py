import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRITON_INTERPRET", "1")


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _no_partitioned_loading_left_over():
    """A stage-3 TrainingArguments kept alive by a reference cycle (a Trainer) would make later
    tests' from_pretrained build partitioned until the garbage collector runs: end it after
    each test, as transformers' DeepSpeed tests call unset_hf_deepspeed_config."""
    yield
    from hf_zero import partitioned_load

    partitioned_load.deactivate()
