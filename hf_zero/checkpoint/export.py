"""Write a live model in Hugging Face layout (``save_pretrained`` when the model has it)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file


def save_model_hf(module: torch.nn.Module, save_dir: str | Path, dtype: torch.dtype, is_writer: bool) -> None:
    if not is_writer:
        return
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    state = {k: (v.detach().to(dtype) if v.is_floating_point() else v.detach())
             for k, v in module.state_dict().items()}
    if hasattr(module, "save_pretrained"):
        # transformers/peft handle tied weights, weight-name conversion and adapter filtering
        module.save_pretrained(save_dir, state_dict=state, safe_serialization=True)
    else:
        save_file({k: v.contiguous() for k, v in state.items()}, str(save_dir / "model.safetensors"))
