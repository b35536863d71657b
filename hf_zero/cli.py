"""The ``hf-zero`` command: ``check-config`` and ``consolidate``."""

from __future__ import annotations

import argparse
import json
import sys

from hf_zero import __version__
from hf_zero.config import ConfigError, config_to_dict, load_config, resolve_batch_sizes


def _check_config(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
        if args.world_size:
            config = resolve_batch_sizes(config, args.world_size)
    except (ConfigError, FileNotFoundError) as err:
        print(err, file=sys.stderr)
        return 2
    print(json.dumps(config_to_dict(config), indent=2))
    return 0


def _consolidate(args: argparse.Namespace) -> int:
    from hf_zero.checkpoint import consolidate

    max_shard: int | str = int(args.max_shard_size) if args.max_shard_size.isdigit() else args.max_shard_size
    out = consolidate(args.checkpoint_dir, args.out_dir, tag=args.tag, max_shard_size=max_shard,
                      dtype=args.dtype, adapter_only=args.adapter_only)
    print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hf-zero", description="hf_zero: ZeRO for the Hugging Face stack")
    parser.add_argument("--version", action="version", version=f"hf_zero {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check-config", help="validate a DeepSpeed-style config and print it resolved")
    check.add_argument("config", help="JSON/YAML path or inline JSON")
    check.add_argument("--world-size", type=int, default=0, help="also resolve the batch-size invariant")
    check.set_defaults(run=_check_config)
    cons = commands.add_parser("consolidate", help="write a checkpoint as Hugging Face safetensors")
    cons.add_argument("checkpoint_dir")
    cons.add_argument("out_dir")
    cons.add_argument("--tag", default=None, help="default: the one named in 'latest'")
    cons.add_argument("--max-shard-size", default="5GB", help="e.g. 5GB, 500MB or a byte count")
    cons.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"))
    cons.add_argument("--adapter-only", action="store_true", help="write only the peft adapter")
    cons.set_defaults(run=_consolidate)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
