"""Stage-3 parameter offload (offload_param cpu / nvme): parity with DDP + AdamW, LoRA with an
NVMe-backed frozen base, exact resume, page eviction, accounting and setup errors. One
spawned 2-rank gloo group per grid (param_offload_cases.py)."""

import pytest

import param_offload_cases as poc
import parity_cases as pc
from hf_zero.testing import run_on_ranks

_runs: dict = {}


@pytest.fixture(scope="module")
def swap(tmp_path_factory):
    return str(tmp_path_factory.mktemp("param_swap"))


def _once(key, fn, *args):
    if key not in _runs:
        _runs[key] = run_on_ranks(fn, 2, *args, timeout_s=500)
    return _runs[key]


FP32 = [(accum, clip, param, optimizer) for accum, clip in ((1, pc.CLIP), (2, 0.0))
        for param in ("cpu", "nvme") for optimizer in ("none", "cpu", "nvme")]


@pytest.mark.parametrize("case", FP32, ids=lambda c: f"ga{c[0]}-clip{c[1]}-param_{c[2]}-opt_{c[3]}")
def test_fp32_matches_ddp(swap, case):
    for rank, results in enumerate(_once("grid", poc.parity_grid, swap)):
        ref_losses, ref_params, run = results[("fp32", *case)]
        assert len(run["losses"]) == len(ref_losses)
        for step, (ref, ours) in enumerate(zip(ref_losses, run["losses"])):
            assert ours == pytest.approx(ref, rel=1e-5), f"rank {rank} micro-step {step}"
        for name, ref in ref_params.items():
            assert (run["params"][name] - ref).abs().max().item() <= 1e-6, f"rank {rank} {name}"
    assert ref_losses[-1] != ref_losses[0]


@pytest.mark.parametrize("case", [("nvme", "nvme"), ("nvme", "none"), ("cpu", "cpu")], ids=str)
def test_bf16_is_bit_identical_to_no_parameter_offload(swap, case):
    for results in _once("grid", poc.parity_grid, swap):
        ref_losses, ref_params, run = results[("bf16", 1, pc.CLIP, *case)]
        assert run["losses"] == ref_losses
        for name, ref in ref_params.items():
            assert run["params"][name].equal(ref), name


def test_nvme_shards_live_in_files_and_leave_memory_after_each_step(swap):
    for results in _once("grid", poc.parity_grid, swap):
        run = results[("fp32", 1, pc.CLIP, "nvme", "cpu")][2]
        mem = run["mem"]
        # Every non-persistent shard is a file; the persistent set (biases, norms) stays in memory.
        assert 0 < mem["param_nvme"] <= run["shard_bytes"]
        assert mem["param_host"] + mem["param_nvme"] == run["shard_bytes"]
        assert run["mapped_after_step"] == [0] * len(run["mapped_after_step"])   # pages dropped
        assert run["read_ahead"] > 0   # shards asked for along the recorded order
        assert len(run["dirs_during"]) == 1 and run["dirs_after"] == []   # the parameter swap dir; removed
        cpu = results[("fp32", 1, pc.CLIP, "cpu", "cpu")][2]["mem"]
        assert cpu["param_nvme"] == 0 and cpu["param_host"] == run["shard_bytes"]
        assert results["max_in_cpu_all"]["param_nvme"] == 0   # max_in_cpu 1e9: nothing in files


def test_lora_with_frozen_base_on_nvme_matches_ddp(swap):
    for rank, out in enumerate(_once("lora", poc.lora_nvme, swap)):
        for reentrant in (None, False):
            run = out[reentrant]
            assert run["losses"] == pytest.approx(out["ref"], rel=1e-5), f"rank {rank} ckpt={reentrant}"
            assert run["param_diff"] <= 1e-6
            assert run["frozen_empty_at_rest"]
            assert run["mem"]["param_nvme"] > 0


def test_resume_from_nvme_parameters_is_exact(swap, tmp_path_factory):
    ckpt = str(tmp_path_factory.mktemp("param_ckpt"))
    for out in _once("resume", poc.resume, swap, ckpt):
        assert out["nvme"] == out["straight"]
        assert out["none"] == out["straight"]
        assert out["mapped_after_save"] == 0 and out["mapped_after_load_nvme"] == 0


def test_bad_offload_param_settings_fail_early_with_the_key(swap):
    for out in _once("errors", poc.setup_errors, swap):
        kind, message = out["stage2"]
        assert "offload_param.device" in message and "stage 3" in message
        kind, message = out["no_path"]
        assert "offload_param.nvme_path" in message
        kind, message = out["missing_path"]
        assert kind == "SwapSetupError" and "does-not-exist" in message and "offload_param" in message


# ---- single-process checks of the store itself ------------------------------------------

def test_max_in_cpu_keeps_the_first_shards_in_memory_and_files_the_rest(tmp_path):
    import torch

    from hf_zero.offload.param_store import ParamStore

    store = ParamStore("nvme", nvme_path=str(tmp_path), max_in_cpu=150, expected_bytes=10_000)
    first, second, persistent = (store.allocate(100, torch.float32, torch.device("cpu")),
                                 store.allocate(100, torch.float32, torch.device("cpu")),
                                 store.allocate(10, torch.float32, torch.device("cpu"), keep_in_memory=True))
    assert (first.offloaded, second.offloaded, persistent.offloaded) == (False, True, False)
    second.tensor.copy_(torch.arange(100.0))   # a mapped shard is an ordinary tensor
    store.drop_pages([second.tensor.narrow(0, 10, 50)])   # a partial range: whole pages only
    store.evict_all()
    assert second.tensor.equal(torch.arange(100.0))   # dropped pages come back from the file
    assert store.memory_by_location() == {"param_host": 440, "param_nvme": 400}
    store.close()
    assert list(tmp_path.iterdir()) == []
    assert second.tensor.equal(torch.arange(100.0))   # readable until the tensor is freed


def test_parameter_offload_with_the_none_optimizer_is_refused_on_an_accelerator():
    """Keyed on where the parameters compute, not on whether the host has a GPU."""
    import torch

    import hf_zero
    from hf_zero.offload import build_param_store

    zero = hf_zero.load_config({"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}})
    with pytest.raises(hf_zero.ConfigError, match="offload_param.device.*offload_optimizer"):
        build_param_store(zero.zero_optimization, pc.tiny_gpt2(), torch.float32, 1, 0, torch.device("cuda", 0))
    store = build_param_store(zero.zero_optimization, pc.tiny_gpt2(), torch.float32, 1, 0, torch.device("cpu"))
    assert store.device == "cpu"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("pretrained")
    pc.tiny_gpt2().save_pretrained(path)
    return str(path)


def test_zero_init_and_from_pretrained_fill_nvme_shards_exactly(swap, saved):
    for rank, out in enumerate(_once("construction", poc.construction_on_nvme, swap, saved)):
        assert out["init_nvme_files"] > 0 and out["init_none_files"] == 0
        for name, ref in out["init_none"].items():
            assert out["init_nvme"][name].equal(ref), f"rank {rank} {name}"
        assert out["pretrained_losses"] == pytest.approx(out["ref_losses"], rel=1e-5), f"rank {rank}"
        assert out["pretrained_diff"] <= 1e-6
