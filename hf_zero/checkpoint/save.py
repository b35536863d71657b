"""``engine.save_checkpoint``: every rank writes its pieces; the directory appears atomically.

[Note: atomic checkpoint protocol]
1. Rank 0 creates ``save_dir/.<tag>.tmp-<id>`` and broadcasts its name.
2. Every rank writes ``rank_XXXXX.safetensors`` there (fsync'ed) and sends rank 0 its file's
   size and sha256, its piece index and its RNG state.
3. Rank 0 writes ``manifest.json`` (fsync), renames the temporary directory to ``<tag>``
   (an older ``<tag>`` is moved aside first and deleted after), fsyncs ``save_dir`` and only
   then rewrites ``latest`` (write + rename). A crash anywhere before leaves ``latest`` and
   every complete checkpoint untouched; the stray temporary directory is removed by the
   next save.
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, cast

import torch
from hf_zero.checkpoint.files import (CheckpointError, fsync_dir, validate_tag, write_json_atomic,
                                      write_text_atomic)
from hf_zero.checkpoint.hf_layout import conversion_indices
from hf_zero.checkpoint.layout import Piece, piece_key, true_shape
from hf_zero.checkpoint.reader import FORMAT
from hf_zero.checkpoint.rng import capture_rng
from hf_zero.checkpoint.safetensors_io import Streamed, write_safetensors
from hf_zero.comm import rank_local_step
from hf_zero.presence import all_ranks_call
from hf_zero.config import config_to_dict

if TYPE_CHECKING:
    from peft import PeftModel

    from hf_zero.checkpoint.state import CheckpointState
    from hf_zero.engine import ZeroEngine


def _no_op(path: Path) -> None:
    pass


# Test seam: called with each file path right after it is written (a test makes it crash).
_after_file_written: Callable[[Path], None] = _no_op


def _json_checked(value: Any, what: str) -> Any:
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as err:
        raise TypeError(f"{what} must be JSON-serialisable (checkpoints never pickle): {err}") from None


def _streamed(state: "CheckpointState", kind: str, piece: Piece, dtype: torch.dtype) -> Streamed:
    """One piece of a master or an optimizer state, read through the offload backend a bounded
    part at a time ([Note: streamed optimizer state] in hf_zero/offload/protocol.py)."""
    return Streamed(dtype, piece.length, lambda: state.read(kind, piece))


def _rank_tensors(state: "CheckpointState") -> tuple[dict[str, torch.Tensor | Streamed], dict[str, dict]]:
    """This rank's pieces (masters, elementwise optimizer states, stage-3 frozen shards),
    plus, on rank 0, unsharded frozen parameters and persistent buffers whole."""
    tensors: dict[str, torch.Tensor | Streamed] = {}
    index: dict[str, dict] = {}

    def add(kind: str, name: str, start: int, tensor: torch.Tensor | Streamed) -> None:
        key = piece_key(kind, name, start)
        tensors[key] = tensor
        length = tensor.numel if isinstance(tensor, Streamed) else tensor.numel()
        index[key] = {"kind": kind, "name": name, "start": start, "length": length}

    for piece in state.trainable_pieces() if state.writes_optimizer_pieces else []:
        for kind, dtype in state.piece_kinds(piece):   # the master first, then its elementwise states
            saved_kind = kind if kind == "master" else f"state.{kind}"
            add(saved_kind, piece.name, piece.param_start, _streamed(state, kind, piece, dtype))
    # Stage 3 shards frozen parameters too: each rank writes the pieces its shard holds.
    for piece in state.frozen_pieces() if state.writes_frozen_pieces else []:
        add("frozen", piece.name, piece.param_start, state.frozen_shard(piece))
    if state.comm.rank == 0:
        for name, p in state.whole_parameters():
            add("frozen", name, 0, p.detach().reshape(-1))
        for name, b in _persistent_buffers(state.module).items():
            add("buffer", name, 0, b.detach().reshape(-1))
    return tensors, index


def _persistent_buffers(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    params = {n for n, _ in module.named_parameters()}
    state = module.state_dict(keep_vars=True)
    return {n: b for n, b in module.named_buffers() if n in state and n not in params}


def _optimizer_meta(inner: torch.optim.Optimizer) -> dict:
    """Hyperparameters per group, and per-group scalar states (e.g. Adam's step count)."""
    groups, scalars = [], []
    for group in inner.param_groups:
        groups.append(_json_checked({k: v for k, v in group.items() if k != "params"}, "optimizer param group"))
        first = group["params"][0] if group["params"] else None
        entry = {}
        for key, value in inner.state.get(first, {}).items() if first is not None else ():
            assert first is not None   # (no iteration otherwise)
            if isinstance(value, torch.Tensor) and value.numel() == 1 and first.numel() > 1:
                entry[key] = {"value": value.item(), "dtype": str(value.dtype),
                              "on_param_device": value.device == first.device}
            elif not isinstance(value, torch.Tensor):
                entry[key] = {"value": value, "dtype": None, "on_param_device": False}
        scalars.append(entry)
    return {"class": type(inner).__name__, "param_groups": groups, "scalar_state": scalars}


def _model_meta(module: torch.nn.Module) -> dict:
    meta: dict[str, Any] = {"model_class": type(getattr(module, "base_model", module)).__name__}
    peft_wrapped = getattr(module, "peft_config", None) is not None   # peft's PeftModel
    hf_model = cast("PeftModel", module).get_base_model() if peft_wrapped else module
    if peft_wrapped:
        meta["model_class"] = type(hf_model).__name__
    if hasattr(hf_model, "base_model_prefix"):   # consolidation rebuilds it on meta for save_pretrained's layout
        meta["hf_model_class"] = type(hf_model).__name__
        meta["hf_conversions_used"] = conversion_indices(hf_model)
    config = getattr(module, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        meta["model_config"] = _json_checked(config.to_dict(), "model config")
    peft_config = getattr(module, "peft_config", None)
    if isinstance(peft_config, dict):
        meta["peft"] = {name: _json_checked(json.loads(json.dumps(c.to_dict(), default=list)), "peft config")
                        for name, c in peft_config.items()}
    return meta


# what every rank's part in a checkpoint is; said when some rank did not call save/load_checkpoint
EVERY_RANK_WRITES_WHY = "writes (or reads) each rank's own shard of the model and optimizer"
EVERY_RANK_WRITES = ("Call engine.save_checkpoint / engine.load_checkpoint (accelerator.save_state / load_state, "
                     "the Trainer's checkpointing) on every rank, as with DeepSpeed.")


def save_checkpoint(engine: "ZeroEngine", save_dir: str | Path, tag: Optional[str] = None,
                    client_state: Optional[dict] = None) -> Path:
    """Write a sharded checkpoint on every rank; returns ``save_dir / tag``.

    Each rank-local phase ends in an agreement (comm.agree_on_failure), so a failure on one
    rank (bad input, a full disk) is the same CheckpointError on every rank, and the previous
    checkpoint and ``latest`` stay as they were. The engine is read only through
    ``engine.checkpoint_state()`` ([Note: checkpoint interface] in state.py)."""
    state = engine.checkpoint_state()
    # A call on some ranks only (`if rank == 0: engine.save_checkpoint(...)`) raises there
    # instead of waiting in the first collective (presence.py's [Note: presence check]).
    with all_ranks_call(state.comm, "engine.save_checkpoint()", EVERY_RANK_WRITES, why=EVERY_RANK_WRITES_WHY):
        return _save_checkpoint(state, Path(save_dir), tag, client_state)


def _save_checkpoint(state: "CheckpointState", save_dir: Path, tag: Optional[str],
                     client_state: Optional[dict]) -> Path:
    comm = state.comm
    progress = state.progress()
    tmp_name = None
    with rank_local_step(comm, f"save_checkpoint to {save_dir}", CheckpointError):
        tag = validate_tag(tag if tag is not None else f"global_step{progress.global_steps}")
        client_state = _json_checked(client_state or {}, "client_state")
        scheduler = state.lr_scheduler
        scheduler_state = _json_checked(scheduler.state_dict(), "lr_scheduler.state_dict()") if scheduler else None
        state.quiesce()
        if comm.rank == 0:
            save_dir.mkdir(parents=True, exist_ok=True)
            for stale in save_dir.glob(".*.tmp-*"):
                if stale.is_dir():
                    shutil.rmtree(stale, ignore_errors=True)
            tmp_name = f".{tag}.tmp-{uuid.uuid4().hex[:12]}"
            (save_dir / tmp_name).mkdir()
    tmp = save_dir / cast(str, comm.broadcast_object(tmp_name))   # rank 0's name

    file_name = f"rank_{comm.rank:05d}.safetensors"
    entry: Optional[dict] = None
    index: dict[str, dict] = {}
    try:
        with rank_local_step(comm, f"save_checkpoint writing {tmp}/rank_*.safetensors", CheckpointError):
            tensors, index = _rank_tensors(state)
            entry = write_safetensors(tmp / file_name, tensors, metadata={"format": "pt"})
            del tensors
            _after_file_written(tmp / file_name)
            for piece in index.values():
                piece["file"] = file_name
        reports = comm.all_gather_objects((comm.rank, file_name, entry, index, capture_rng()))
        final = save_dir / tag
        with rank_local_step(comm, f"save_checkpoint publishing {final}", CheckpointError):
            if comm.rank == 0:
                _publish(state, tmp, final, tag, reports, scheduler_state, client_state)
    except CheckpointError:
        if comm.rank == 0:   # the half-written directory goes; `latest` still names the previous one
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _publish(state: "CheckpointState", tmp: Path, final: Path, tag: str, reports: list,
             scheduler_state: Any, client_state: dict) -> None:
    """Rank 0: manifest, then rename into place, then ``latest`` (see the module note)."""
    comm, save_dir, progress = state.comm, final.parent, state.progress()
    manifest = {
        "format": FORMAT, "tag": tag, "world_size": comm.world_size, "stage": state.stage_number,
        "model_dtype": str(state.model_dtype), "global_steps": progress.global_steps,
        "micro_steps": progress.micro_steps, "skipped_steps": progress.skipped_steps,
        "params": {n: {"shape": true_shape(p), "dtype": str(p.dtype), "trainable": p.requires_grad}
                   for n, p in state.module.named_parameters()},
        "buffers": {n: {"shape": list(b.shape), "dtype": str(b.dtype)}
                    for n, b in _persistent_buffers(state.module).items()},
        "files": {name: entry for _, name, entry, _, _ in reports},
        "pieces": {k: v for _, _, _, idx, _ in reports for k, v in idx.items()},
        "rng": {**progress.carried_rng_states, **{str(rank): rng for rank, _, _, _, rng in reports}},
        "optimizer": _optimizer_meta(state.optimizer),
        "loss_scaler": state.loss_scaler.state_dict(),
        "lr_scheduler": scheduler_state,
        "client_state": client_state,
        "config": config_to_dict(state.config),
        **_model_meta(state.module),
    }
    write_json_atomic(tmp / "manifest.json", manifest)
    fsync_dir(tmp)
    old = None
    if final.exists():
        old = save_dir / f".{tag}.old-{uuid.uuid4().hex[:12]}"
        final.rename(old)
    try:
        tmp.rename(final)
    except BaseException:
        if old is not None:   # re-saving a tag: the previous checkpoint goes back where `latest` may point
            old.rename(final)
        raise
    fsync_dir(save_dir)
    write_text_atomic(save_dir / "latest", tag)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
