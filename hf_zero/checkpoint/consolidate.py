"""Offline, streaming consolidation of a sharded checkpoint into Hugging Face's layout.

Output: ``model.safetensors`` or ``model-0000k-of-0000n.safetensors`` plus
``model.safetensors.index.json`` (shards planned by huggingface_hub on meta tensors), and
``config.json``; with ``adapter_only`` the peft layout (``adapter_model.safetensors`` +
``adapter_config.json``). Tensors are assembled shard by shard from the checkpoint's pieces,
so peak memory is about one output shard plus the largest tensor, whatever the model size.
The output directory is written under a temporary name and renamed into place.
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Union

import torch
from huggingface_hub import StateDictSplit, split_torch_state_dict_into_shards

from hf_zero.checkpoint.files import fsync_dir, write_json_atomic
from hf_zero.checkpoint.hf_layout import HfLayout, meta_model
from hf_zero.checkpoint.load import checkpoint_path
from hf_zero.checkpoint.reader import CheckpointReader
from hf_zero.checkpoint.safetensors_io import write_safetensors

if TYPE_CHECKING:
    from transformers import PreTrainedModel

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _sources(reader: CheckpointReader, adapter_only: bool) -> dict[str, tuple[str, str]]:
    """Output key -> (piece kind, checkpoint name), in model order."""
    manifest = reader.manifest
    out: dict[str, tuple[str, str]] = {}
    if adapter_only:
        peft = manifest.get("peft") or {}
        if len(peft) != 1:
            raise ValueError(f"adapter_only needs a checkpoint of a peft model with one adapter, found {list(peft)}")
        adapter = next(iter(peft))
        for name, info in manifest["params"].items():
            if info["trainable"]:   # peft's own rule for LoRA: the adapter name is dropped from keys
                out[name.replace(f".{adapter}", "")] = ("master", name)
        return out
    if manifest.get("peft"):
        raise ValueError("this is a checkpoint of a peft model: consolidate its adapter with adapter_only=True "
                         "(--adapter-only), or write a merged model online with engine.save_16bit_model")
    for name, info in manifest["params"].items():
        out[name] = ("master" if reader.has("master", name) else "frozen", name)
    for name in manifest["buffers"]:
        if reader.has("buffer", name):
            out[name] = ("buffer", name)
    return out


def _config_json(manifest: dict, dtype: torch.dtype) -> Optional[dict]:
    config = manifest.get("model_config")
    if config is None:
        return None
    config = dict(config)
    if not config.get("architectures") and manifest.get("model_class"):
        config["architectures"] = [manifest["model_class"]]
    config["dtype"] = str(dtype).removeprefix("torch.")
    return config


def _meta_model(manifest: dict) -> Optional[PreTrainedModel]:
    """The trained transformers model rebuilt on meta (None for other models and old checkpoints),
    with the weight conversions its from_pretrained used, so saving reverts the same ones."""
    if not manifest.get("hf_model_class") or manifest.get("model_config") is None:
        return None
    model = meta_model(manifest["hf_model_class"], manifest["model_config"])
    used = manifest.get("hf_conversions_used")
    if model is not None and used is not None:
        from transformers.conversion_mapping import get_model_conversion_mapping

        mapping = get_model_conversion_mapping(model)
        setattr(model, "_weight_conversions", [mapping[i] for i in used])   # as from_pretrained leaves it
    return model


def _write_hf_layout(reader: CheckpointReader, model: PreTrainedModel, sources: dict[str, tuple[str, str]],
                     dtype: torch.dtype, max_shard_size: Union[int, str], out_dir: Path) -> None:
    """save_pretrained's files (hf_layout.py), each assembled from the checkpoint's pieces."""
    manifest = reader.manifest
    info = {**manifest["buffers"], **manifest["params"]}
    shapes = {key: info[src]["shape"] for key, (_, src) in sources.items()}
    dtypes = {key: dtype if "float" in info[src]["dtype"] else getattr(torch, info[src]["dtype"].split(".")[-1])
              for key, (_, src) in sources.items()}
    layout = HfLayout(model, shapes, dtypes, max_shard_size)

    def values_for(names: list[str]) -> dict[str, torch.Tensor]:
        return {n: reader.full(sources[n][0], sources[n][1], dtypes[n]) for n in names}

    layout.write(out_dir, values_for, dtype)


def consolidate(checkpoint_dir: Union[str, Path], out_dir: Union[str, Path], tag: Optional[str] = None,
                max_shard_size: Union[int, str] = "5GB", dtype: Union[str, torch.dtype] = "fp32",
                adapter_only: bool = False) -> Path:
    """Write the checkpoint's weights in Hugging Face layout; returns ``out_dir``."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
        dtype = DTYPES[dtype]
    reader = CheckpointReader(checkpoint_path(Path(checkpoint_dir), tag))
    sources = _sources(reader, adapter_only)
    shapes = {**{n: i["shape"] for n, i in reader.manifest["params"].items()},
              **{n: i["shape"] for n, i in reader.manifest["buffers"].items()}}
    meta = {key: torch.empty(shapes[src], dtype=dtype, device="meta") for key, (_, src) in sources.items()}
    pattern = "adapter_model{suffix}.safetensors" if adapter_only else "model{suffix}.safetensors"
    plan: Optional[StateDictSplit] = split_torch_state_dict_into_shards(meta, filename_pattern=pattern,
                                                                        max_shard_size=max_shard_size)

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{uuid.uuid4().hex[:12]}")
    tmp.mkdir()
    try:
        model = None if adapter_only else _meta_model(reader.manifest)
        if model is not None:
            _write_hf_layout(reader, model, sources, dtype, max_shard_size, tmp)
            plan = None
        for filename, keys in (plan.filename_to_tensors.items() if plan is not None else ()):
            shard = {}
            for key in keys:
                kind, src = sources[key]
                shard[key] = reader.full(kind, src, dtype).contiguous()
            write_safetensors(tmp / filename, shard, metadata={"format": "pt"})
            del shard   # one output shard in memory at a time
        if plan is not None and plan.is_sharded:
            index = {"metadata": {**plan.metadata}, "weight_map": plan.tensor_to_filename}
            stem = "adapter_model" if adapter_only else "model"
            write_json_atomic(tmp / f"{stem}.safetensors.index.json", index)
        if adapter_only:
            adapter_config = next(iter(reader.manifest["peft"].values()))
            (tmp / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))
        elif model is None:
            config = _config_json(reader.manifest, dtype)
            if config is not None:
                (tmp / "config.json").write_text(json.dumps(config, indent=2))
        fsync_dir(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        reader.close()
    return out_dir
