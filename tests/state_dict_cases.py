"""Rank functions: model.state_dict() / save_pretrained / accelerate's get_state_dict and save_model
on a model sharded at stage 3, called on every rank (gathers) or on rank 0 alone (raises, no hang).

References: ``state_dict()`` of an unsharded copy of the same model (torch's key set, tied names
and buffers included), peft's ``get_peft_model_state_dict`` of that copy, and
``AutoModelForCausalLM.from_pretrained`` of what was written.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch
import torch.distributed as dist

import hf_zero
from export_cases import train_two_steps
from parity_cases import VOCAB, tiny_gpt2, tiny_llama

PROBE = torch.arange(12).reshape(2, 6) % VOCAB   # the ids whose logits are compared after reloading
TIMEOUT_S = 3.0   # presence_timeout here: a lone call raises after it (all-rank calls start within ms)


def _config(**extra) -> dict:
    return {"train_micro_batch_size_per_gpu": 1, "gradient_clipping": 0.0, "presence_timeout": TIMEOUT_S,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}},
            "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0, "reduce_bucket_size": 2000},
            **extra}


def differences(got: dict, want: dict) -> list[str]:
    """Keys, then dtype, shape and exact values of each entry."""
    if list(got) != list(want):
        return [f"keys differ: {sorted(set(got) ^ set(want))[:4]} (order or set)"]
    return [f"{k}: {got[k].dtype}{list(got[k].shape)} vs {want[k].dtype}{list(want[k].shape)}"
            for k in want if got[k].dtype != want[k].dtype or got[k].shape != want[k].shape
            or not torch.equal(got[k].cpu(), want[k].cpu())]


def _alone_on_rank0(rank: int, call) -> dict:
    """``call()`` on rank 0 only while rank 1 goes on (to the barrier): rank 0 must raise in time."""
    out = {}
    if rank == 0:
        start = time.monotonic()
        try:
            call()
            out["error"] = None
        except hf_zero.RanksAbsent as err:
            out["error"] = str(err)
        out["seconds"] = time.monotonic() - start
    dist.barrier()   # rank 1 is here at once, not stuck in a gather
    return out


def state_dicts(rank: int, world: int, out_root: str) -> dict:
    out = {}
    for name, build in (("gpt2", tiny_gpt2), ("llama", tiny_llama)):
        reference = build()
        want = reference.state_dict()
        model = copy.deepcopy(reference)
        engine = hf_zero.initialize(model, _config())
        most = _most_gathered_during(model, model.state_dict)
        got = most.pop("result")
        out[name, "all_ranks"] = differences(got, want)
        # tied names share one tensor, as torch's entries share the parameter's storage
        out[name, "tied_shared"] = (got["lm_head.weight"].data_ptr() == got["transformer.wte.weight"].data_ptr()
                                    if name == "gpt2" else None)
        out[name, "most_gathered_groups"] = most["most"]
        out[name, "sharded_after"] = all(p.numel() == 0 for p in model.parameters())
        block = model.transformer.h[0] if name == "gpt2" else model.model.layers[0]
        ref_block = reference.transformer.h[0] if name == "gpt2" else reference.model.layers[0]
        out[name, "submodule"] = differences(block.state_dict(), ref_block.state_dict())
        out[name, "prefixed"] = differences(block.state_dict(prefix="block"), ref_block.state_dict(prefix="block"))
        out[name, "lone"] = _alone_on_rank0(rank, model.state_dict)
        out[name, "then_all_ranks"] = differences(model.state_dict(), want)   # rounds still in step
        engine.destroy()
    out["bf16"] = _bf16(rank)
    out["offload_param_nvme"] = _offload_param_nvme(Path(out_root) / "swap")
    out["peft"] = _peft()
    out["save_pretrained"] = _save_pretrained(rank, Path(out_root) / "save_pretrained")
    out["accelerate"] = _accelerate(rank, Path(out_root) / "accelerate")
    for name in ("gpt2", "mixtral"):
        out["accelerate_layout", name] = _accelerate_layout(rank, name, Path(out_root) / f"layout_{name}")
    return out


def _most_gathered_during(model: torch.nn.Module, call) -> dict:
    """``call()``'s result, the most stage-3 groups gathered at once while it ran and the gathers."""
    groups = list({id(p._hf_zero_group): p._hf_zero_group for p in model.parameters()}.values())
    most, calls = [0], [0]
    originals = {}
    for group in groups:
        originals[id(group)] = group.gather

        def gather(comm=None, _group=group):
            originals[id(_group)](comm)
            calls[0] += 1
            most[0] = max(most[0], sum(g.gathered for g in groups))

        group.gather = gather
    try:
        result = call()
    finally:
        for group in groups:
            del group.gather
    return {"result": result, "most": most[0], "calls": calls[0]}


def _bf16(rank: int) -> list[str]:
    """dtype as the module holds it: a bf16 engine's state_dict equals the bf16 reference's."""
    reference = tiny_llama()
    model = copy.deepcopy(reference)
    engine = hf_zero.initialize(model, _config(bf16={"enabled": True}))
    result = differences(model.state_dict(), reference.to(torch.bfloat16).state_dict())
    engine.destroy()
    return result


def _offload_param_nvme(swap: Path) -> list[str]:
    """Shards that live in a swap file (offload_param nvme) are gathered the same way."""
    swap.mkdir(parents=True, exist_ok=True)
    reference = tiny_llama()
    model = copy.deepcopy(reference)
    zero = _config()["zero_optimization"]
    engine = hf_zero.initialize(model, _config(zero_optimization={
        **zero, "offload_param": {"device": "nvme", "nvme_path": str(swap), "max_in_cpu": 0}}))
    result = differences(model.state_dict(), reference.state_dict())
    engine.destroy()
    return result


def _peft() -> list[str]:
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    lora = LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True, init_lora_weights=False)
    reference = get_peft_model(tiny_gpt2(), lora)
    model = copy.deepcopy(reference)
    engine = hf_zero.initialize(model, _config())
    result = differences(get_peft_model_state_dict(model), get_peft_model_state_dict(reference))
    engine.destroy()
    return result


def _train_and_logits(engine, model, rank: int) -> torch.Tensor:
    return train_two_steps(engine, model, rank, PROBE)


def _save_pretrained(rank: int, root: Path) -> dict:
    from transformers import AutoModelForCausalLM

    model = tiny_llama()
    engine = hf_zero.initialize(model, _config())
    trained = _train_and_logits(engine, model, rank)
    out = {"lone": _alone_on_rank0(rank, lambda: model.save_pretrained(root / "lone"))}
    out["lone_wrote"] = (root / "lone").exists()
    out["lone_16bit"] = _alone_on_rank0(rank, lambda: engine.save_16bit_model(str(root / "lone16")))
    model.save_pretrained(root / "all", is_main_process=rank == 0)
    engine.destroy()
    if rank == 0:
        reloaded = AutoModelForCausalLM.from_pretrained(root / "all")
        with torch.no_grad():
            out["logits"] = (reloaded(input_ids=PROBE).logits - trained).abs().max().item()
    return out


def _accelerate_trained(build, rank: int) -> tuple:
    """An accelerate loop's model under stage 3 after 2 steps: (accelerator, model, engine,
    trained logits, the gathered state dict)."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model = build()
    model, optimizer = hf_zero.prepare_accelerate(accelerator, model, torch.optim.AdamW(model.parameters(), lr=1e-2),
                                                  config={k: v for k, v in _config().items() if k != "optimizer"})
    model, optimizer = accelerator.prepare(model, optimizer)
    engine = accelerator.hf_zero_engine
    trained = _train_and_logits(engine, model, rank)
    with hf_zero.GatheredParameters(list(model.parameters())):
        gathered = {k: v.clone() for k, v in model.state_dict().items()}
    return accelerator, model, engine, trained, gathered


def _accelerate(rank: int, root: Path) -> dict:
    """accelerate's contract: every rank calls get_state_dict / save_model; the main process writes."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    accelerator, model, engine, trained, gathered = _accelerate_trained(tiny_gpt2, rank)
    out = {"get_state_dict": differences(accelerator.get_state_dict(model), gathered)}
    out["lone"] = _alone_on_rank0(rank, lambda: accelerator.get_state_dict(model))
    # save_state writes hf_zero's sharded checkpoint: the model is not gathered for it
    saving = _most_gathered_during(model, lambda: accelerator.save_state(str(root / "state")))
    out["save_state_gathers"] = saving["calls"]
    accelerator.save_model(model, root, max_shard_size="20KB")
    engine.destroy()
    if rank == 0:
        files = sorted(root.glob("*.safetensors"))
        written = {k: v for f in files for k, v in load_file(str(f)).items()}
        out["files"] = len(files)
        out["written"] = [k for k, v in written.items() if not torch.equal(v, gathered[k])]
        reloaded = AutoModelForCausalLM.from_pretrained(root)
        with torch.no_grad():
            out["logits"] = (reloaded(input_ids=PROBE).logits - trained).abs().max().item()
    return out


def _accelerate_layout(rank: int, name: str, root: Path) -> dict:
    """After 2 stage-3 steps: accelerator.save_model, and the idiom
    ``unwrap_model(model).save_pretrained(out, state_dict=accelerator.get_state_dict(model))``, each
    against transformers' save_pretrained of an unsharded copy holding the gathered weights
    (GPT-2: tied head; Mixtral: fused experts saved as per-expert keys)."""
    from export_cases import _compare
    from pretrained_cases import tiny_mixtral
    from transformers import AutoModelForCausalLM

    build = {"gpt2": tiny_gpt2, "mixtral": tiny_mixtral}[name]
    accelerator, model, engine, trained, gathered = _accelerate_trained(build, rank)
    accelerator.save_model(model, root / "save_model", max_shard_size="20KB")
    accelerator.unwrap_model(model).save_pretrained(root / "idiom", state_dict=accelerator.get_state_dict(model),
                                                    is_main_process=accelerator.is_main_process,
                                                    max_shard_size="20KB")
    dist.barrier()
    engine.destroy()
    if rank != 0:
        return {}
    reference = build()
    reference.load_state_dict(gathered)
    reference.save_pretrained(root / "reference", max_shard_size="20KB")
    out = {}
    want = _saved_tensors(root / "reference")
    for kind in ("save_model", "idiom"):
        got = _saved_tensors(root / kind)
        out[kind, "keys"] = sorted(set(got) ^ set(want))[:6]
        out[kind, "shapes_dtypes"] = [k for k in set(got) & set(want) if got[k] != want[k]]
        # file names, index, values, config.json / generation_config.json (when the file set agrees)
        files = [sorted(p.name for p in (root / d).iterdir()) for d in (kind, "reference")]
        out[kind, "layout"] = _compare(root / kind, root / "reference") if files[0] == files[1] else [files]
        reloaded = AutoModelForCausalLM.from_pretrained(root / kind)
        with torch.no_grad():
            out[kind, "logits"] = (reloaded(input_ids=PROBE).logits - trained).abs().max().item()
    return out


def _saved_tensors(directory: Path) -> dict:
    """key -> (dtype, shape) over every safetensors file in ``directory``."""
    from safetensors import safe_open

    found = {}
    for f in sorted(directory.glob("*.safetensors")):
        with safe_open(str(f), "pt") as handle:
            for key in handle.keys():
                part = handle.get_slice(key)
                found[key] = (part.get_dtype(), tuple(part.get_shape()))
    return found
