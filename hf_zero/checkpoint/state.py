"""What a checkpoint reads from and writes into: the narrow interface the engine provides.

[Note: checkpoint interface]
``save.py`` and ``load.py`` see an engine only through :class:`CheckpointState`
(``engine.checkpoint_state()``; ``hf_zero/engine_checkpoint.py`` implements it), never
its stage, offload backend, masters or groups. The interface says:

- *what to save and where to load*, as pieces (layout.py's :class:`Piece`: a parameter's
  range inside one chunk of this rank's shard): the trainable pieces this rank owns, whose
  fp32 master and elementwise optimizer states are streamed with ``read`` / ``write``
  ([Note: streamed optimizer state] in offload/protocol.py), the stage-3 frozen pieces
  (``frozen_shard``), and the parameters that live whole in the module
  (``whole_parameters``);
- *who writes*: with replicas (``mics_shard_size``) only the first shard group writes the
  sharded pieces, and without optimizer partitioning (stage 0) only rank 0;
- *the scalar state*: the torch optimizer (hyperparameters per group and scalar states
  such as ``step``), the loss scaler, the LR scheduler, :class:`TrainingProgress`;
- *the metadata*: module, config, stage number, model dtype;
- *the moments around a load*: ``quiesce`` (no reduction in flight), ``params_loaded``
  (every rank gathers its full parameters again), ``frozen_shards_loaded``.

``tests/test_wiring.py`` checks that save.py and load.py use nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional, Protocol

import torch
from torch import nn

if TYPE_CHECKING:
    from hf_zero.checkpoint.layout import Piece
    from hf_zero.comm import Collectives
    from hf_zero.config import HfZeroConfig


@dataclass
class TrainingProgress:
    """Counters a checkpoint carries besides tensors."""

    global_steps: int
    micro_steps: int
    skipped_steps: int   # optimizer steps skipped on fp16 overflow
    # RNG states of ranks a loaded checkpoint had and this run lacks (kept for the next save,
    # so that going 2 -> 1 -> 2 ranks resumes exactly)
    carried_rng_states: dict[str, dict] = field(default_factory=dict)


class CheckpointState(Protocol):
    """An engine as save.py / load.py see it (see the module note)."""

    comm: "Collectives"                  # this rank, the world, object collectives
    module: nn.Module                    # names, shapes, whole parameters and buffers, metadata
    config: "HfZeroConfig"
    stage_number: int
    model_dtype: torch.dtype
    optimizer: torch.optim.Optimizer     # the torch optimizer over the masters
    loss_scaler: Any                     # state_dict() / load_state_dict()
    lr_scheduler: Optional[Any]
    writes_optimizer_pieces: bool        # save: this rank writes its trainable pieces
    writes_frozen_pieces: bool           # save: this rank writes its stage-3 frozen pieces

    def trainable_pieces(self) -> list["Piece"]:
        """This rank's pieces of trainable parameters (masters and optimizer states)."""

    def frozen_pieces(self) -> list["Piece"]:
        """This rank's pieces of stage-3 sharded frozen parameters (none below stage 3)."""

    def whole_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """Parameters in no sharded group (kept whole on every rank)."""

    def piece_kinds(self, piece: "Piece") -> list[tuple[str, torch.dtype]]:
        """("master", dtype) then (state key, dtype) of each elementwise optimizer state."""

    def read(self, kind: str, piece: "Piece") -> Iterator[torch.Tensor]:
        """``kind`` ("master" or a state key) of ``piece`` as consecutive 1D parts."""

    def write(self, kind: str, piece: "Piece", fill: Callable[[int, torch.Tensor], None]) -> None:
        """Store ``kind`` of ``piece``; ``fill(offset, part)`` writes each part (a master
        also writes the parameter chunk it shadows)."""

    def frozen_shard(self, piece: "Piece") -> torch.Tensor:
        """The 1D view of this rank's shard that holds frozen ``piece`` (read or filled in place)."""

    def prepare_states(self, keys: tuple[str, ...]) -> tuple[str, ...]:
        """Before loading states ``keys``: the elementwise state keys to fill (offload/protocol.py)."""

    def quiesce(self) -> None:
        """Wait for every gradient reduction in flight."""

    def clear_grads(self) -> None:
        """Drop accumulated gradients (a load replaces what they were computed from)."""

    def params_loaded(self) -> None:
        """Masters (and their parameter chunks) were written: make every rank's parameters whole."""

    def frozen_shards_loaded(self) -> None:
        """Frozen shards were written: nothing gathered from before may survive."""

    def progress(self) -> TrainingProgress:
        ...

    def restore_progress(self, progress: TrainingProgress) -> None:
        ...
