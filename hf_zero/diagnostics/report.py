"""``hf-zero estimate``: the estimator's table for a model config, no weights needed."""

from __future__ import annotations

from typing import Optional

from hf_zero.diagnostics.estimator import OFFLOADS, ModelShape, estimate, hybrid_estimates, largest_model_fitting

GIB = 1 << 30


def model_shape(config) -> ModelShape:
    """Exact parameter counts from a transformers config, built on the meta device."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    seen: set[int] = set()
    total, largest = 0, 0
    for module in model.modules():
        own = [p for p in module.parameters(recurse=False) if id(p) not in seen]
        seen.update(id(p) for p in own)
        layer = sum(p.numel() for p in own)
        total += layer
        largest = max(largest, layer)
    get = lambda *names: next(getattr(config, n) for n in names if getattr(config, n, None) is not None)  # noqa: E731
    return ModelShape(total, get("hidden_size", "n_embd"), get("num_hidden_layers", "n_layer"),
                      get("num_attention_heads", "n_head"), get("vocab_size"), largest)


def load_model_config(spec: str, overrides: dict):
    """A config.json path / directory, or a model type such as ``llama`` with size overrides."""
    from pathlib import Path

    from transformers import AutoConfig

    if Path(spec).exists():
        config = AutoConfig.from_pretrained(spec)
        for key, value in overrides.items():
            setattr(config, key, value)
        return config
    return AutoConfig.for_model(spec, **overrides)


def render(shape: ModelShape, world: int, mixed: bool, micro_batch: int, seq: int,
           device_memory: Optional[float], nodes: int = 1) -> str:
    lines = [f"model: {shape.num_params / 1e9:.3f} B parameters "
             f"(largest layer {shape.largest_layer_params / 1e6:.1f} M), "
             f"{world} data-parallel ranks, {'bf16/fp16 mixed' if mixed else 'fp32'}, micro-batch {micro_batch} x "
             f"seq {seq}",
             "| stage | offload | device model states GiB | host GiB | buffers GiB | activations GiB "
             "(ckpt) | device total GiB (ckpt) |" + (" largest model fitting (B params) |" if device_memory else ""),
             "|---|---|---|---|---|---|---|" + ("---|" if device_memory else "")]
    for stage in range(4):
        for offload in OFFLOADS if stage > 0 else ("none",):   # offload starts at stage 1
            e = estimate(shape, world, stage, offload, mixed, micro_batch, seq)
            row = (f"| {stage} | {offload} | {e.device_model_states / GIB:.2f} | {e.host_model_states / GIB:.2f} | "
                   f"{e.buffers / GIB:.2f} | {e.activations / GIB:.2f} ({e.activations_checkpointed / GIB:.2f}) | "
                   f"{e.device_total / GIB:.2f} ({e.device_total_checkpointed / GIB:.2f}) |")
            if device_memory:
                row += f" {largest_model_fitting(device_memory, world, stage, offload, mixed) / 1e9:.2f} |"
            lines.append(row)
    if nodes > 1:
        lines += _hybrid_lines(shape, nodes, world // nodes, mixed)
    return "\n".join(lines)


def _hybrid_lines(shape: ModelShape, nodes: int, per_node: int, mixed: bool) -> list[str]:
    """Hybrid sharding with one group per node: mics_shard_size / zero_hpz_partition_size = ranks per node."""
    lines = ["", f"Across {nodes} nodes of {per_node} ranks (mics_shard_size / zero_hpz_partition_size: {per_node}); "
             "communication per rank per step, logical payload (docs/design.md, [Note: hybrid sharding]):",
             "| layout | stage | device model states GiB | inter-node GiB/step | intra-node GiB/step |",
             "|---|---|---|---|---|"]
    for e in hybrid_estimates(shape.num_params, nodes, per_node, mixed):
        lines.append(f"| {e.layout} | {e.stage} | {e.model_states / GIB:.2f} | {e.inter_node_bytes / GIB:.2f} | "
                     f"{e.intra_node_bytes / GIB:.2f} |")
    return lines
