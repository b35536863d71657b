"""Where each parameter's elements lie in a DeepSpeed rank's flat fp32 partitions (pure).

[Note: DeepSpeed's flat partitions] (learned from DeepSpeed 0.19's ``zero_to_fp32.py`` and
its stage 1/2/3 ``state_dict`` code; checked on the fixtures in tests/data/deepspeed_ckpts)

- **Stages 1 and 2** (``DeepSpeedZeroOptimizer``, and ``BF16_Optimizer`` for bf16 with fp32
  gradient accumulation): per optimizer param group, the parameters listed in
  ``param_shapes[g]`` (order matters) are flattened back to back, each followed by
  ``param_alignment_paddings[g][i]`` elements (absent: none), the whole padded to a multiple
  of the alignment and cut into ``world`` equal partitions of P elements: rank r holds flat
  elements [r*P, (r+1)*P). ``single_partition_of_fp32_groups[g]`` is rank r's partition;
  the ZeRO optimizer stores it without its tail padding (``group_paddings[g]``, non-zero on
  the last rank only), BF16_Optimizer with it. Adam's moments follow the same layout.
- **Stage 3**: parameters are partitioned one by one: a parameter of n elements gives each
  rank ceil(n / world) elements (the last rank's tail is padding); ``param_shapes[k]`` lists
  the parameters of sub-group k and ``fp32_flat_groups[k]`` is the concatenation of this
  rank's partitions of them, in that order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

from hf_zero.checkpoint.files import CheckpointError
from hf_zero.partition import overlap


@dataclass(frozen=True)
class FlatPiece:
    name: str           # parameter name
    param_start: int    # first element inside the flattened parameter
    local_start: int    # first element inside the rank's flat tensor (group / sub-group)
    length: int


def _numel(shape: Sequence[int]) -> int:
    return math.prod(shape)


def stage12_pieces(shapes: dict[str, Sequence[int]], paddings: Optional[Sequence[int]], rank: int,
                   partition_numel: int, stored_numel: int, where: str) -> list[FlatPiece]:
    """Pieces of one param group held by ``rank`` (stages 1/2). ``stored_numel``: elements of
    the rank's stored partition, checked to cover every piece."""
    paddings = list(paddings) if paddings is not None else [0] * len(shapes)
    if len(paddings) != len(shapes):
        raise CheckpointError(f"{where}: {len(paddings)} alignment paddings for {len(shapes)} parameters")
    pieces, offset = [], 0
    lo = rank * partition_numel
    for (name, shape), padding in zip(shapes.items(), paddings):
        numel = _numel(shape)
        start, length = overlap(offset, numel, lo, partition_numel)
        if length:
            pieces.append(FlatPiece(name, start - offset, start - lo, length))
        offset += numel + padding
    end = max((p.local_start + p.length for p in pieces), default=0)
    if end > stored_numel:
        raise CheckpointError(f"{where}: the partition holds {stored_numel} elements, the parameters need {end}; "
                              "the checkpoint does not match its own parameter shapes")
    return pieces


def stage12_total(shapes: dict[str, Sequence[int]], paddings: Optional[Sequence[int]]) -> int:
    """Flat elements of one group with per-parameter alignment, without the tail padding."""
    return sum(_numel(s) for s in shapes.values()) + sum(paddings or ())


def stage3_partition_numel(numel: int, world_size: int) -> int:
    return math.ceil(numel / world_size)


def stage3_pieces(shapes: dict[str, Sequence[int]], rank: int, world_size: int, stored_numel: int,
                  where: str) -> list[FlatPiece]:
    """Pieces of one stage-3 sub-group held by ``rank``."""
    pieces, local = [], 0
    for name, shape in shapes.items():
        numel = _numel(shape)
        part = stage3_partition_numel(numel, world_size)
        start, length = overlap(rank * part, part, 0, numel)
        if length:
            pieces.append(FlatPiece(name, start, local, length))
        local += part
    if local != stored_numel:
        raise CheckpointError(f"{where}: the sub-group holds {stored_numel} elements, its parameters "
                              f"partitioned over {world_size} ranks need {local}")
    return pieces


def check_slice_mappings(pieces: list[FlatPiece], mappings: Optional[dict], where: str) -> None:
    """Cross-check against DeepSpeed's own ``param_slice_mappings`` (name -> numel, start)."""
    if not mappings:
        return
    ours = {p.name: (p.length, p.local_start) for p in pieces}
    theirs = {name: (int(a.numel), int(a.start)) for name, a in mappings.items()}
    if ours != theirs:
        wrong = sorted(n for n in set(ours) | set(theirs) if ours.get(n) != theirs.get(n))
        raise CheckpointError(f"{where}: parameter layout disagrees with the checkpoint's param_slice_mappings "
                              f"for {wrong[:3]}; this DeepSpeed layout is not supported")
