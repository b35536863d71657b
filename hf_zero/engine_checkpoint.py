"""The engine's side of the checkpoint interface (hf_zero/checkpoint/state.py's [Note:
checkpoint interface]): the one place that knows which engine parts a checkpoint touches."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional

import torch
from torch import nn

from hf_zero.checkpoint.layout import Piece, owned_pieces
from hf_zero.checkpoint.state import TrainingProgress
from hf_zero.comm import HybridCollectives

if TYPE_CHECKING:
    from hf_zero.engine import ZeroEngine


class EngineCheckpointState:
    """:class:`hf_zero.checkpoint.state.CheckpointState` over a :class:`ZeroEngine`, built per
    save / load (the engine's scheduler and counters are read when it is built)."""

    def __init__(self, engine: "ZeroEngine"):
        self._engine = engine
        self._stage, self._offload = engine.stage, engine.offload
        # Stage 3's ShardedParamGroups (shard_chunks, refresh); the base interface types them
        # as FlatParamGroup, whose layout (plans, params, names) owned_pieces reads.
        self._frozen_groups: list[Any] = list(engine.stage.frozen_groups)
        self.comm = engine.comm
        self.module: nn.Module = engine.module
        self.config = engine.config
        self.stage_number: int = engine.stage.stage
        self.model_dtype: torch.dtype = engine.dtype
        self.optimizer: torch.optim.Optimizer = engine.optimizer.inner
        self.loss_scaler = engine.scaler
        self.lr_scheduler: Optional[Any] = engine.lr_scheduler
        # mics_shard_size: every shard group holds the same pieces; the first one writes them.
        # Stage 0 does not partition the optimizer: rank 0 writes everything.
        partition_comm = engine.partition_comm
        first_replica = not isinstance(partition_comm, HybridCollectives) or partition_comm.replica_rank == 0
        self.writes_optimizer_pieces = (self._stage.partitions_optimizer and first_replica) or self.comm.rank == 0
        self.writes_frozen_pieces = first_replica

    # ---- what to save, where to load --------------------------------------------------
    def trainable_pieces(self) -> list[Piece]:
        return owned_pieces(self._engine.flat_groups, self._stage.partition_rank)

    def frozen_pieces(self) -> list[Piece]:
        return owned_pieces(self._frozen_groups, self._stage.partition_rank)

    def whole_parameters(self) -> list[tuple[str, nn.Parameter]]:
        grouped = {id(p) for g in self._stage.parameter_groups() for p in g.params}
        return [(name, p) for name, p in self.module.named_parameters() if id(p) not in grouped]

    def piece_kinds(self, piece: Piece) -> list[tuple[str, torch.dtype]]:
        master = self._offload.masters.masters[piece.group][piece.chunk]
        kinds = [("master", master.dtype)]
        # The backend keeps torch's state layout (shapes, even where storage is swapped out).
        for key, value in self.optimizer.state.get(master, {}).items():
            if isinstance(value, torch.Tensor) and value.numel() == master.numel() and value.numel() > 1:
                kinds.append((key, value.dtype))
        return kinds

    def read(self, kind: str, piece: Piece) -> Iterator[torch.Tensor]:
        return self._offload.read_state(kind, piece.group, piece.chunk, piece.chunk_start, piece.length)

    def write(self, kind: str, piece: Piece, fill: Callable[[int, torch.Tensor], None]) -> None:
        self._offload.write_state(kind, piece.group, piece.chunk, piece.chunk_start, piece.length, fill)

    def frozen_shard(self, piece: Piece) -> torch.Tensor:
        chunk = self._frozen_groups[piece.group].shard_chunks()[piece.chunk]
        return chunk.narrow(0, piece.chunk_start, piece.length)

    def prepare_states(self, keys: tuple[str, ...]) -> tuple[str, ...]:
        return self._offload.prepare_states(keys)

    # ---- the moments around a save / load ---------------------------------------------
    def quiesce(self) -> None:
        self._stage.wait_for_reductions()

    def clear_grads(self) -> None:
        self._stage.zero_grad()

    def params_loaded(self) -> None:
        self._stage.after_step()   # all-gather, so every rank holds full parameters again

    def frozen_shards_loaded(self) -> None:
        for group in self._frozen_groups:
            group.mark_shard_modified()   # nothing gathered (or hpZ's secondary copy) from before survives
            group.refresh()   # persistent frozen groups are kept gathered

    # ---- counters ---------------------------------------------------------------------
    def progress(self) -> TrainingProgress:
        engine = self._engine
        return TrainingProgress(engine.global_steps, engine.micro_steps, engine.optimizer.num_skipped_steps,
                                dict(engine.carried_rng_states))

    def restore_progress(self, progress: TrainingProgress) -> None:
        engine = self._engine
        engine.global_steps, engine.micro_steps = progress.global_steps, progress.micro_steps
        engine.optimizer.num_skipped_steps = progress.skipped_steps
        engine.carried_rng_states = progress.carried_rng_states
