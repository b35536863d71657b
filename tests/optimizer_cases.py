"""Rank functions for the optimizer parity tests: hf_zero's Lion / Adagrad / Lamb / Muon (built
from the config's optimizer block, DeepSpeed's names) and a user-passed torch optimizer,
against DDP + a per-tensor reference written here in plain torch (torch.optim.Adagrad / SGD
where torch has the optimizer). Same seed and data per rank; fp32; small buckets so that
parameters straddle the rank chunks.
"""

from __future__ import annotations

import math

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import hf_zero
from ds_corpus_cases import CORPUS  # noqa: F401  (re-exported for the tests)
from parity_cases import MICRO, batch, full_params, tiny_gpt2, train_steps

NUM_STEPS = 3
CONFIG_PARAMS = {
    "Lion": {"lr": 1e-3, "betas": [0.9, 0.99], "weight_decay": 0.1},
    "Adagrad": {"lr": 1e-2, "eps": 1e-10, "weight_decay": 0.01},
    "Lamb": {"lr": 1e-2, "betas": [0.9, 0.999], "eps": 1e-6, "weight_decay": 0.01, "max_coeff": 10.0,
             "min_coeff": 0.01},
    # eps 1e-6, not DeepSpeed's 1e-10: see [Note: why eps=1e-6] in parity_cases.py (GPT-2's key bias).
    "Muon": {"lr": 2e-2, "adam_lr": 1e-3, "momentum": 0.95, "weight_decay": 0.01, "eps": 1e-6},
    # DeepSpeed's 0 for reduce_bucket_size / allgather_bucket_size / sub_group_size (transformers'
    # and axolotl's ZeRO-3 configs), with CPU offload: every parameter its own bucket.
    "AdamW-size0": {"lr": 1e-3, "eps": 1e-6, "weight_decay": 0.01},
}


# ---- per-tensor references (whole parameters, as a single-GPU user would write them) ----------
def ref_lion(params, state, hp):
    b1, b2 = hp["betas"]
    for p in params:
        m = state.setdefault(p, torch.zeros_like(p))
        update = torch.sign(b1 * m + (1 - b1) * p.grad)
        p.data = p.data * (1 - hp["lr"] * hp["weight_decay"]) - hp["lr"] * update
        state[p] = b2 * m + (1 - b2) * p.grad


def ref_lamb(params, state, hp, step):
    b1, b2 = hp["betas"]
    for p in params:
        m, v = state.setdefault(p, (torch.zeros_like(p), torch.zeros_like(p)))
        m = b1 * m + (1 - b1) * p.grad
        v = b2 * v + (1 - b2) * p.grad ** 2
        state[p] = (m, v)
        u = m / (v.sqrt() + hp["eps"]) + hp["weight_decay"] * p.data
        w_norm, u_norm = p.data.norm().item(), u.norm().item()
        ratio = min(max(w_norm / u_norm, hp["min_coeff"]), hp["max_coeff"]) if w_norm and u_norm else 1.0
        step_size = hp["lr"] * math.sqrt(1 - b2 ** step) / (1 - b1 ** step)
        p.data = p.data - step_size * ratio * u


def ref_newton_schulz(g):
    x = g.T if g.shape[0] > g.shape[1] else g
    x = x / (torch.linalg.matrix_norm(x) + 1e-7)
    for _ in range(5):
        a = x @ x.T
        x = 3.4445 * x + (-4.7750 * a + 2.0315 * a @ a) @ x
    x = x.T if g.shape[0] > g.shape[1] else x
    return x * max(1.0, g.shape[0] / g.shape[1]) ** 0.5


def ref_muon(named, state, hp, step):
    """DeepSpeed's split: matrices not named embed/lm_head -> Muon, the rest -> Adam (0.9, 0.95)."""
    mom, wd = hp["momentum"], hp["weight_decay"]
    for name, p in named:
        g = p.grad
        if p.ndim >= 2 and "embed" not in name and "lm_head" not in name:
            buf = mom * state.get(p, torch.zeros_like(p)) + (1 - mom) * g
            state[p] = buf
            update, lr = ref_newton_schulz((1 - mom) * g + mom * buf), hp["lr"]
        else:
            m, v = state.get(p, (torch.zeros_like(p), torch.zeros_like(p)))
            m, v = 0.9 * m + 0.1 * g, 0.95 * v + 0.05 * g * g
            state[p] = (m, v)
            update, lr = (m / (1 - 0.9 ** step)) / ((v / (1 - 0.95 ** step)).sqrt() + hp["eps"]), hp["adam_lr"]
        p.data = p.data * (1 - lr * wd) - lr * update


def run_reference(rank: int, kind: str):
    model = tiny_gpt2()
    ddp = DDP(model)
    hp = dict(CONFIG_PARAMS.get(kind, {}))
    if "betas" in hp:
        hp["betas"] = tuple(hp["betas"])
    torch_opt = None
    if kind == "Adagrad":
        torch_opt = torch.optim.Adagrad(model.parameters(), **hp)
    elif kind == "SGD":
        torch_opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    elif kind == "AdamW-size0":
        torch_opt = torch.optim.AdamW(model.parameters(), **hp)
    state, losses = {}, []
    for step in range(1, NUM_STEPS + 1):
        x = batch(rank, step, 0)
        loss = ddp(input_ids=x, labels=x).loss
        loss.backward()
        losses.append(loss.item())
        with torch.no_grad():
            if torch_opt is not None:
                torch_opt.step()
            elif kind == "Lion":
                ref_lion(list(model.parameters()), state, hp)
            elif kind == "Lamb":
                ref_lamb(list(model.parameters()), state, hp, step)
            else:
                ref_muon(list(model.named_parameters()), state, hp, step)
        model.zero_grad()
    return losses, full_params(model)


def run_hf_zero(rank: int, world: int, kind: str, stage: int):
    model = tiny_gpt2()
    config = {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": 1, "gradient_clipping": 0.0,
              "zero_optimization": {"stage": stage, "reduce_bucket_size": 3000, "allgather_bucket_size": 5000,
                                    "stage3_param_persistence_threshold": 100}}
    optimizer = None
    if kind == "SGD":   # the client-optimizer path: any elementwise torch optimizer
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    elif kind == "AdamW-size0":
        config["optimizer"] = {"type": "AdamW", "params": CONFIG_PARAMS[kind]}
        config["zero_optimization"].update(reduce_bucket_size=0, allgather_bucket_size=0, sub_group_size=0,
                                           offload_optimizer={"device": "cpu"})
    else:
        config["optimizer"] = {"type": kind.lower(), "params": CONFIG_PARAMS[kind]}   # DeepSpeed: any case
    engine = hf_zero.initialize(model, config, optimizer=optimizer)
    losses = []
    for step in range(1, NUM_STEPS + 1):
        x = batch(rank, step, 0)
        loss = engine(input_ids=x, labels=x).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    engine.destroy()
    return losses, full_params(model)


def optimizer_grid(rank: int, world: int) -> dict:
    out = {}
    for kind in ("Lion", "Adagrad", "Lamb", "Muon", "SGD", "AdamW-size0"):
        ref_losses, ref_params = run_reference(rank, kind)
        for stage in (0, 1, 2, 3) if kind != "AdamW-size0" else (1, 2, 3):
            losses, params = run_hf_zero(rank, world, kind, stage)
            diff = max(((params[n] - ref_params[n]).abs().max().item(), n) for n in ref_params)
            moved = max((ref_params[n] - p).abs().max().item() for n, p in full_params(tiny_gpt2()).items())
            out[(kind, stage)] = (ref_losses, losses, diff, moved)
    return out


def resume_case(rank: int, kind: str) -> tuple[list[float], list[float]]:
    """Train 2 steps at stage 1, save, continue 2 steps; resume the checkpoint at stage 3 with
    other buckets (other shard boundaries) and run the same 2 steps: the losses must agree."""
    import tempfile

    config = {"train_micro_batch_size_per_gpu": MICRO, "gradient_clipping": 0.0,
              "optimizer": {"type": kind, "params": CONFIG_PARAMS[kind]},
              "zero_optimization": {"stage": 1, "reduce_bucket_size": 3000}}

    def train(engine, steps):
        return train_steps(engine, rank, steps)

    engine = hf_zero.initialize(tiny_gpt2(), config)
    train(engine, range(2))
    directory = [tempfile.mkdtemp() if rank == 0 else None]
    torch.distributed.broadcast_object_list(directory)
    engine.save_checkpoint(directory[0])
    continued = train(engine, range(2, 4))
    engine.destroy()
    resumed_engine = hf_zero.initialize(tiny_gpt2(seed=5), {**config, "zero_optimization": {
        "stage": 3, "reduce_bucket_size": 5000, "stage3_param_persistence_threshold": 100}})
    resumed_engine.load_checkpoint(directory[0])
    return continued, train(resumed_engine, range(2, 4))


def all_cases(rank: int, world: int) -> dict:
    """One spawn for test_optimizers.py: the optimizer grid, resumes, the corpus Trainer runs."""
    from ds_corpus_cases import trainer_corpus_runs

    resumes = {("resume", kind): resume_case(rank, kind) for kind in ("Lamb", "Muon")}
    return {**optimizer_grid(rank, world), **resumes, **trainer_corpus_runs(rank, world)}
