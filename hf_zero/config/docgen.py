"""Render docs/config.md from the schema: ``python -m hf_zero.config.docgen > docs/config.md``."""

from __future__ import annotations

import dataclasses
import typing

from hf_zero.config.schema import IGNORED_DEEPSPEED_KEYS, HfZeroConfig

HEADER = """# hf_zero configuration reference

hf_zero reads DeepSpeed's JSON keys, so an existing `ds_config.json` loads unchanged
(`hf_zero.initialize(model, "ds_config.json")`, a dict, inline JSON, or YAML). Every key is
validated before any process-group or tensor work; all problems are reported together in
one `hf_zero.ConfigError`, each naming its dotted key (with a did-you-mean for typos).
`"auto"` is accepted where marked and must be resolved by an integration (the Trainer or
accelerate plugin) before `initialize`, which otherwise names the unresolved keys.

Batch invariant (DeepSpeed's): `train_batch_size = train_micro_batch_size_per_gpu x
gradient_accumulation_steps x data-parallel world size`. A missing one is derived from
the other two; only the micro batch given means accumulation 1; giving neither
`train_batch_size` nor `train_micro_batch_size_per_gpu` is an error.

Defaults chosen on purpose: `gradient_clipping` is 1.0 (as DeepSpeed 0.19); optimizer type
`Adam` means AdamW unless `adam_w_mode` is false. `reduce_bucket_size` and
`allgather_bucket_size` default to 6,553,600 elements (25 MiB of fp32, DDP's bucket), not
DeepSpeed's 5e8: a bucket is transient memory during the step (stage 2 stages gradients
into it before the reduce-scatter; stages 1-2 all-gather that much after the step), and 5e8
elements make one bucket of any model below 500M parameters, so the step's peak would grow
with the model (measured in docs/performance.md, "What the step really holds"). A value
set explicitly, DeepSpeed's included, is used as given (0, as DeepSpeed allows: one parameter per
bucket). Stage 3's
`stage3_prefetch_bucket_size` (5e7) and `stage3_max_live_parameters` (1e9) keep DeepSpeed's
defaults: they bound the gathered parameters by a fixed number of elements.
Optimizer types: DeepSpeed's names in any case, `optimizer.params` holding only the
parameters the type takes, `None` defaults meaning the type's own (see docs/design.md,
"Optimizers", for the formulas and what Lamb and Muon cost on shards).

| key | type | default | auto | description |
|---|---|---|---|---|
"""


SEMANTICS = """
## LR schedules and fp16 loss scaling: DeepSpeed 0.19.8's, step for step

`tests/test_schedules_and_scaler.py` compares both with sequences recorded from DeepSpeed
0.19.8's own classes (`tests/data/deepspeed_schedules.json`).

- **Schedules** are driven as DeepSpeed's engine drives them: built once (that sets the lr of
  the first optimizer step), then stepped after every optimizer step that was not skipped
  (fp16 overflow); the HF Trainer and accelerate integrations follow the same protocol. With
  `i` = DeepSpeed's `last_batch_iteration` (-1 before the first step), optimizer step `k`
  (1-based) uses the schedule at `i = k - 2`: `i = -1` gives `warmup_min_lr`
  (WarmupLR/WarmupDecayLR) or 0 (WarmupCosineLR: a ratio of 0, not `warmup_min_ratio`). Warmup
  lasts `W = max(2, warmup_num_steps)` with gamma `ln(i + 1) / ln(W)` (`log`) or `i / W`
  (`linear`), so **the first two optimizer steps both use the minimum**; the maximum is
  reached at step `W + 1` (`log`) or `W + 2` (`linear`). WarmupDecayLR then decays linearly
  to 0 at `i = total_num_steps`; WarmupCosineLR decays to `cos_min_ratio` at `i = total_num_steps - 1` and stays there.
  `warmup_max_lr` omitted: each parameter group's own lr for WarmupLR, but 0.001 for
  WarmupDecayLR (DeepSpeed's defaults). A checkpoint stores the torch scheduler state;
  `last_epoch` counts scheduler steps, i.e. `last_batch_iteration + 1`.
- **Dynamic loss scale** (`fp16.loss_scale` 0): starts at `2**initial_scale_power`. Every
  optimizer step is one update `i` (0-based); a clean update doubles the scale when
  `stable = i - last_overflow - 1` is positive and a multiple of `loss_scale_window`, so the
  first doubling comes after `loss_scale_window + 1` clean steps (e.g. window 2 from 256:
  256, 256, 512, 512, 1024 after each step) and then every `loss_scale_window` clean steps.
  An overflow skips the step everywhere (the scheduler does not step) and spends one unit of
  `hysteresis`, or halves the scale (not below `min_loss_scale`) when one unit is left;
  hysteresis refills when the scale grows, or after every clean step with
  `consecutive_hysteresis`. An overflow that would halve a scale already at
  `min_loss_scale` raises `LossScaleAtMinimumError` (DeepSpeed's ZeRO optimizers stop there
  too). Known difference: on a step where the scale doubles, DeepSpeed 0.19.8 divides the
  gradients by the doubled scale (it updates the scale before unscaling), halving that step's
  gradient unless clipping binds; hf_zero divides by the scale the loss was multiplied with.
"""


def _type_name(hint: typing.Any) -> str:
    args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    names = sorted({getattr(a, "__name__", str(a)) for a in args} - {"str"}) or ["str"]
    return " / ".join(names)


def _rows(cls: type, prefix: str) -> list[str]:
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        nested = [a for a in (typing.get_args(hint) or (hint,)) if isinstance(a, type) and dataclasses.is_dataclass(a)]
        if nested:
            rows.append(f"| `{prefix}{f.name}` | object | | | {f.metadata['doc']} |")
            rows.extend(_rows(nested[0], f"{prefix}{f.name}."))
            continue
        meta = f.metadata
        kind = _type_name(hint)
        if "choices" in meta:
            kind = " \\| ".join(f"`{c}`" for c in meta["choices"])
        default = f.default if f.default is not dataclasses.MISSING else ""
        rows.append(f"| `{prefix}{f.name}` | {kind} | `{default}` | {'yes' if meta.get('auto') else ''} "
                    f"| {meta['doc']} |")
    return rows


UNHONOURED = """## DeepSpeed keys hf_zero does not honour

Every key DeepSpeed accepts loads. A key hf_zero does not honour is reported in one warning
naming it and what hf_zero does instead (`hf-zero check-config FILE` lists them). Where
that changes numerics or memory (marked **error** below) the config is refused unless it
sets `"allow_unhonoured_keys": true` (a top-level key); then it runs with the warning.
Aliases DeepSpeed accepts are rewritten first: `bfloat16` -> `bf16`,
`zero_optimization.stage3_gather_fp16_weights_on_model_save` ->
`stage3_gather_16bit_weights_on_model_save`, `zero_optimization.cpu_offload: true` ->
`offload_optimizer.device: cpu` (`cpu_offload_param` -> `offload_param`,
`cpu_offload_use_pin_memory` -> their `pin_memory`), the short field names DeepSpeed's zero
config also takes (`max_live_parameters` -> `stage3_max_live_parameters`, likewise
`prefetch_bucket_size`, `param_persistence_threshold`, `max_reuse_distance`,
`gather_16bit_weights_on_model_save`, ...), optimizer type names in any case (`adamw`, `LAMB`).
`optimizer.params` may hold only the parameters the chosen type takes (DeepSpeed's
constructor would fail on others); fp16 and bf16 both enabled is an error, as in DeepSpeed.
Deliberate difference: an unknown key is an error (with a did-you-mean), where DeepSpeed's
top level would ignore a misspelt key.

| key | not honoured when | what happens instead | |
|---|---|---|---|
"""


def render() -> str:
    from hf_zero.config.compat import DTYPE_KEYS, RULES

    rules = "\n".join(f"| `{key}` | {_when(key)} | {instead} | {'**error**' if severe else 'warning'} |"
                       for key, _, instead, severe in RULES)
    rules += "".join(f"\n| `{key}` | not the training dtype | {instead} | **error** |"
                     for key, instead in DTYPE_KEYS.items())
    ignored = "\n".join(f"- `{k}`: {v}" for k, v in sorted(IGNORED_DEEPSPEED_KEYS.items()))
    return (HEADER + "\n".join(_rows(HfZeroConfig, "")) + "\n\n" + UNHONOURED + rules
            + "\n\n## DeepSpeed keys accepted and ignored (with a warning)\n\n" + ignored
            + "\n\nAny other key is an error.\n" + SEMANTICS)


def _when(key: str) -> str:
    from hf_zero.config.compat import WHEN

    return WHEN.get(key, "true")


if __name__ == "__main__":
    print(render(), end="")
