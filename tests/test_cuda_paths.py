"""What can be checked of the CUDA paths without a GPU (issue 16; docs/gpu.md has the rest):
device selection, the device collectives use, per-device RNG, the fused_kernels decision,
Adam's step counter placement, the gradient-download schedule, and that a CPU run calls no
CUDA API at all."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import hf_zero
from hf_zero.device import backend_device_types, collective_device, select_compute_device
from parity_cases import batch, tiny_gpt2

CUDA0, CUDA1 = torch.device("cuda", 0), torch.device("cuda", 1)
CPU, META = torch.device("cpu"), torch.device("meta")


# ---- device selection ([Note: device selection] in hf_zero/device.py) ----------------------
def test_placed_parameters_decide_the_device():
    assert select_compute_device([CUDA1, CUDA1], True, "0", 2) == CUDA1   # the model wins over LOCAL_RANK
    assert select_compute_device([CPU, META], True, "1", 2) == CPU        # a CPU model on a GPU host
    with pytest.raises(ValueError, match="several devices"):
        select_compute_device([CPU, CUDA0], True, None, 1)


def test_meta_models_go_to_the_local_rank_gpu_not_device_zero():
    assert select_compute_device([META], True, "1", 2) == CUDA1
    assert select_compute_device([META], True, None, 2) == CUDA0
    assert select_compute_device([META], False, "1", 0) == CPU
    with pytest.raises(ValueError, match="LOCAL_RANK=3 but only 2"):
        select_compute_device([META], True, "3", 2)


def test_the_engine_reads_local_rank_for_a_meta_model(monkeypatch):
    from hf_zero.device import compute_device_of

    with hf_zero.zero_init(seed=1):
        model = tiny_gpt2()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert compute_device_of(model) == CUDA1
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert compute_device_of(model) == CPU


def test_engine_device_follows_the_model_parameters():
    model = tiny_gpt2()
    engine = hf_zero.initialize(model, {"train_micro_batch_size_per_gpu": 1})
    assert engine.device == CPU


# ---- the device of a collective's tensors -----------------------------------------------
@pytest.mark.parametrize("backend,compute,expected", [
    ("gloo", CPU, CPU), ("gloo", CUDA1, CPU), ("nccl", CUDA1, CUDA1), ("NCCL", CUDA0, CUDA0),
    ("cpu:gloo,cuda:nccl", CUDA1, CPU), ("cuda:nccl", CUDA1, CUDA1), ("mpi", CPU, CPU)])
def test_collective_tensors_live_where_the_backend_serves_them(backend, compute, expected):
    assert collective_device(backend, compute) == expected


def test_an_nccl_group_with_a_cpu_model_is_refused_by_name():
    assert backend_device_types("nccl") == {"cuda": "nccl"}
    with pytest.raises(ValueError, match="'nccl' cannot move host tensors"):
        collective_device("nccl", CPU)


def test_the_zero_init_seed_goes_through_the_group_backend_device(monkeypatch):
    """The engine asks ``collective_device`` with the group's backend for the seed tensor (the
    old code created it on the CPU whatever the backend); checked by recording the tensor
    the broadcast receives, with a group that reports NCCL and a model on 'meta'."""
    import hf_zero.engine_build as engine_build

    seen = {}
    engine = SimpleNamespace(device=META, comm=SimpleNamespace(active=True, group=None,
                                                               broadcast=lambda t: seen.setdefault("t", t)))
    monkeypatch.setattr(engine_build.dist, "get_backend", lambda group: "nccl")
    with hf_zero.zero_init(seed=3):
        model = tiny_gpt2()
    with pytest.raises(Exception):   # materialising on 'meta' fails after the broadcast; only the seed matters
        engine_build.meta_source(engine, model, 1)
    assert seen["t"].device == META and seen["t"].dtype == torch.int64


# ---- RNG: the current device only --------------------------------------------------------
def _fake_cuda_rng(monkeypatch, current: int):
    from hf_zero.checkpoint import rng

    calls = []

    def refuse(*_a, **_k):
        raise AssertionError("only the current device's generator may be touched")

    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": torch.full((4,), 7, dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": calls.append(state.tolist()))
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", refuse)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", refuse)
    return rng, calls


def test_rng_saves_and_restores_the_current_device_only(monkeypatch):
    rng, calls = _fake_cuda_rng(monkeypatch, current=1)
    state = rng.capture_rng()
    assert isinstance(state["cuda"], str)   # one state, not a list per visible device
    rng.restore_rng(state)
    assert calls == [[7, 7, 7, 7]]


def test_rng_of_older_checkpoints_restores_the_current_device_entry(monkeypatch):
    rng, calls = _fake_cuda_rng(monkeypatch, current=1)
    state = rng.capture_rng()
    older = {**state, "cuda": [rng._encode(torch.zeros(2, dtype=torch.uint8)), state["cuda"]]}
    rng.restore_rng(older)
    assert calls == [[7, 7, 7, 7]]
    rng.restore_rng({**state, "cuda": older["cuda"][:1]})   # saved on a host with fewer GPUs: skipped
    assert calls == [[7, 7, 7, 7]]


# ---- fused_kernels and the step counter --------------------------------------------------
def test_auto_keeps_torch_fused_adamw_on_cuda():
    """fused_kernels 'auto' with parameters on CUDA: no Triton update (it has only run in the
    interpreter); 'triton' opts in."""
    from hf_zero.engine_build import fused_update

    inner = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(4))])
    offload = SimpleNamespace(updates_on_device=True,
                              masters=SimpleNamespace(owned_params=[[torch.zeros(4)]], keeps_copy=False))
    assert fused_update("auto", inner, offload) is None
    assert fused_update("triton", inner, offload).backend == "triton"


def test_the_step_counter_is_placed_as_torch_places_it():
    """torch.optim.Adam(W)'s rule: fp32 on the parameter's device for fused/capturable groups,
    else a host scalar ('meta' stands in for an accelerator here)."""
    from hf_zero.optim.fused_step import new_step_counter

    master = torch.empty(3, device=META)
    assert new_step_counter({"fused": True}, master).device == META
    assert new_step_counter({"fused": None, "capturable": True}, master).device == META
    assert new_step_counter({"fused": False}, master).device == CPU
    assert new_step_counter({"fused": True}, master).dtype == torch.float32
    # The same rule as torch's own optimizer on a CPU parameter (fused and not):
    for fused in (True, False):
        p = torch.nn.Parameter(torch.ones(3))
        p.grad = torch.ones(3)
        opt = torch.optim.AdamW([p], fused=fused)
        opt.step()
        ref = opt.state[p]["step"]
        mine = new_step_counter(opt.param_groups[0], p.detach())
        assert (mine.device, mine.dtype, mine.shape) == (ref.device, ref.dtype, ref.shape)


def _train(config: dict, steps: range, load_from=None, save_to=None) -> list[float]:
    model = tiny_gpt2()
    engine = hf_zero.initialize(model, config)
    if load_from is not None:
        engine.load_checkpoint(load_from)
    losses = []
    for step in steps:
        x = batch(0, step, 0)
        loss = engine(input_ids=x, labels=x).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    if save_to is not None:
        engine.save_checkpoint(save_to)
    engine.destroy()
    return losses


@pytest.mark.parametrize("first,second", [("triton", "off"), ("off", "triton")])
def test_resume_across_fused_kernels_modes_continues_the_run(tmp_path, first, second):
    """Save under one fused_kernels mode, resume under the other: the losses continue those of
    an uninterrupted torch run (Triton is interpreted here; it matches torch to ~1e-7)."""
    pytest.importorskip("triton")
    base = {"train_micro_batch_size_per_gpu": 2, "gradient_clipping": 0.05,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.01}},
            "zero_optimization": {"stage": 1}}
    reference = _train({**base, "fused_kernels": "off"}, range(4))
    head = _train({**base, "fused_kernels": first}, range(2), save_to=tmp_path)
    tail = _train({**base, "fused_kernels": second}, range(2, 4), load_from=tmp_path)
    assert head + tail == pytest.approx(reference, rel=1e-5)
    assert tail[-1] != pytest.approx(_train({**base, "fused_kernels": "off"}, range(2, 4))[-1], rel=1e-6)


# ---- the gradient-download schedule ([Note: gradient download]) ---------------------------
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=("fp32", "bf16"))
@pytest.mark.parametrize("c", (1.0, 0.5, 0.37))
def test_double_buffered_download_is_bit_identical_to_torch(dtype, c):
    """The slot schedule the CUDA path uses (download i+1 while i updates, two slots), run
    with host copies: every sub-group must read its own gradients, never the other slot's."""
    import test_offload_grad_pass as gp

    original = gp.CpuOffload.stage_downloads
    gp.CpuOffload.stage_downloads = True
    try:
        offload, *rest = gp._run(dtype, c, None)
    finally:
        gp.CpuOffload.stage_downloads = original
    assert len(offload.plan) >= 3   # slots are reused (the schedule is exercised)
    gp._assert_bit_identical(offload, *rest)


# ---- a CPU run calls no CUDA API ------------------------------------------------------------
_CUDA_APIS = ("is_available", "device_count", "current_device", "set_device", "Stream", "Event",
              "current_stream", "stream", "synchronize", "get_rng_state", "get_rng_state_all",
              "set_rng_state", "set_rng_state_all", "get_device_name", "max_memory_allocated")


def _forbid_cuda(monkeypatch, allow_is_available: bool = False):
    def forbidden(name):
        def call(*_a, **_k):
            raise AssertionError(f"a CPU run called torch.cuda.{name}")
        return call

    for name in _CUDA_APIS:
        monkeypatch.setattr(torch.cuda, name, forbidden(name))
    if allow_is_available:   # a meta model must ask whether a GPU exists to pick its device
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.mark.parametrize("offload", ("cpu", "nvme"))
def test_a_cpu_run_takes_no_cuda_branch(monkeypatch, tmp_path, offload):
    """Stage 3, bf16, optimizer and parameter offload, step timers, checkpoint save + load: no
    torch.cuda call at all when the parameters are on the CPU (the old code asked
    torch.cuda.is_available() to decide pinning, the refusal and the RNG)."""
    _forbid_cuda(monkeypatch)
    (tmp_path / "swap").mkdir()
    offload_cfg = {"device": offload, "nvme_path": str(tmp_path / "swap")}
    config = {"train_micro_batch_size_per_gpu": 2, "bf16": {"enabled": True}, "wall_clock_breakdown": True,
              "steps_per_print": 1,
              "zero_optimization": {"stage": 3, "sub_group_size": 2000, "offload_optimizer": offload_cfg,
                                    "offload_param": offload_cfg}}
    losses = _train(config, range(2), save_to=tmp_path / "ckpt")
    resumed = _train(config, range(2, 3), load_from=tmp_path / "ckpt")
    assert all(torch.isfinite(torch.tensor(losses + resumed)))


def test_a_cpu_zero_init_run_only_asks_whether_cuda_exists(monkeypatch):
    _forbid_cuda(monkeypatch, allow_is_available=True)
    with hf_zero.zero_init(seed=5):
        model = tiny_gpt2()
    engine = hf_zero.initialize(model, {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 3}})
    x = batch(0, 0, 0)
    engine.backward(engine(input_ids=x, labels=x).loss)
    engine.step()
    assert engine.device == CPU


def test_step_timers_on_cuda_read_device_events_not_the_host_clock(monkeypatch):
    """On CUDA a phase is the elapsed time between two events recorded on the stream (read
    at the report), not how long the host took to queue it. Fake events stand in for CUDA's:
    each reports 250 ms between its pair whatever the host clock says."""
    from hf_zero.diagnostics.step_report import StepTimers

    class FakeEvent:
        def __init__(self, enable_timing=False):
            assert enable_timing
            self.synced = False

        def record(self, stream=None):
            pass

        def synchronize(self):
            self.synced = True

        def elapsed_time(self, end):
            assert end.synced, "read before the end event completed"
            return 250.0

    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    timers = StepTimers(CUDA0)
    for _ in range(2):
        with timers.phase("forward"):
            pass
        timers.steps += 1
    assert timers.summary()["time/forward_s"] == pytest.approx(0.25)
