"""Point an optimizer at master chunks: build one from the config, or rebind the user's."""

from __future__ import annotations

from typing import Optional

import torch

from hf_zero.config.schema import AUTO, OptimizerConfig, OptimizerParams


def _fused_supported(device: torch.device) -> bool:
    # torch ships fused Adam/AdamW kernels for CPU and CUDA; other backends use foreach.
    return device.type in ("cpu", "cuda")


def _pick(value, default):
    return default if value is None else value


def _optimizer_class_and_kwargs(kind: str, p: OptimizerParams, device: torch.device) -> tuple[type, dict]:
    """DeepSpeed's type name -> (class, constructor arguments), with DeepSpeed's per-type defaults.
    1-bit types (accepted only with allow_unhonoured_keys) run uncompressed."""
    from hf_zero.optim.lamb import Lamb
    from hf_zero.optim.lion import Lion
    from hf_zero.optim.muon import Muon

    if kind in ("Adam", "AdamW", "OneBitAdam", "ZeroOneAdam"):
        decoupled = kind == "AdamW" or p.adam_w_mode
        return (torch.optim.AdamW if decoupled else torch.optim.Adam,
                dict(lr=_pick(p.lr, 1e-3), betas=_pick(p.betas, (0.9, 0.999)), eps=_pick(p.eps, 1e-8),
                     weight_decay=p.weight_decay, amsgrad=p.amsgrad, fused=_fused_supported(device) or None))
    if kind in ("Lamb", "OneBitLamb"):
        return Lamb, dict(lr=_pick(p.lr, 1e-3), betas=_pick(p.betas, (0.9, 0.999)), eps=_pick(p.eps, 1e-8),
                          weight_decay=p.weight_decay, bias_correction=p.bias_correction, max_coeff=p.max_coeff,
                          min_coeff=p.min_coeff)
    if kind == "Lion":
        return Lion, dict(lr=_pick(p.lr, 1e-3), betas=_pick(p.betas, (0.9, 0.99)), weight_decay=p.weight_decay)
    if kind == "Adagrad":
        return torch.optim.Adagrad, dict(lr=_pick(p.lr, 1e-2), eps=_pick(p.eps, 1e-10),
                                         weight_decay=p.weight_decay, lr_decay=p.lr_decay,
                                         initial_accumulator_value=p.initial_accumulator_value)
    if kind == "Muon":
        # DeepSpeed: muon_lr / adam_lr override lr for their half; lr alone sets both.
        return Muon, dict(lr=_pick(p.muon_lr, _pick(p.lr, 0.02)), adam_lr=_pick(p.adam_lr, _pick(p.lr, 3e-4)),
                          momentum=p.momentum, weight_decay=p.weight_decay, betas=_pick(p.betas, (0.9, 0.95)),
                          eps=_pick(p.eps, 1e-10))
    raise ValueError(f"internal: optimizer type {kind!r} passed validation but has no builder")


def build_optimizer(config: Optional[OptimizerConfig], master_groups: list[list[torch.Tensor]],
                    group_options: list[dict]) -> torch.optim.Optimizer:
    """The config's optimizer over ``master_groups`` (DeepSpeed's ``Adam`` means AdamW unless
    ``adam_w_mode`` is false). Per-group options win."""
    from hf_zero.config.parse import ConfigError

    config = config or OptimizerConfig()
    p = config.params
    autos = [n for n in ("lr", "betas", "eps", "weight_decay") if getattr(p, n) == AUTO]
    if autos:
        raise ConfigError([(f"optimizer.params.{n}", "is still 'auto'; an integration must resolve it")
                           for n in autos])
    device = next((t.device for g in master_groups for t in g), torch.device("cpu"))
    cls, kwargs = _optimizer_class_and_kwargs(config.type, p, device)
    groups = [{"params": params, **options} for params, options in zip(master_groups, group_options)]
    return cls(groups, **kwargs)


# torch optimizers whose update is not elementwise: on hf_zero's flat 1D shards they would
# silently compute something else (Adafactor would not factor, Muon refuses 1D tensors).
_WHOLE_TENSOR = {
    "Adafactor": "its second moment is factored over each matrix's rows and columns",
    "Muon": "it orthogonalises each whole matrix (use the config's optimizer type 'Muon', which gathers them)",
    "LBFGS": "its curvature history and line search span the whole model",
    "SparseAdam": "it needs sparse gradients; hf_zero reduces dense ones",
    "Shampoo": "its preconditioners are per-matrix (Kronecker factors of each whole tensor)",
    "DistributedShampoo": "its preconditioners are per-matrix (Kronecker factors of each whole tensor)",
    "SOAP": "its preconditioners are per-matrix (Kronecker factors of each whole tensor)",
    "MuonWithAuxAdam": "it orthogonalises each whole matrix (use the config's optimizer type 'Muon')",
    "SingleDeviceMuon": "it orthogonalises each whole matrix (use the config's optimizer type 'Muon')",
    "Lamb": "its trust ratio needs each whole tensor's norms (use the config's optimizer type 'Lamb')",
    "LAMB": "its trust ratio needs each whole tensor's norms (use the config's optimizer type 'Lamb')",
    "FusedLamb": "its trust ratio needs each whole tensor's norms (use the config's optimizer type 'Lamb')",
    "FusedLAMB": "its trust ratio needs each whole tensor's norms (use the config's optimizer type 'Lamb')",
    "LARS": "its trust ratio needs each whole tensor's norms",
    "Lars": "its trust ratio needs each whole tensor's norms",
}


def check_optimizer_is_fresh(optimizer: torch.optim.Optimizer) -> None:
    """A user's optimizer must not have stepped (its state is per full parameter) and must be
    elementwise (it will step flat shards)."""
    from hf_zero.optim.tensor_layout import TensorwiseOptimizer

    reason = _WHOLE_TENSOR.get(type(optimizer).__name__)
    if reason is not None and not isinstance(optimizer, TensorwiseOptimizer):   # hf_zero's own Lamb/Muon: fine
        raise ValueError(f"hf_zero cannot step {type(optimizer).__name__} over sharded parameters: {reason}. "
                         "Pass an elementwise optimizer (AdamW, SGD, Adagrad, Lion, ...) or set the config's "
                         "optimizer type (Lamb and Muon gather what they need per tensor)")
    if any(s and float(s.get("step", 1)) > 0 for s in optimizer.state.values()):   # Adagrad's fresh state: step 0
        raise ValueError("pass the optimizer to hf_zero.initialize before its first step "
                         "(its existing state cannot be partitioned)")


def rebind_optimizer(optimizer: torch.optim.Optimizer, master_groups: list[list[torch.Tensor]]) -> None:
    """Make a user's optimizer step the master chunks instead of the model's parameters
    (its class, hyperparameters and group structure are kept; it must be elementwise)."""
    if len(optimizer.param_groups) != len(master_groups):
        raise ValueError("internal: optimizer groups and flat groups disagree")
    check_optimizer_is_fresh(optimizer)
    optimizer.state.clear()
    for group, masters in zip(optimizer.param_groups, master_groups):
        group["params"] = list(masters)
        if isinstance(optimizer, torch.optim.Adagrad):   # it creates its state in __init__, not lazily
            for master in masters:
                optimizer.state[master] = {"step": torch.zeros((), dtype=torch.float32),
                                           "sum": torch.full_like(master, group["initial_accumulator_value"])}


def bind_tensor_layout(inner: torch.optim.Optimizer, stage, flat_groups: list,
                       masters: list[list[torch.Tensor]]) -> None:
    """Give an optimizer that needs whole-tensor quantities (Lamb, Muon) the layout of the
    shards ([Note: whole-tensor optimizers on shards] in tensor_layout.py)."""
    from hf_zero.optim.tensor_layout import TensorLayout, TensorwiseOptimizer

    if isinstance(inner, TensorwiseOptimizer):
        comm = stage.comm if stage.partitions_optimizer and stage.comm.active else None
        inner.bind_layout(TensorLayout(flat_groups, masters, stage.partition_rank, comm))
