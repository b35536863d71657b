"""Rank functions: what hf_zero writes after stage-3 training vs transformers' save_pretrained.

Reference: ``save_pretrained`` of a plain transformers model holding the gathered trained
weights, and ``AutoModelForCausalLM.from_pretrained`` of what hf_zero wrote.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

import hf_zero
from parity_cases import VOCAB

SHARD = "20KB"   # several files even for these tiny models


def _layout(directory: Path) -> dict:
    """File names, index and every tensor (key -> value) of an HF checkpoint directory."""
    from safetensors import safe_open

    files = sorted(p.name for p in directory.iterdir())
    tensors = {}
    for f in files:
        if f.endswith(".safetensors"):
            with safe_open(str(directory / f), "pt") as handle:
                tensors.update({(f, k): handle.get_tensor(k) for k in handle.keys()})
    index = directory / "model.safetensors.index.json"
    return {"files": files, "tensors": tensors,
            "index": json.loads(index.read_text()) if index.is_file() else None}


def _compare(ours: Path, reference: Path) -> list[str]:
    a, b = _layout(ours), _layout(reference)
    problems = []
    if a["files"] != b["files"]:
        problems.append(f"files {a['files']} vs {b['files']}")
    if a["index"] != b["index"]:
        problems.append("index differs")
    if set(a["tensors"]) != set(b["tensors"]):
        problems.append(f"keys differ: {sorted(set(a['tensors']) ^ set(b['tensors']))[:4]}")
    for key in set(a["tensors"]) & set(b["tensors"]):
        x, y = a["tensors"][key], b["tensors"][key]
        if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(x, y):
            problems.append(f"{key}: {x.dtype}{list(x.shape)} vs {y.dtype}{list(y.shape)}")
    for name in ("config.json", "generation_config.json"):
        if not (reference / name).is_file():
            continue
        if json.loads((ours / name).read_text()) != json.loads((reference / name).read_text()):
            problems.append(f"{name} differs")
    return problems


def train_two_steps(engine, model, rank: int, probe: torch.Tensor) -> torch.Tensor:
    """Two steps on rank-dependent ids, then the eval-mode logits of ``probe``."""
    for step in range(2):
        ids = (torch.arange(12).reshape(2, 6) * (rank + 2 + step)) % VOCAB
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()
    model.eval()
    with torch.no_grad():
        return model(input_ids=probe).logits


def export_after_training(rank: int, world: int, dirs: dict[str, str], out_root: str) -> dict:
    from accelerate.utils import extract_model_from_parallel
    from transformers import AutoModelForCausalLM

    out = {}
    x = torch.arange(12).reshape(2, 6) % VOCAB
    for name in ("gpt2", "llama_sharded", "mixtral", "qwen2_moe"):
        root = Path(out_root) / name
        model = hf_zero.from_pretrained(dirs[name])
        model.train()
        engine = hf_zero.initialize(model, {
            "train_micro_batch_size_per_gpu": 1, "gradient_clipping": 0.0,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}},
            "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0, "reduce_bucket_size": 2000}})
        trained_logits = train_two_steps(engine, model, rank, x)
        with hf_zero.GatheredParameters(list(model.parameters())):
            gathered = {k: v.detach().clone() for k, v in model.state_dict().items()}
        # accelerate's run_clm_no_trainer ending: unwrap_model(model).save_pretrained(...) on every rank
        extract_model_from_parallel(model).save_pretrained(root / "save_pretrained", is_main_process=rank == 0,
                                                           save_function=torch.save, max_shard_size=SHARD)
        engine.save_checkpoint(str(root / "ckpt"))
        # every rank: gathers one unit at a time (fused MoE experts included), as GatheredParameters did
        got = model.state_dict()
        out[name, "state_dict_equal"] = list(got) == list(gathered) and all(
            got[k].dtype == v.dtype and torch.equal(got[k], v) for k, v in gathered.items())
        engine.destroy()
        if rank != 0:
            continue
        hf_zero.consolidate(root / "ckpt", root / "consolidated", max_shard_size=SHARD)
        reference = AutoModelForCausalLM.from_pretrained(dirs[name])
        reference.load_state_dict(gathered)
        reference.save_pretrained(root / "reference", max_shard_size=SHARD)
        for kind in ("save_pretrained", "consolidated"):
            out[name, kind, "layout"] = _compare(root / kind, root / "reference")
            reloaded = AutoModelForCausalLM.from_pretrained(root / kind)
            with torch.no_grad():
                out[name, kind, "logits"] = (reloaded(input_ids=x).logits - trained_logits).abs().max().item()
    out["lora"] = _lora_adapter(rank, dirs["gpt2"], Path(out_root) / "lora")
    return out


def _lora_adapter(rank: int, base_dir: str, root: Path) -> dict:
    """A LoRA model under stage 3: model.save_pretrained on every rank writes the adapter as peft does."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(hf_zero.from_pretrained(base_dir), LoraConfig(r=4, target_modules=["c_attn"],
                                                                         fan_in_fan_out=True))
    engine = hf_zero.initialize(model, {"train_micro_batch_size_per_gpu": 1, "gradient_clipping": 0.0,
                                        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}},
                                        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}})
    ids = (torch.arange(12).reshape(2, 6) * (rank + 2)) % VOCAB
    engine.backward(engine(input_ids=ids, labels=ids).loss)
    engine.step()
    with hf_zero.GatheredParameters([p for p in model.parameters() if p.requires_grad]):
        trained = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    model.save_pretrained(root, is_main_process=rank == 0)
    engine.destroy()
    if rank != 0:
        return {}
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), root)
    got = {n: p.detach() for n, p in reloaded.named_parameters() if "lora_" in n}
    return {"files": sorted(p.name for p in root.iterdir()),
            "equal": set(got) == set(trained) and all(torch.equal(got[n], trained[n]) for n in trained),
            "nonzero_b": any(v.abs().sum() > 0 for n, v in got.items() if "lora_B" in n)}
