"""Partial optimizer offload (``offload_optimizer.ratio`` < 1): which sub-groups stay on the device.

[Note: partial offload]
DeepSpeed (``stage3.py``, ``_create_fp32_partitions``) numbers a rank's optimizer sub-groups
0..n-1 and keeps sub-group i on the accelerator when ``i < int((1 - ratio) * n)``: the
first ones, by order, not by size; the rest are offloaded and updated by the CPU Adam. So
``ratio`` is the fraction of sub-groups offloaded, rounded towards more offload, and a rank
with a single sub-group offloads everything whatever the ratio. hf_zero uses the same
expression on its own sub-group plan (subgroups.py). A device sub-group's fp32 masters and
Adam states live with the parameters (allocated on their device, as the 'none' backend
would) and are updated there by the same torch kernel; an offloaded one lives in the cpu
or nvme storage as with full offload.

Sub-groups pack chunks in order, so the device part of each master chunk is a prefix of
it: elements [0, b) for the b that ``device_prefixes`` gives. A chunk wholly on the device
or wholly offloaded keeps torch's layout (``inner.state[master]`` holds the real tensors);
the one chunk that straddles the boundary (at most one per rank) keeps, in torch's layout,
tensors of its shape with 0-byte storage, as the nvme backend does, and its values in two
parts: the device prefix and the offloaded rest (``SplitChunk``). Checkpoints reach both
through ``read_state`` / ``write_state``, so their format does not depend on the ratio.
"""

from __future__ import annotations

from dataclasses import dataclass, field
import torch

from hf_zero.offload.subgroups import SubGroup


def device_sub_group_count(num_sub_groups: int, ratio: float) -> int:
    """How many leading sub-groups stay on the device: DeepSpeed's ``int((1 - ratio) * n)``."""
    return int((1 - ratio) * num_sub_groups)


def device_prefixes(plan: list[SubGroup], on_device: int) -> dict[tuple[int, int], int]:
    """(group, chunk) -> b: elements [0, b) of that master chunk are in the first ``on_device``
    sub-groups (chunks not listed are wholly offloaded)."""
    prefix: dict[tuple[int, int], int] = {}
    for sub_group in plan[:on_device]:
        for s in sub_group.slices:   # a chunk's slices come in order of their start
            prefix[(s.group, s.chunk)] = s.start + s.length
    return prefix


@dataclass
class SplitChunk:
    """The values of one master chunk straddling the device / offload boundary, per kind
    ("master" when the masters are copies, then the state keys)."""
    boundary: int                                                           # b: the device prefix's length
    on_device: dict[str, torch.Tensor] = field(default_factory=dict)       # kind -> elements [0, b)
    offloaded: dict[str, torch.Tensor] = field(default_factory=dict)   # kind -> [b, n) (nvme: 0-byte storage)
