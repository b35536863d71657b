"""``hf-zero import-deepspeed``: a DeepSpeed ZeRO checkpoint -> an hf_zero checkpoint.

Each DeepSpeed rank's flat fp32 partitions and Adam moments become hf_zero *pieces* (ranges of
named parameters, [Note: pieces make checkpoints world-size agnostic] in docs/checkpoints.md),
written as one safetensors file per DeepSpeed rank, one rank file in memory at a time. So the
result loads with ``engine.load_checkpoint`` at any world size and stage, like a checkpoint
hf_zero wrote. DeepSpeed's pickles are read without running code ([Note: allow-listed
unpickling of DeepSpeed checkpoints] in deepspeed_pickle.py); DeepSpeed need not be installed.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import uuid
from pathlib import Path
from typing import Any, Optional, Union

import torch

from hf_zero.checkpoint.deepspeed_pickle import DynamicLossScalerState, load_deepspeed_file
from hf_zero.checkpoint.deepspeed_states import RankStates, read_stage3, read_stage3_frozen, read_stage12
from hf_zero.checkpoint.files import CheckpointError, fsync_dir, validate_tag, write_json_atomic, write_text_atomic
from hf_zero.checkpoint.reader import FORMAT
from hf_zero.checkpoint.safetensors_io import write_safetensors

logger = logging.getLogger(__name__)

# Top-level keys DeepSpeed writes into model-states files; any other key is the user's client_state.
_DS_KEYS = {"module", "buffer_names", "optimizer", "param_shapes", "frozen_param_shapes", "shared_params",
            "frozen_param_fragments", "lr_scheduler", "data_sampler", "random_ltd", "sparse_tensor_module_names",
            "skipped_steps", "global_steps", "global_samples", "dp_world_size", "mp_world_size", "ds_config",
            "ds_version", "checkpoint_parallel_dimensions", "universal_checkpoint_info"}
_UNSUPPORTED_FILES = {r"^layer_\d+-model_states\.pt$": "pipeline-parallel",
                      r"^expert_\d+_.*\.pt$": "mixture-of-experts",
                      r"_mp_rank_(?!00_)\d+_": "tensor-parallel (mp_rank > 0)"}


def _tag_dir(ds_dir: Path, tag: Optional[str]) -> Path:
    """The global_stepN directory: ``ds_dir`` itself or the one ``latest`` (or ``tag``) names."""
    if not ds_dir.is_dir():
        raise CheckpointError(f"no DeepSpeed checkpoint directory {ds_dir}")
    if tag is None and any(ds_dir.glob("*model_states.pt")):
        return ds_dir
    if tag is None:
        latest = ds_dir / "latest"
        if not latest.is_file():
            raise CheckpointError(f"{ds_dir}: no 'latest' file and no *_model_states.pt: pass the global_stepN "
                                  "directory or --tag")
        tag = latest.read_text().strip()
    path = ds_dir / tag
    if not path.is_dir():
        raise CheckpointError(f"no checkpoint directory {path} (named by {ds_dir / 'latest'})")
    return path


def _refuse_unsupported(path: Path) -> None:
    if (path / "zero").is_dir():
        raise CheckpointError(f"{path}: a DeepSpeed universal checkpoint (ds_to_universal.py output) is not "
                              "supported; import the ZeRO checkpoint it was made from")
    for file in path.iterdir():
        for pattern, what in _UNSUPPORTED_FILES.items():
            if re.search(pattern, file.name):
                raise CheckpointError(f"{file}: {what} DeepSpeed checkpoints are not supported (hf_zero is "
                                      "data parallel only)")


def _optim_file(path: Path, rank: int) -> Path:
    for prefix in ("", "bf16_"):
        file = path / f"{prefix}zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
        if file.is_file():
            return file
    raise CheckpointError(f"missing DeepSpeed checkpoint file: {path}/[bf16_]zero_pp_rank_{rank}_mp_rank_00_"
                          "optim_states.pt (every data-parallel rank writes one)")


def _model_states(path: Path) -> tuple[dict, bool]:
    """Rank 0's model states, and whether the file names say stage 3 (one file per rank)."""
    if (path / "mp_rank_00_model_states.pt").is_file():
        states, stage3 = load_deepspeed_file(path / "mp_rank_00_model_states.pt"), False
    elif (path / "zero_pp_rank_0_mp_rank_00_model_states.pt").is_file():
        states, stage3 = load_deepspeed_file(path / "zero_pp_rank_0_mp_rank_00_model_states.pt"), True
    else:
        raise CheckpointError(f"missing DeepSpeed checkpoint file: {path}/mp_rank_00_model_states.pt "
                              "(stages 0-2) or zero_pp_rank_0_mp_rank_00_model_states.pt (stage 3)")
    if states.get("optimizer") is not None or not states.get("param_shapes"):
        raise CheckpointError(f"{path}: not a ZeRO checkpoint (stage 0 or no optimizer); only ZeRO stage 1-3 "
                              "checkpoints can be imported")
    if (states.get("mp_world_size") or 1) > 1:
        raise CheckpointError(f"{path}: tensor-parallel checkpoints (mp_world_size {states['mp_world_size']}) "
                              "are not supported")
    return states, stage3


def _model_dtype(ds_config: dict) -> torch.dtype:
    if (ds_config.get("fp16") or {}).get("enabled") is True:
        return torch.float16
    if any((ds_config.get(k) or {}).get("enabled") is True for k in ("bf16", "bfloat16")):
        return torch.bfloat16
    return torch.float32


def _read_rank(path: Path, rank: int, world: int, model_states: dict, stage3: bool) -> tuple[RankStates, int]:
    file = _optim_file(path, rank)
    optim = load_deepspeed_file(file)
    sd = optim.get("optimizer_state_dict")
    if not isinstance(sd, dict):
        raise CheckpointError(f"{file}: no 'optimizer_state_dict'; not a DeepSpeed ZeRO optimizer file")
    try:
        if stage3:
            states = read_stage3(optim, model_states["param_shapes"], rank, world, file)
            frozen_source = load_deepspeed_file(path / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt") \
                if rank else model_states
            for name, (start, tensor) in read_stage3_frozen(frozen_source, rank, world, file).items():
                states.add("frozen", name, start, tensor)
        else:
            states = read_stage12(optim, model_states["param_shapes"], rank, file)
    except KeyError as err:
        raise CheckpointError(f"{file}: missing key {err}; not a DeepSpeed ZeRO checkpoint this importer "
                              "knows (DeepSpeed 0.19 layout)") from None
    states.loss_scaler = _loss_scaler(sd)
    stage = int(sd["zero_stage"]) if "zero_stage" in sd else 1   # BF16_Optimizer: stage-1 layout
    return states, stage


def _rank0_extras(states: RankStates, model_states: dict, stage3: bool) -> None:
    """Buffers, and (stages 1/2) frozen parameters, whole from rank 0's module state dict."""
    module = model_states.get("module") or {}
    for name in model_states.get("buffer_names") or []:
        if name in module:
            states.add("buffer", name, 0, module[name].reshape(-1))
    if not stage3:
        for name in (model_states.get("frozen_param_shapes") or {}):
            if name not in module:
                raise CheckpointError(f"frozen parameter '{name}' is missing from the model states")
            states.add("frozen", name, 0, module[name].reshape(-1))


def _optimizer_meta(first: RankStates, ds_config: dict, where: Path) -> dict:
    ds_type = str((ds_config.get("optimizer") or {}).get("type", "")).lower()
    if ds_type and ds_type not in ("adam", "adamw"):
        raise CheckpointError(f"{where}: optimizer '{ds_config['optimizer']['type']}' cannot be imported; only "
                              "Adam/AdamW states are mapped")
    decoupled = next((c for c in first.group_classes if c is not None), None)
    if decoupled is None:   # DeepSpeed's rule: "Adam" means AdamW unless adam_w_mode is false
        decoupled = ds_type == "adamw" or (ds_config.get("optimizer") or {}).get("params", {}).get("adam_w_mode", True)
    scalars = [{"step": {"value": s, "dtype": "torch.float32", "on_param_device": True}} if s is not None else {}
               for s in first.steps]
    return {"class": "AdamW" if decoupled else "Adam", "param_groups": first.groups, "scalar_state": scalars}


def _loss_scaler(optim_sd: dict) -> dict:
    scaler = optim_sd.get("loss_scaler")
    if scaler is None:
        return {"scale": 1.0}
    if isinstance(scaler, DynamicLossScalerState) or getattr(scaler, "dynamic", False):
        return {"scale": float(scaler.cur_scale), "remaining_hysteresis": int(scaler.cur_hysteresis),
                "iteration": int(scaler.cur_iter), "last_overflow_iteration": int(scaler.last_overflow_iter)}
    return {"scale": float(scaler.cur_scale)}


def _lr_scheduler(model_states: dict, ds_config: dict, num_groups: int) -> Optional[dict]:
    """DeepSpeed's Warmup* schedules keep ``last_batch_iteration`` only: rebuild hf_zero's
    scheduler at that position. A torch scheduler's own state passes through as it is."""
    state = model_states.get("lr_scheduler")
    if not isinstance(state, dict):
        return None
    if "last_batch_iteration" not in state:
        return _json_or_none(state, "lr_scheduler state")
    from hf_zero.config import ConfigError, load_config
    from hf_zero.optim.lr_schedules import build_scheduler, position_after

    problem = "no scheduler in ds_config"
    try:
        config = load_config({"scheduler": ds_config.get("scheduler"), "optimizer": ds_config.get("optimizer")})
    except ConfigError as err:
        config, problem = None, str(err)
    lr = config.optimizer.params.lr if config is not None and config.optimizer is not None else 1e-3
    if config is not None and config.scheduler is not None and not isinstance(lr, float):
        # null or "auto": the lr the schedule scales is not in ds_config
        problem = f"optimizer.params.lr is {lr!r} in ds_config, not a number"
    if config is None or config.scheduler is None or not isinstance(lr, float):
        logger.warning("hf_zero import-deepspeed: the LR scheduler position (last_batch_iteration %s) is not "
                       "imported: %s; the loading run's scheduler starts from its beginning",
                       state["last_batch_iteration"], problem)
        return None
    dummy = torch.optim.SGD([{"params": [torch.zeros(1)]} for _ in range(num_groups)], lr=lr)
    scheduler = build_scheduler(config.scheduler, dummy)
    # hf_zero's schedules follow DeepSpeed's step for step: last_epoch = last_batch_iteration + 1
    # (lr_schedules.py, [Note: schedule position]).
    position = position_after(state["last_batch_iteration"])
    dummy.step()   # no gradients, no change; tells torch the step order is the usual one
    scheduler.last_epoch, scheduler._step_count = position - 1, position
    scheduler.step()   # to last_epoch = position, setting _last_lr as a torch scheduler does
    return json.loads(json.dumps(scheduler.state_dict()))


def _json_or_none(value: Any, what: str) -> Any:
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError):
        logger.warning("hf_zero import-deepspeed: %s is not JSON and is not imported", what)
        return None


def _hf_zero_config(ds_config: dict) -> dict:
    from hf_zero.config import ConfigError, config_to_dict, load_config

    try:
        return config_to_dict(load_config(ds_config))
    except ConfigError as err:
        logger.warning("hf_zero import-deepspeed: the checkpoint's DeepSpeed config is stored as is (%s)", err)
        return _json_or_none(ds_config, "ds_config") or {}


def _client_state(model_states: dict) -> dict:
    client = {k: v for k, v in model_states.items() if k not in _DS_KEYS}
    for key in ("data_sampler", "random_ltd"):
        if model_states.get(key) is not None:
            logger.warning("hf_zero import-deepspeed: DeepSpeed's %s state is not imported", key)
    return {k: v for k, v in client.items() if _json_or_none(v, f"client_state['{k}']") is not None}


def _params_table(model_states: dict, dtype: torch.dtype) -> dict:
    table = {}
    for shapes in model_states["param_shapes"]:
        for name, shape in shapes.items():
            table[name] = {"shape": list(shape), "dtype": str(dtype), "trainable": True}
    for name, shape in (model_states.get("frozen_param_shapes") or {}).items():
        table[name] = {"shape": list(shape), "dtype": str(dtype), "trainable": False}
    return table


def _model_config(path: Path, model_config: Optional[Path]) -> dict:
    """The HF ``config.json`` (given, or beside the checkpoint as the Trainer writes it), so that
    ``hf-zero consolidate`` can write one; optional."""
    candidates = [model_config] if model_config else [path.parent / "config.json", path / "config.json"]
    for file in candidates:
        if file is not None and Path(file).is_file():
            config = json.loads(Path(file).read_text())
            meta = {"model_config": config}
            if config.get("architectures"):
                meta["model_class"] = config["architectures"][0]
            return meta
    if model_config:
        raise CheckpointError(f"no model config file {model_config}")
    return {}


def _manifest(tag: str, world: int, stage: int, model_states: dict, ds_config: dict, rank0: RankStates,
              files: dict, pieces: dict, where: Path, extra: dict) -> dict:
    dtype = _model_dtype(ds_config)
    global_steps = int(model_states.get("global_steps") or 0)
    optimizer = _optimizer_meta(rank0, ds_config, where)
    scheduler = _lr_scheduler(model_states, ds_config, len(rank0.groups))
    for group, lr in zip(optimizer["param_groups"], (scheduler or {}).get("_last_lr") or ()):
        group.setdefault("lr", lr)   # elastic checkpoints store no hyperparameters: the schedule's lr
    accumulation = int(ds_config.get("gradient_accumulation_steps") or 1)
    return {
        "format": FORMAT, "tag": tag, "world_size": world, "stage": stage, "model_dtype": str(dtype),
        "global_steps": global_steps, "micro_steps": global_steps * accumulation,
        "skipped_steps": int(model_states.get("skipped_steps") or 0),
        "params": _params_table(model_states, dtype),
        "buffers": {n: {"shape": list(model_states["module"][n].shape), "dtype": str(model_states["module"][n].dtype)}
                    for n in model_states.get("buffer_names") or [] if n in (model_states.get("module") or {})},
        "files": files, "pieces": pieces, "rng": {},
        "optimizer": optimizer,
        "loss_scaler": rank0.loss_scaler,
        "lr_scheduler": scheduler,
        "client_state": _client_state(model_states),
        "config": _hf_zero_config(ds_config),
        "imported_from": {"deepspeed_version": str(model_states.get("ds_version")), "path": str(where)},
        **extra,
    }


def import_deepspeed(ds_dir: Union[str, Path], out_dir: Union[str, Path], tag: Optional[str] = None,
                     model_config: Optional[Union[str, Path]] = None) -> Path:
    """Convert a DeepSpeed ZeRO checkpoint; returns ``out_dir / tag`` (``out_dir/latest`` names it)."""
    path = _tag_dir(Path(ds_dir), tag)
    _refuse_unsupported(path)
    tag = validate_tag(path.name)
    model_states, stage3 = _model_states(path)
    ds_config = model_states.get("ds_config") or {}
    world = int(model_states.get("dp_world_size") or 1)
    extra = _model_config(path, Path(model_config) if model_config else None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{tag}.tmp-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    try:
        files, pieces, rank0, stage = {}, {}, None, 0
        for rank in range(world):
            states, stage = _read_rank(path, rank, world, model_states, stage3)
            if rank == 0:
                _rank0_extras(states, model_states, stage3)
                rank0 = states
            name = f"rank_{rank:05d}.safetensors"
            files[name] = write_safetensors(tmp / name, states.tensors, metadata={"format": "pt"})
            states.tensors.clear()   # one rank file's data at a time
            pieces.update({k: {**v, "file": name} for k, v in states.index.items()})
        if _optim_file_exists(path, world):
            raise CheckpointError(f"{path}: more optimizer files than the dp_world_size ({world}) it records")
        assert rank0 is not None   # the loop read rank 0's states (world >= 1)
        manifest = _manifest(tag, world, 3 if stage3 else stage, model_states, ds_config, rank0, files, pieces,
                             path, extra)
        write_json_atomic(tmp / "manifest.json", manifest)
        fsync_dir(tmp)
        final = out / tag
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        fsync_dir(out)
        write_text_atomic(out / "latest", tag)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _optim_file_exists(path: Path, rank: int) -> bool:
    return any((path / f"{p}zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").is_file() for p in ("", "bf16_"))
