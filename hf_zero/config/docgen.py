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
set explicitly, DeepSpeed's included, is used as given. Stage 3's
`stage3_prefetch_bucket_size` (5e7) and `stage3_max_live_parameters` (1e9) keep DeepSpeed's
defaults: they bound the gathered parameters by a fixed number of elements.

| key | type | default | auto | description |
|---|---|---|---|---|
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
        nested = [a for a in (typing.get_args(hint) or (hint,)) if dataclasses.is_dataclass(a)]
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


def render() -> str:
    ignored = "\n".join(f"- `{k}`: {v}" for k, v in sorted(IGNORED_DEEPSPEED_KEYS.items()))
    return (HEADER + "\n".join(_rows(HfZeroConfig, "")) + "\n\n## DeepSpeed keys accepted and ignored "
            "(with a warning)\n\n" + ignored + "\n\nAny other key is an error.\n")


if __name__ == "__main__":
    print(render(), end="")
