"""The README's main job, launched by the real launcher (torchrun, 2 gloo processes)."""

import os
import subprocess
import sys
from pathlib import Path

import torch


def test_demo_trains_and_saves_loadable_artifacts(tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "hf_zero.demo", "--steps", "12",
         "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    first, last = (float(v) for v in result.stdout.split("loss ")[1].split(" in ")[0].split(" -> "))
    assert last < first

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from hf_zero.demo.__main__ import build_model

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    base = build_model(0).base_model.model  # same seed: the untrained base weights
    reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter").merge_and_unload()
    for (name, a), (_, b) in zip(sorted(merged.state_dict().items()), sorted(reloaded.state_dict().items())):
        torch.testing.assert_close(a, b, msg=name)
