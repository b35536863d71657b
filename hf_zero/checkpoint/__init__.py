"""Sharded, atomic, world-size-agnostic checkpoints and their consolidation to HF format."""

from hf_zero.checkpoint.consolidate import consolidate
from hf_zero.checkpoint.files import CheckpointError
from hf_zero.checkpoint.load import load_checkpoint
from hf_zero.checkpoint.save import save_checkpoint

__all__ = ["CheckpointError", "consolidate", "load_checkpoint", "save_checkpoint"]
