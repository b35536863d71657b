"""Partial optimizer offload (``offload_optimizer.ratio``, [Note: partial offload]): the same
bits as no offload and full offload, the optimizer state's bytes split by the ratio between
the device and the cpu / nvme storage, checkpoints interchangeable across ratios. One
spawned 2-rank gloo group (offload_ratio_cases.py)."""

import pytest
import torch

import offload_ratio_cases as rc
from hf_zero.offload.partial import device_sub_group_count
from hf_zero.testing import run_on_ranks

_runs: dict = {}


@pytest.fixture(scope="module")
def swap(tmp_path_factory):
    return str(tmp_path_factory.mktemp("swap"))


def _grid(swap):
    if "parity" not in _runs:
        _runs["parity"] = run_on_ranks(rc.parity_grid, 2, swap, timeout_s=400)
    return _runs["parity"]


def _ids(case):
    stage, bf16, clip, device, ratio = case
    return f"stage{stage}-{'bf16' if bf16 else 'fp32'}-clip{clip}-{device}-ratio{ratio}"


def test_deepspeeds_rounding():
    # stage3.py: sub-group i stays on the accelerator when i < int((1 - ratio) * n)
    assert [device_sub_group_count(10, r) for r in (1.0, 0.7, 0.5, 0.3, 0.0)] == [0, 3, 5, 7, 10]
    assert device_sub_group_count(1, 0.3) == 0   # a single sub-group is always offloaded


@pytest.mark.parametrize("case", rc.PARTIAL, ids=_ids)
def test_partial_offload_is_bit_identical_to_none_and_full_offload(swap, case):
    for rank, results in enumerate(_grid(swap)):
        (ref_losses, ref_params, _), (full_losses, full_params, _), (losses, params, _) = results[case]
        assert losses == full_losses == ref_losses, f"rank {rank}"
        for name, ref in ref_params.items():
            assert torch.equal(params[name], ref) and torch.equal(full_params[name], ref), f"rank {rank} {name}"
    assert ref_losses[-1] != ref_losses[0]   # the runs train


@pytest.mark.parametrize("case", rc.PARTIAL, ids=_ids)
def test_state_bytes_are_split_by_the_ratio(swap, case):
    """Bytes actually held: storages on the device side, the offloaded storages (cpu) or the
    swap files on disk (nvme). Fails if the ratio is ignored (everything offloaded)."""
    device, ratio = case[3], case[4]
    for rank, results in enumerate(_grid(swap)):
        full, part = results[case][1][2], results[case][2][2]
        total = 4 * part["kinds"] * part["elements"]   # fp32 masters (when copies) + moments
        # nvme: each offloaded sub-group's file pads each kind's region to 4 KiB
        padding = 4096 * part["kinds"] * (part["sub_groups"] - part["on_device"]) if device == "nvme" else 0
        # resident storages minus the cpu backend's host ones (nvme's host bytes are swap buffers)
        on_device = part["resident"] - (part["host"] if device == "cpu" else 0)
        offloaded = part["host"] if device == "cpu" else part["nvme_files"]
        # ~ the ratio of the bytes: DeepSpeed counts sub-groups (rounding to more offload), ~equal in size
        tolerance = 1.5 / part["sub_groups"]
        assert abs(on_device / total - (1 - ratio)) <= tolerance, (rank, on_device / total, part)
        assert abs((offloaded - padding) / total - ratio) <= tolerance + padding / total, (rank, part)
        # exactly: the offloaded sub-groups' elements are held by the offload storage, the
        # others on the device side, each element once; a full-offload run holds all offloaded
        assert part["split_chunks"] == 1 and 0 < part["on_device"] < part["sub_groups"] >= 5, part
        expected = 4 * part["kinds"] * part["offloaded_elements"]
        assert on_device == total - expected
        if device == "cpu":
            assert offloaded == expected and full["host"] == full["resident"] == total
        else:
            assert offloaded == part["nvme_reported"] and expected <= offloaded <= expected + padding
            assert total <= full["nvme_files"] and full["resident"] == 0


@pytest.mark.parametrize("stage,bf16,src,src_ratio,dst,dst_ratio",
                         [(s, b, *src, *dst) for (s, b), sources in rc.RESUME.items()
                          for src, targets in sources for dst in targets])
def test_resume_across_ratios_is_bit_identical(swap, tmp_path_factory, stage, bf16, src, src_ratio, dst, dst_ratio):
    if "resume" not in _runs:
        _runs["resume"] = run_on_ranks(rc.resume_grid, 2, swap, str(tmp_path_factory.mktemp("ckpt")),
                                       timeout_s=400)
    for rank, results in enumerate(_runs["resume"]):
        uninterrupted, resumed = results[(stage, bf16, src, src_ratio, dst, dst_ratio)]
        assert resumed == uninterrupted, f"rank {rank}"


def _backend(device, ratio, tmp_path, sub_group_size=1000, dtype=torch.bfloat16):
    from hf_zero.offload.cpu import CpuOffload
    from hf_zero.offload.nvme import NvmeOffload

    params = [[torch.randn(2500).to(dtype), torch.randn(700).to(dtype)], [torch.randn(1800).to(dtype)]]
    backend = (CpuOffload(params, sub_group_size, False, ratio=ratio) if device == "cpu" else
               NvmeOffload(params, sub_group_size, str(tmp_path), 2, False, rank=0, ratio=ratio))
    backend.attach(torch.optim.AdamW([p for g in backend.masters.masters for p in g]))
    return backend, params


@pytest.mark.parametrize("device", ("cpu", "nvme"))
def test_streamed_state_round_trips_across_the_device_boundary(tmp_path, device):
    """write_state / read_state of ranges that straddle the split chunk's boundary (no process
    group): every element lands once, neighbours unchanged, masters reach the parameters."""
    backend, params = _backend(device, 0.5, tmp_path)
    try:
        (group, chunk), = backend.split   # the straddling chunk
        boundary = backend.split[(group, chunk)].boundary
        numel = backend.masters.masters[group][chunk].numel()
        values = {kind: torch.randn(numel) for kind in ("master", "exp_avg")}
        for kind, new in values.items():   # two unaligned ranges covering the chunk, the first crossing b
            for start, end in ((0, boundary + 37), (boundary + 37, numel)):
                def fill(offset, part, s=start, v=new):
                    part.copy_(v[s + offset:s + offset + part.numel()])
                backend.write_state(kind, group, chunk, start, end - start, fill)
        for kind, new in values.items():
            got = torch.cat([p.clone() for p in backend.read_state(kind, group, chunk, 5, numel - 5)])
            assert torch.equal(got, new[5:]), kind
        assert torch.equal(params[group][chunk], values["master"].to(torch.bfloat16))
    finally:
        backend.close()


def test_a_ratio_without_device_sub_groups_warns(tmp_path):
    with pytest.warns(UserWarning, match="keeps none of this rank's 1 optimizer sub-group"):
        _backend("cpu", 0.3, tmp_path, sub_group_size=10 ** 9)[0].close()
