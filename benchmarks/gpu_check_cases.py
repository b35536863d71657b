"""The engine cases of ``make gpu-check`` (benchmarks/gpu_check.py; docs/gpu.md walks through them).

Each function runs on this process's ``device`` (and process group, when one exists) and
returns table rows. References are independent of hf_zero: plain torch (world 1) or DDP
(world 2) with torch.optim.AdamW and clip_grad_norm_ on the same batches; from_pretrained
is checked against the weights transformers saved.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

import hf_zero

LR, EPS, WD, CLIP = 1e-3, 1e-6, 0.01, 0.05
MICRO, SEQ = 4, 64
FP32_RTOL, BF16_RTOL = 1e-4, 2e-2   # loss vs an fp32 reference: reduction order / bf16 parameters


@dataclass
class Row:
    check: str
    case: str
    result: str
    figure: str = ""
    ok: Optional[bool] = True    # None: information only (does not fail the check)


def gpt2_config(quick: bool):
    from transformers import GPT2Config

    n_embd = 64 if quick else 256
    return GPT2Config(vocab_size=512 if quick else 8192, n_positions=SEQ, n_embd=n_embd, n_layer=2,
                      n_head=4, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                      eos_token_id=0)


def build_model(quick: bool, seed: int = 0) -> torch.nn.Module:
    from transformers import GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(gpt2_config(quick))


def batch(step: int, rank: int, vocab: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randint(0, vocab, (MICRO, SEQ), generator=g).to(device)


@contextlib.contextmanager
def shared_tempdir():
    """One temporary directory every rank sees (rank 0's path), removed after all are done."""
    rank, world = _rank_world()
    path = [tempfile.mkdtemp(prefix="hf_zero_gpu_check_") if rank == 0 else None]
    if world > 1:
        dist.broadcast_object_list(path)
    try:
        yield path[0]
    finally:
        if world > 1:
            dist.barrier()
        if rank == 0:
            shutil.rmtree(path[0], ignore_errors=True)


def gathered(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter whole, on the host (a collective at stage 3)."""
    with hf_zero.GatheredParameters(list(model.parameters())):
        return {n: p.detach().float().cpu().clone() for n, p in model.named_parameters()}


def _rank_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def reference_losses(device: torch.device, quick: bool, steps: int) -> list[float]:
    """fp32 torch (DDP at world > 1), AdamW with clipping: what every engine row is held to."""
    rank, world = _rank_world()
    model = build_model(quick).to(device)
    wrapped = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    opt = torch.optim.AdamW(model.parameters(), lr=LR, eps=EPS, weight_decay=WD)
    losses = []
    for step in range(steps):
        x = batch(step, rank, model.config.vocab_size, device)
        loss = wrapped(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        opt.zero_grad()
        losses.append(_mean_over_ranks(loss.detach().float()))
    return losses


def _mean_over_ranks(loss: torch.Tensor) -> float:
    if dist.is_initialized() and dist.get_world_size() > 1:
        loss = loss.clone()
        dist.all_reduce(loss)
        loss /= dist.get_world_size()
    return float(loss.item())


def engine_config(stage: int, bf16: bool, offload: str, swap: str, fused: str = "auto") -> dict:
    zero: dict = {"stage": stage, "reduce_bucket_size": 200_000, "allgather_bucket_size": 200_000,
                  "stage3_prefetch_bucket_size": 200_000, "stage3_param_persistence_threshold": 1000,
                  "sub_group_size": 300_000}
    offload, _, ratio = offload.partition("@")   # "cpu@0.5": offload_optimizer.ratio 0.5
    if offload != "none":
        zero["offload_optimizer"] = {"device": offload, "nvme_path": swap, "ratio": float(ratio or 1.0)}
        if stage == 3:
            zero["offload_param"] = {"device": offload, "nvme_path": swap}
    # (an explicit "auto" is refused by the config parser today: the default is "auto", so omit it)
    modes = {} if fused == "auto" else {"fused_kernels": fused}
    return {"train_micro_batch_size_per_gpu": MICRO, "gradient_clipping": CLIP, "bf16": {"enabled": bf16},
            **modes, "steps_per_print": 10**9,
            "optimizer": {"type": "AdamW", "params": {"lr": LR, "eps": EPS, "weight_decay": WD}},
            "zero_optimization": zero}


def train_engine(device: torch.device, quick: bool, config: dict, steps: range, load_dir: Optional[str] = None,
                 save_dir: Optional[str] = None) -> tuple[list[float], Optional[int]]:
    """Losses of ``steps`` under the engine, and the device's peak allocated bytes (CUDA)."""
    rank, _ = _rank_world()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    model = build_model(quick).to(device)
    engine = hf_zero.initialize(model, config)
    if load_dir is not None:
        engine.load_checkpoint(load_dir)
    losses = []
    for step in steps:
        x = batch(step, rank, model.config.vocab_size, device)
        loss = engine(input_ids=x, labels=x).loss
        engine.backward(loss)
        engine.step()
        losses.append(_mean_over_ranks(loss.detach().float()))
    if save_dir is not None:
        engine.save_checkpoint(save_dir)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    engine.destroy()
    return losses, peak


def close(a: list[float], b: list[float], rtol: float) -> tuple[bool, float]:
    worst = max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b))
    return len(a) == len(b) and worst <= rtol, worst


def estimated_device_bytes(quick: bool, world: int, stage: int, offload: str, bf16: bool) -> float:
    from hf_zero.diagnostics.estimator import estimate
    from hf_zero.diagnostics.report import model_shape

    shape = model_shape(gpt2_config(quick))
    return estimate(shape, world, stage, offload.partition("@")[0], mixed=bf16, micro_batch=MICRO, seq=SEQ,
                    reduce_bucket_size=200_000, prefetch_bucket_size=200_000).device_total


def engine_grid(device: torch.device, quick: bool, cases: list[tuple[int, bool, str]], steps: int = 4) -> list[Row]:
    """Each (stage, bf16, offload) against the fp32 reference; peak memory against ``estimate``."""
    _, world = _rank_world()
    reference = reference_losses(device, quick, steps)
    rows = []
    for stage, bf16, offload in cases:
        with tempfile.TemporaryDirectory(prefix="hf_zero_gpu_check_") as swap:
            losses, peak = train_engine(device, quick, engine_config(stage, bf16, offload, swap), range(steps))
        ok, worst = close(losses, reference, BF16_RTOL if bf16 else FP32_RTOL)
        name = f"world {world}, stage {stage}, {'bf16' if bf16 else 'fp32'}, offload {offload}"
        check = "engine vs torch" if world == 1 else f"engine vs DDP ({dist.get_backend()})"
        rows.append(Row(check, name,
                        f"max loss rel diff {worst:.1e} over {steps} steps", "", ok))
        if peak is not None:
            est = estimated_device_bytes(quick, world, stage, offload, bf16)
            rows.append(Row("max_memory_allocated vs estimate", name,
                            f"{peak / 2**20:.1f} MiB measured, {est / 2**20:.1f} MiB estimated",
                            f"ratio {peak / est:.2f}", None))
    return rows


def construction(device: torch.device, quick: bool) -> list[Row]:
    """zero_init (stage 3 shards vs the same seed materialised whole) and from_pretrained
    (slices read by each rank vs the weights transformers saved), under this process's group
    (NCCL on a GPU: the seed broadcast goes through the GPU)."""
    _, world = _rank_world()
    base = {"train_micro_batch_size_per_gpu": MICRO, "zero_optimization": {"stage": 3}}
    with hf_zero.zero_init(seed=11):
        sharded = build_model(quick)
    engine = hf_zero.initialize(sharded, base)
    on_device = engine.device == device
    shards = gathered(sharded)
    engine.destroy()
    with hf_zero.zero_init(seed=11):
        whole = build_model(quick)
    engine = hf_zero.initialize(whole, {**base, "zero_optimization": {"stage": 0}})
    equal = all(torch.equal(shards[n], p.detach().float().cpu()) for n, p in whole.named_parameters())
    engine.destroy()
    rows = [Row("zero_init", f"world {world}, stage 3 vs stage 0, same seed",
                "identical" if equal else "DIFFERENT", f"engine device {device}: {on_device}", equal and on_device)]

    saved = build_model(quick, seed=3)
    with shared_tempdir() as path:
        if _rank_world()[0] == 0:
            saved.save_pretrained(path)
        if world > 1:
            dist.barrier()
        loaded = hf_zero.from_pretrained(path)
        engine = hf_zero.initialize(loaded, base)
        got = gathered(loaded)
        engine.destroy()
    want = dict(saved.named_parameters())
    same = bool(got) and all(torch.equal(got[n], want[n].detach().float()) for n in got)
    rows.append(Row("from_pretrained", f"world {world}, stage 3", "identical to saved" if same else "DIFFERENT",
                    f"{len(got)} tensors", same))
    return rows


def resume_across_modes(device: torch.device, quick: bool, pairs: list[tuple[str, str]], steps: int = 4) -> list[Row]:
    """Save under one fused_kernels mode after half the steps, resume under the other: the
    losses must continue those of an uninterrupted run."""
    rows = []
    half = steps // 2
    for bf16 in (False, True):
        full, _ = train_engine(device, quick, engine_config(1, bf16, "none", ""), range(steps))
        for first, second in pairs:
            with shared_tempdir() as ckpt:
                head, _ = train_engine(device, quick, engine_config(1, bf16, "none", "", first), range(half),
                                       save_dir=ckpt)
                tail, _ = train_engine(device, quick, engine_config(1, bf16, "none", "", second),
                                       range(half, steps), load_dir=ckpt)
            ok, worst = close(head + tail, full, BF16_RTOL if bf16 else FP32_RTOL)
            rows.append(Row("resume across fused_kernels", f"{first} -> {second}, {'bf16' if bf16 else 'fp32'}",
                            f"max loss rel diff {worst:.1e} vs uninterrupted", "", ok))
    return rows
