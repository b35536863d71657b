"""Optimizer offload (cpu, nvme) against the same run without offload, stages 1-3; exact
checkpoint resume across backends. One spawned 2-rank gloo group per grid (offload_cases.py)."""

import pytest
import torch

import offload_cases as oc
import parity_cases as pc
from hf_zero.testing import run_on_ranks

_runs: dict = {}


@pytest.fixture(scope="module")
def swap(tmp_path_factory):
    return str(tmp_path_factory.mktemp("swap"))


def _once(key, fn, *args):
    if key not in _runs:
        _runs[key] = run_on_ranks(fn, 2, *args, timeout_s=400)
    return _runs[key]


CASES = [(stage, False, 1, pc.CLIP) for stage in (1, 2, 3)] + [(2, True, 1, pc.CLIP), (3, True, 2, 0.0),
                                                                (1, False, 2, 0.0)]


@pytest.mark.parametrize("device", ("cpu", "nvme"))
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"stage{c[0]}-{'bf16' if c[1] else 'fp32'}-ga{c[2]}-clip{c[3]}")
def test_offload_matches_no_offload(swap, device, case):
    for rank, results in enumerate(_once("parity", oc.parity_grid, swap)):
        (ref_losses, ref_params), (losses, params, _, _, _) = results[(*case, device)]
        assert len(losses) == len(ref_losses) == oc.STEPS * case[2]
        for step, (ref, ours) in enumerate(zip(ref_losses, losses)):
            assert ours == pytest.approx(ref, rel=1e-5), f"rank {rank} micro-step {step}"
        for name, ref in ref_params.items():
            assert (params[name] - ref).abs().max().item() <= 1e-6, f"rank {rank} {name}"
    assert ref_losses[-1] != ref_losses[0]   # the runs train


@pytest.mark.parametrize("device", ("cpu", "nvme"))
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"stage{c[0]}-{'bf16' if c[1] else 'fp32'}-ga{c[2]}-clip{c[3]}")
def test_offload_is_bit_identical_to_no_offload(swap, device, case):
    """Same kernel, same gradient bits: c = 1/2 without clipping goes through the kernel's
    exact division, clipped runs through the multiply ([Note: folding the coefficient]), and
    sub-groups split chunks at aligned points only ([Note: split points])."""
    for rank, results in enumerate(_once("parity", oc.parity_grid, swap)):
        (ref_losses, ref_params), (losses, params, _, _, _) = results[(*case, device)]
        assert losses == ref_losses, f"rank {rank}"
        for name, ref in ref_params.items():
            assert torch.equal(params[name], ref), f"rank {rank} {name}"


def test_adam_amsgrad_user_optimizer_on_nvme(swap):
    for rank, results in enumerate(_once("parity", oc.parity_grid, swap)):
        (ref_losses, ref_params), (losses, params, mem, _, _) = results["adam_amsgrad"]
        assert losses == pytest.approx(ref_losses, rel=1e-5), rank
        assert max((params[n] - p).abs().max().item() for n, p in ref_params.items()) <= 1e-6


@pytest.mark.parametrize("stage", (1, 2, 3))
def test_memory_breakdown_reports_offloaded_bytes_by_location(swap, stage):
    for results in _once("parity", oc.parity_grid, swap):
        cpu_mem = results[(stage, False, 1, pc.CLIP, "cpu")][1][2]
        nvme_mem = results[(stage, False, 1, pc.CLIP, "nvme")][1][2]
        counters = cpu_mem["step_counter_bytes"]
        # cpu: the Adam moments live on the host (fp32 host parameters are their own masters)
        moments = cpu_mem["optimizer_states"] - counters
        assert cpu_mem["offload_host"] == moments > 0 and cpu_mem["offload_nvme"] == 0
        # nvme: the same bytes, each sub-group region padded to the 4 KiB I/O alignment, are in
        # files; only the swap buffers and the step counters are resident
        num_regions = 2 * -(-moments // (8 * oc.SUB_GROUP))
        assert moments <= nvme_mem["offload_nvme"] <= moments + 4096 * num_regions
        assert nvme_mem["optimizer_states"] == counters
        assert nvme_mem["offload_host"] == nvme_mem["offload_buffers"] > 0


def test_swap_files_exist_during_the_run_and_are_removed_by_destroy(swap):
    for results in _once("parity", oc.parity_grid, swap):
        *_, during, after = results[(2, False, 1, pc.CLIP, "nvme")][1]
        assert len(during) == 1 and after == []


@pytest.mark.parametrize("src", ("none", "nvme", "cpu"))
@pytest.mark.parametrize("dst", ("none", "cpu", "nvme"))
@pytest.mark.parametrize("stage,bf16", ((2, False), (3, True)), ids=("stage2-fp32", "stage3-bf16"))
def test_resume_across_backends_is_bit_identical(swap, tmp_path_factory, stage, bf16, src, dst):
    if "resume" not in _runs:
        _runs["resume"] = run_on_ranks(oc.resume_grid, 2, swap, str(tmp_path_factory.mktemp("ckpt")),
                                       timeout_s=400)
    for rank, results in enumerate(_runs["resume"]):
        uninterrupted, resumed = results[(stage, bf16, src, dst)]
        assert resumed == uninterrupted, f"rank {rank}"


@pytest.mark.parametrize("device", ("cpu", "nvme"))
@pytest.mark.parametrize("case", CASES[:4], ids=lambda c: f"stage{c[0]}-{'bf16' if c[1] else 'fp32'}")
def test_estimator_predicts_offloaded_bytes_within_5_percent(swap, device, case):
    from hf_zero.diagnostics.estimator import optimizer_offload_bytes

    num_params = sum(p.numel() for p in pc.tiny_gpt2().parameters())
    for results in _once("parity", oc.parity_grid, swap):
        mem = results[(*case, device)][1][2]
        # bf16 keeps an fp32 master copy; fp32 host parameters are their own masters
        predicted = optimizer_offload_bytes(num_params // 2, device, master_copy=case[1],
                                            sub_group_size=oc.SUB_GROUP, buffer_count=2)
        for where in ("offload_host", "offload_nvme"):
            assert mem[where] == pytest.approx(predicted[where], rel=0.05, abs=1), (where, mem, predicted)
