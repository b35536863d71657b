"""accelerate and peft are optional (pyproject.toml's extras): the core engine imports and trains a
plain torch model without them, and the integrations that need accelerate say which extra to install."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Runs in a fresh interpreter with accelerate and peft made unimportable (a None entry in
# sys.modules makes `import x` raise ImportError and find_spec return None).
SCRIPT = textwrap.dedent("""
    import sys
    sys.modules["accelerate"] = None
    sys.modules["peft"] = None
    import torch
    import hf_zero

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    config = {"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 2},
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}}}
    engine = hf_zero.initialize(model, config)
    before = [p.detach().clone() for p in model.parameters()]
    engine.backward(model(torch.randn(4, 8)).square().mean())
    engine.step()
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters())), "no parameter moved"
    try:
        hf_zero.HfZeroTrainer
    except ImportError as error:
        print("IMPORT ERROR:", error)
    leaked = [m for m in sys.modules if m.split(".")[0] in ("accelerate", "peft") and sys.modules[m] is not None]
    print("LEAKED:", leaked)
""")


def test_core_engine_without_accelerate_and_peft():
    result = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "IMPORT ERROR: hf_zero.HfZeroTrainer needs accelerate" in result.stdout, result.stdout
    assert "pip install 'hf_zero[accelerate]'" in result.stdout
    assert "LEAKED: []" in result.stdout
