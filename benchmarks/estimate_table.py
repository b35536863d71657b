"""The docs/diagnostics.md table: hf_zero's estimator vs DeepSpeed's formulas for Llama 7B/70B/405B.

    python benchmarks/estimate_table.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hf_zero.diagnostics.estimator import deepspeed_estimate, estimate  # noqa: E402
from hf_zero.diagnostics.report import load_model_config, model_shape  # noqa: E402

LLAMAS = {
    "7B": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000),
    "70B": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                num_key_value_heads=8, vocab_size=32000),
    "405B": dict(hidden_size=16384, intermediate_size=53248, num_hidden_layers=126, num_attention_heads=128,
                 num_key_value_heads=8, vocab_size=128256),
}
GIB = 1 << 30


def main() -> None:
    print("| model | GPUs | stage | offload | hf_zero device model states GiB | hf_zero host GiB | "
          "DeepSpeed estimate GiB |")
    print("|---|---|---|---|---|---|---|")
    for name, sizes in LLAMAS.items():
        shape = model_shape(load_model_config("llama", sizes))
        for gpus in (8, 64, 512):
            for stage, offload in ((2, "none"), (2, "cpu"), (3, "none"), (3, "cpu")):
                e = estimate(shape, gpus, stage, offload, mixed=True)
                ds = deepspeed_estimate(stage, shape.num_params, shape.largest_layer_params, gpus, offload)
                print(f"| {name} ({shape.num_params / 1e9:.1f} B) | {gpus} | {stage} | {offload} | "
                      f"{e.device_model_states / GIB:.1f} | {e.host_model_states / GIB:.1f} | {ds / GIB:.1f} |")


if __name__ == "__main__":
    main()
