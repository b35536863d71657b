"""One DeepSpeed rank's optimizer file -> hf_zero pieces (masters and Adam moments by parameter
range), plus the per-group values the manifest needs. Layout: deepspeed_layout.py."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from hf_zero.checkpoint.deepspeed_layout import (FlatPiece, check_slice_mappings, stage3_pieces,
                                                 stage12_pieces)
from hf_zero.checkpoint.files import CheckpointError

ADAM_STATES = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
_ADAM_KEYS = set(ADAM_STATES) | {"step"}
# Optimizer hyperparameters carried over per group (the loading run keeps its own for the rest).
HYPERPARAMETERS = ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize", "initial_lr")


@dataclass
class RankStates:
    """What one rank's file contributes: tensors keyed like hf_zero pieces, and per-group meta."""
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    index: dict[str, dict] = field(default_factory=dict)
    groups: list[dict] = field(default_factory=list)        # hyperparameters per optimizer group
    steps: list[Optional[float]] = field(default_factory=list)  # Adam's step per optimizer group
    group_classes: list[Optional[bool]] = field(default_factory=list)  # decoupled weight decay, if stated
    loss_scaler: dict = field(default_factory=dict)         # hf_zero's loss scaler state_dict

    def add(self, kind: str, name: str, start: int, tensor: torch.Tensor) -> None:
        key = f"{kind}/{name}/{start}"
        self.tensors[key] = tensor
        self.index[key] = {"kind": kind, "name": name, "start": start, "length": tensor.numel()}


def _group_meta(states: RankStates, group: dict, state: dict, where: str) -> None:
    unknown = sorted(set(state) - _ADAM_KEYS)
    if unknown:
        raise CheckpointError(f"{where}: optimizer state {unknown} is not Adam's; only Adam/AdamW "
                              "checkpoints can be imported")
    states.groups.append({k: list(v) if isinstance(v, tuple) else v for k, v in group.items() if k in HYPERPARAMETERS})
    step = state.get("step", group.get("step"))
    states.steps.append(float(step) if step is not None else None)
    decoupled = group.get("decoupled_weight_decay", group.get("adam_w_mode"))
    states.group_classes.append(bool(decoupled) if decoupled is not None else None)


def _add_pieces(states: RankStates, pieces: list[FlatPiece], master: torch.Tensor, state: dict) -> None:
    for p in pieces:
        states.add("master", p.name, p.param_start, master.narrow(0, p.local_start, p.length).float())
        for key in ADAM_STATES:
            value = state.get(key)
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                states.add(f"state.{key}", p.name, p.param_start, value.reshape(-1).narrow(0, p.local_start, p.length))


def read_stage12(optim: dict, param_shapes: list[dict], rank: int, where: Path) -> RankStates:
    """Stages 1/2 (``DeepSpeedZeroOptimizer``) and ``BF16_Optimizer``."""
    sd = optim["optimizer_state_dict"]
    masters = sd["single_partition_of_fp32_groups"]
    paddings = sd.get("group_paddings") or [0] * len(masters)
    alignment = sd.get("param_alignment_paddings")
    mappings = sd.get("param_slice_mappings")
    lean = "zero_stage" in sd   # the ZeRO optimizer stores partitions without their tail padding
    base = sd["base_optimizer_state"]
    if len(masters) != len(param_shapes):
        raise CheckpointError(f"{where}: {len(masters)} flat groups, the model states list {len(param_shapes)}")
    states = RankStates()
    for g, (master, shapes) in enumerate(zip(masters, param_shapes)):
        partition = master.numel() + (paddings[g] if lean else 0)
        pieces = stage12_pieces(shapes, alignment[g] if alignment else None, rank, partition,
                                master.numel(), f"{where} group {g}")
        check_slice_mappings(pieces, mappings[g] if mappings else None, f"{where} group {g}")
        if isinstance(base, dict):    # a torch optimizer state_dict: one flat parameter per group
            group = base["param_groups"][g]
            state = base["state"].get(group["params"][0], {})
        else:                         # elastic checkpoint: lean per-group states, no hyperparameters
            group, state = {"step": sd.get("base_optimizer_state_step")}, base[g]
        _group_meta(states, group, state, f"{where} group {g}")
        _add_pieces(states, pieces, master, state)
    return states


def read_stage3(optim: dict, param_shapes: list[dict], rank: int, world_size: int, where: Path) -> RankStates:
    """Stage 3: sub-groups of parameters partitioned one by one."""
    sd = optim["optimizer_state_dict"]
    flats = sd["fp32_flat_groups"]
    inner = sd["optimizer_state_dict"]
    if len(flats) != len(param_shapes):
        raise CheckpointError(f"{where}: {len(flats)} sub-groups, the model states list {len(param_shapes)}")
    order = [index for group in inner["param_groups"] for index in group["params"]]
    if len(order) != len(flats):
        raise CheckpointError(f"{where}: the optimizer lists {len(order)} sub-groups, the file holds {len(flats)}")
    states = RankStates()
    for group in inner["param_groups"]:
        first = inner["state"].get(group["params"][0], {}) if group["params"] else {}
        _group_meta(states, group, first, f"{where} param group {len(states.groups)}")
    for k, (flat, shapes) in enumerate(zip(flats, param_shapes)):
        pieces = stage3_pieces(shapes, rank, world_size, flat.numel(), f"{where} sub-group {k}")
        _add_pieces(states, pieces, flat, inner["state"].get(order[k], {}))
    return states


def read_stage3_frozen(model_states: dict, rank: int, world_size: int, where: Path) -> dict[str, tuple]:
    """Stage 3 frozen parameters: this rank's partition of each, name -> (param_start, tensor)."""
    shapes = model_states.get("frozen_param_shapes") or {}
    fragments = model_states.get("frozen_param_fragments") or {}
    out: dict[str, tuple] = {}
    for name, shape in shapes.items():
        if name not in fragments:
            raise CheckpointError(f"{where}: frozen parameter '{name}' has a shape but no data")
        pieces = stage3_pieces({name: shape}, rank, world_size, fragments[name].numel(), f"{where} '{name}'")
        for piece in pieces:   # none where this rank's partition is all padding
            out[name] = (piece.param_start, fragments[name].reshape(-1).narrow(0, 0, piece.length))
    return out
