"""``engine.load_checkpoint``: each rank reads only the slices its own layout needs.

Works across world sizes, stages and bucket sizes (see layout.py), and refuses, naming the
file or parameter, a checkpoint that is incomplete, corrupted or of another model.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch

from hf_zero.checkpoint.files import CheckpointError
from hf_zero.checkpoint.layout import Piece, true_shape
from hf_zero.checkpoint.reader import CheckpointReader, resolve_tag
from hf_zero.checkpoint.rng import restore_rng
from hf_zero.optim.fused_step import new_step_counter
from hf_zero.checkpoint.save import EVERY_RANK_WRITES, EVERY_RANK_WRITES_WHY, _persistent_buffers
from hf_zero.comm import rank_local_step
from hf_zero.presence import all_ranks_call

if TYPE_CHECKING:
    from hf_zero.checkpoint.state import CheckpointState
    from hf_zero.engine import ZeroEngine

logger = logging.getLogger(__name__)


def checkpoint_path(load_dir: Path, tag: Optional[str]) -> Path:
    tag = resolve_tag(load_dir, tag)
    path = load_dir / tag
    if not path.is_dir():
        # A crash between moving an overwritten checkpoint aside and renaming its successor
        # into place leaves the previous, complete one under .<tag>.old-*: use it.
        olds = sorted(load_dir.glob(f".{tag}.old-*"))
        if olds and (olds[-1] / "manifest.json").is_file():
            logger.warning("hf_zero: %s missing, recovering %s", path, olds[-1])
            return olds[-1]
        raise CheckpointError(f"no checkpoint directory {path}")
    return path


def _check_model_matches(reader: CheckpointReader, module: torch.nn.Module, path: Path) -> None:
    saved = reader.manifest["params"]
    current = {n: true_shape(p) for n, p in module.named_parameters()}
    missing = [n for n in current if n not in saved]
    unexpected = [n for n in saved if n not in current]
    wrong = [f"{n} {saved[n]['shape']} vs {current[n]}" for n in current
             if n in saved and saved[n]["shape"] != current[n]]
    if missing or unexpected or wrong:
        raise CheckpointError(f"{path} is a checkpoint of another model: missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}, shape mismatches {wrong[:3]}")


def _write_piece(state: "CheckpointState", reader: CheckpointReader, piece: Piece, key: str,
                 kind: Optional[str]) -> None:
    """Stream the saved ``kind`` of ``piece`` (zeros when None) into the backend's ``key``
    ([Note: streamed optimizer state] in hf_zero/offload/protocol.py)."""
    def fill(offset: int, part: torch.Tensor) -> None:
        if kind is None:
            part.zero_()
        else:
            reader.fill(part, kind, piece.name, piece.param_start + offset)

    state.write(key, piece, fill)


def _master_kind(reader: CheckpointReader, piece: Piece) -> str:
    # A parameter trainable now but frozen when saved starts from its saved weights.
    return "master" if reader.has("master", piece.name) else "frozen"


def _frozen_kind(reader: CheckpointReader, name: str) -> str:
    # A parameter frozen now but trainable when saved starts from its saved master.
    return "frozen" if reader.has("frozen", name) else "master"


def _load_masters(state: "CheckpointState", reader: CheckpointReader, pieces: list[Piece]) -> None:
    for piece in pieces:   # writing a master also writes its model-dtype parameter chunk
        _write_piece(state, reader, piece, "master", _master_kind(reader, piece))
    state.params_loaded()      # all-gather, so every rank holds full parameters again


def _load_module(state: "CheckpointState", reader: CheckpointReader) -> None:
    """What the module itself holds: stage-3 frozen shards (each rank reads the slices its
    shard holds), parameters kept whole, persistent buffers."""
    for piece in state.frozen_pieces():
        reader.fill(state.frozen_shard(piece), _frozen_kind(reader, piece.name), piece.name, piece.param_start)
    state.frozen_shards_loaded()
    for name, p in state.whole_parameters():
        reader.fill(p.data.view(-1), _frozen_kind(reader, name), name, 0)
    for name, b in _persistent_buffers(state.module).items():
        if reader.has("buffer", name):
            reader.fill(b.data.view(-1), "buffer", name, 0)


def _saved_state_keys(reader: CheckpointReader) -> tuple[str, ...]:
    return tuple(sorted({p["kind"].removeprefix("state.") for p in reader.manifest["pieces"].values()
                         if p["kind"].startswith("state.")}))


def _state_kind(reader: CheckpointReader, piece: Piece, key: str, saved_keys: tuple[str, ...]) -> Optional[str]:
    """The saved kind holding state ``key`` of ``piece``; None (start from zeros) when the
    checkpoint has no such state (saved before a step) or the parameter was frozen then."""
    return f"state.{key}" if key in saved_keys and reader.has("master", piece.name) else None


def _check_sources(reader: CheckpointReader, pieces: list[Piece], with_optimizer: bool) -> None:
    """Every file and range this rank will read is checked before the first write, so that a
    corrupted or incomplete checkpoint leaves the engine's state as it was."""
    saved_keys = _saved_state_keys(reader) if with_optimizer else ()
    for piece in pieces:
        kinds = [_master_kind(reader, piece)] + [_state_kind(reader, piece, key, saved_keys) for key in saved_keys]
        for kind in filter(None, kinds):
            reader.check(kind, piece.name, piece.param_start, piece.length)


def _check_module_sources(state: "CheckpointState", reader: CheckpointReader) -> None:
    """As _check_sources, for what the module itself reads: stage-3 frozen shards, unsharded
    parameters and persistent buffers."""
    for piece in state.frozen_pieces():
        reader.check(_frozen_kind(reader, piece.name), piece.name, piece.param_start, piece.length)
    for name, p in state.whole_parameters():
        reader.check(_frozen_kind(reader, name), name, 0, p.numel())
    for name, b in _persistent_buffers(state.module).items():
        if reader.has("buffer", name):
            reader.check("buffer", name, 0, b.numel())


def _check_optimizer(state: "CheckpointState", reader: CheckpointReader) -> None:
    meta, inner = reader.manifest["optimizer"], state.optimizer
    if meta["class"] != type(inner).__name__ or len(meta["param_groups"]) != len(inner.param_groups):
        raise CheckpointError(f"{reader.path}: optimizer {meta['class']} with {len(meta['param_groups'])} groups "
                              f"cannot load into {type(inner).__name__} with {len(inner.param_groups)} groups")


def _load_scalar_states(inner: torch.optim.Optimizer, meta: dict) -> None:
    """Hyperparameters per group and per-group scalar states (e.g. Adam's step count)."""
    for group, saved, scalars in zip(inner.param_groups, meta["param_groups"], meta["scalar_state"]):
        group.update({k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()})
        for master in group["params"]:
            per_param = inner.state[master]
            for key, s in scalars.items():
                if s["dtype"] is None:
                    per_param[key] = s["value"]
                elif key == "step":   # where this group's torch optimizer keeps it, whoever saved it
                    per_param[key] = new_step_counter(group, master).fill_(s["value"])
                else:
                    device = master.device if s["on_param_device"] else torch.device("cpu")
                    per_param[key] = torch.tensor(s["value"], dtype=getattr(torch, s["dtype"].split(".")[-1]),
                                                  device=device)


def _load_optimizer(state: "CheckpointState", reader: CheckpointReader, pieces: list[Piece]) -> None:
    # The backend says which elementwise states it keeps (cpu / nvme: fixed at attach, kept in
    # place; none: the checkpoint's); those the checkpoint lacks (saved before a step) are zeros.
    saved_keys = _saved_state_keys(reader)
    keys = state.prepare_states(saved_keys)
    _load_scalar_states(state.optimizer, reader.manifest["optimizer"])
    for piece in pieces:
        for key in keys:
            _write_piece(state, reader, piece, key, _state_kind(reader, piece, key, saved_keys))
    state.loss_scaler.load_state_dict(reader.manifest["loss_scaler"])


def load_checkpoint(engine: "ZeroEngine", load_dir: str | Path, tag: Optional[str] = None,
                    load_optimizer_states: bool = True, load_lr_scheduler_states: bool = True,
                    load_module_only: bool = False, verify: bool = True) -> tuple[Path, dict]:
    """Restore parameters (and, unless disabled, optimizer, scaler, scheduler, step counters
    and this rank's RNG). Returns (checkpoint path, client_state). The engine is read and
    written only through ``engine.checkpoint_state()`` ([Note: checkpoint interface] in state.py)."""
    state = engine.checkpoint_state()
    # a call on some ranks only raises there instead of waiting in the first collective
    with all_ranks_call(state.comm, "engine.load_checkpoint()", EVERY_RANK_WRITES, why=EVERY_RANK_WRITES_WHY):
        return _load_checkpoint(state, load_dir, tag, load_optimizer_states, load_lr_scheduler_states,
                                load_module_only, verify)


def _load_checkpoint(state: "CheckpointState", load_dir: str | Path, tag: Optional[str], load_optimizer_states: bool,
                     load_lr_scheduler_states: bool, load_module_only: bool, verify: bool) -> tuple[Path, dict]:
    pieces = state.trainable_pieces()
    with_optimizer = load_optimizer_states and not load_module_only
    reader = None
    # Every file and range this rank reads is checked before the first collective; the ranks
    # then agree, so a corrupt file on one rank is the same error on all (comm.agree_on_failure).
    with rank_local_step(state.comm, f"load_checkpoint from {load_dir}", CheckpointError):
        path = checkpoint_path(Path(load_dir), tag)
        reader = CheckpointReader(path, verify=verify)
        _check_model_matches(reader, state.module, path)
        if with_optimizer:
            _check_optimizer(state, reader)
        _check_sources(reader, pieces, with_optimizer)
        _check_module_sources(state, reader)
    state.quiesce()
    state.clear_grads()
    with torch.no_grad():   # masters and states stream into the offload backend piece by piece
        _load_masters(state, reader, pieces)
        if with_optimizer:
            _load_optimizer(state, reader, pieces)
    with torch.no_grad():
        _load_module(state, reader)
    manifest = reader.manifest
    _restore_progress(state, manifest, with_optimizer, load_module_only, load_lr_scheduler_states)
    reader.close()
    return path, manifest["client_state"]


def _restore_progress(state: "CheckpointState", manifest: dict, with_optimizer: bool, load_module_only: bool,
                      load_lr_scheduler_states: bool) -> None:
    """Skipped-step count (with the optimizer), scheduler, step counters and this rank's RNG."""
    progress = state.progress()
    if with_optimizer:
        progress.skipped_steps = manifest["skipped_steps"]
    if not load_module_only:
        if load_lr_scheduler_states and state.lr_scheduler is not None and manifest["lr_scheduler"] is not None:
            state.lr_scheduler.load_state_dict(manifest["lr_scheduler"])
        progress.global_steps = manifest["global_steps"]
        progress.micro_steps = manifest["micro_steps"]
        rng = manifest["rng"].get(str(state.comm.rank))
        if rng is not None:
            restore_rng(rng)
        # Ranks this run lacks keep their RNG states for the next save, so that going
        # 2 -> 1 -> 2 ranks resumes exactly.
        progress.carried_rng_states = {r: v for r, v in manifest["rng"].items() if int(r) >= state.comm.world_size}
    state.restore_progress(progress)
