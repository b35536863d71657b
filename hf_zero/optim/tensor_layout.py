"""Whole-tensor quantities for optimizers that step flat shards: which part of which parameter
each master chunk holds, per-tensor sums across ranks, and whole tensors gathered on demand.

[Note: whole-tensor optimizers on shards]
hf_zero's optimizers step this rank's 1D master chunks, each a slice of a bucket of
parameters laid back to back ([Note: bucket-interleaved ownership] in partition.py). An
elementwise update (Adam, Lion, Adagrad) does not care where a parameter starts or ends.
Some updates need a whole-tensor quantity:

- Lamb's trust ratio needs ||w|| and ||update|| per parameter. Each rank sums the squares of
  its slices of every parameter; one all-reduce of 2 floats per parameter (fp32) completes
  them. Cost: 8 bytes x number of parameters per step, nothing proportional to the model.
- Muon orthogonalises each matrix's momentum update (Newton-Schulz on the whole matrix). The
  buckets holding Muon matrices are all-gathered in fp32, one bucket at a time; each rank
  orthogonalises the matrices its chunk overlaps and keeps its slice. Cost per step: an
  all-gather of 4 bytes x the elements of the buckets holding Muon matrices (about 2x a bf16
  parameter all-gather of them), one fp32 bucket of transient memory, and the Newton-Schulz
  work of a matrix repeated on every rank whose chunk it overlaps (about 1/N of the model's
  matrices per rank, plus the ones straddling chunk boundaries).

At stage 0 every rank holds whole buckets: no collective is needed. Optimizers that need
more than this (Adafactor's factored moments, Shampoo's preconditioners, L-BFGS's history)
are refused by name (optim/build.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from hf_zero.comm import Collectives


@dataclass(frozen=True)
class TensorSlice:
    param: int          # index into TensorLayout.names / shapes (same on every rank)
    chunk_start: int    # first element inside the master chunk
    param_start: int    # first element inside the flattened parameter
    length: int


class TensorLayout:
    names: list[str]                       # every trainable parameter, the same order on every rank
    shapes: list[torch.Size]
    slices: dict[int, list[TensorSlice]]   # id(master chunk) -> the parameter slices it holds

    def __init__(self, groups: list, masters: list[list[torch.Tensor]], rank: int,
                 comm: Optional[Collectives]):
        """``groups``: the engine's flat parameter groups; ``masters``: per group, per bucket,
        this rank's master chunk; ``comm``: the partition group (None when nothing is partitioned)."""
        from hf_zero.checkpoint.layout import true_numel, true_shape
        from hf_zero.partition import overlap

        self.comm = comm
        self.names, self.shapes = [], []
        self.slices = {id(m): [] for chunks in masters for m in chunks}
        self._buckets = []   # (group, plan, master chunk, [(param index, offset in bucket)])
        for gi, group in enumerate(groups):
            for bi, plan in enumerate(group.plans):
                chunk_start, chunk_len = plan.shard(rank)
                members = []
                for index, offset in zip(plan.param_indices, plan.param_offsets):
                    param = group.params[index]
                    pi = len(self.names)
                    self.names.append(group.names[index])
                    self.shapes.append(torch.Size(true_shape(param)))
                    members.append((pi, offset - plan.start))
                    start, length = overlap(offset, true_numel(param), chunk_start, chunk_len)
                    if length:
                        self.slices[id(masters[gi][bi])].append(
                            TensorSlice(pi, start - chunk_start, start - offset, length))
                self._buckets.append((plan, masters[gi][bi], members))

    def sum_squares(self, tensors: dict[int, list[torch.Tensor]]) -> torch.Tensor:
        """(K, num_params) fp32: for each of the K tensors laid out like each master
        (``tensors[id(master)]``), the sum of squares of every whole parameter, over all ranks."""
        first = next(iter(tensors.values()), [])
        device = first[0].device if first else torch.device("cpu")
        sums = torch.zeros(len(first), len(self.names), dtype=torch.float32, device=device)
        for key, values in tensors.items():
            for s in self.slices[key]:
                for row, value in enumerate(values):
                    sums[row, s.param] += value.narrow(0, s.chunk_start, s.length).float().square().sum()
        if self.comm is not None:
            self.comm.all_reduce_sum(sums)
        return sums

    def whole_tensors(self, values: dict[int, torch.Tensor], wanted: set[int]) -> dict[int, torch.Tensor]:
        """The whole parameters ``wanted`` (indices) that overlap this rank's chunks, shaped, from
        ``values`` (per master id, a 1D fp32 tensor laid out like the master). Buckets holding
        a wanted parameter are all-gathered (the same buckets on every rank)."""
        result: dict[int, torch.Tensor] = {}
        for plan, master, members in self._buckets:
            if not any(pi in wanted for pi, _ in members):
                continue
            chunk = values[id(master)]
            if self.comm is None:
                full = chunk                    # stage 0: the chunk is the whole bucket
            else:
                full = torch.empty(plan.padded_numel, dtype=chunk.dtype, device=chunk.device)
                self.comm.all_gather(full, chunk)
            mine = {s.param for s in self.slices[id(master)]}
            for pi, offset in members:
                if pi in wanted and pi in mine:
                    result[pi] = full.narrow(0, offset, self.shapes[pi].numel()).view(self.shapes[pi])
        return result


class TensorwiseOptimizer(torch.optim.Optimizer):
    """An optimizer over master chunks that needs the :class:`TensorLayout` (bound by the engine)."""

    layout: Optional[TensorLayout] = None

    def bind_layout(self, layout: TensorLayout) -> None:
        self.layout = layout

    def _require_layout(self) -> TensorLayout:
        if self.layout is None:
            raise RuntimeError(f"{type(self).__name__} steps hf_zero master chunks; build it through "
                               "hf_zero.initialize (config 'optimizer.type')")
        return self.layout
