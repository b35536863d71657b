"""Which slice of which parameter each rank's owned chunks hold (pure, world-size agnostic).

A checkpoint stores optimizer-side tensors (fp32 masters, Adam moments) as *pieces*: a
contiguous range of one flattened parameter. Pieces depend only on the saving run's layout;
a loading run asks, for each of its own pieces, which saved pieces overlap it. That is all
resharding to another world size, stage or bucket size needs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch

from hf_zero.partition import overlap

if TYPE_CHECKING:
    from hf_zero.stages.base import ParamGroup


@dataclass(frozen=True)
class Piece:
    group: int          # flat group index (= optimizer param group with trainable params)
    chunk: int          # bucket index in that group = index of the owned chunk tensor
    name: str           # parameter name (model.named_parameters())
    param_start: int    # first element of the piece inside the flattened parameter
    chunk_start: int    # first element of the piece inside the owned chunk
    length: int


def owned_pieces(groups: Sequence[ParamGroup], rank: int) -> list[Piece]:
    """Every (parameter, range) intersecting ``rank``'s owned chunks, padding excluded."""
    pieces = []
    for gi, group in enumerate(groups):
        for bi, plan in enumerate(group.plans):
            chunk_start, chunk_len = plan.shard(rank)
            for index, offset in zip(plan.param_indices, plan.param_offsets):
                numel = true_numel(group.params[index])
                start, length = overlap(offset, numel, chunk_start, chunk_len)
                if length:
                    pieces.append(Piece(gi, bi, group.names[index], start - offset, start - chunk_start, length))
    return pieces


def true_numel(p: torch.Tensor) -> int:
    """A parameter's element count, also while stage 3 holds it released (empty)."""
    return getattr(p, "ds_numel", None) or p.numel()


def true_shape(p: torch.Tensor) -> list[int]:
    return list(getattr(p, "ds_shape", None) or p.shape)


def piece_key(kind: str, name: str, param_start: int) -> str:
    """Tensor key inside a rank file, e.g. ``state.exp_avg/transformer.wte.weight/4096``."""
    return f"{kind}/{name}/{param_start}"
