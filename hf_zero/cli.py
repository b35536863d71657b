"""The ``hf-zero`` command. Today: ``hf-zero check-config CONFIG [--world-size N]``."""

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hf-zero", description="hf_zero: ZeRO for the Hugging Face stack")
    parser.add_argument("--version", action="version", version=f"hf_zero {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check-config", help="validate a DeepSpeed-style config and print it resolved")
    check.add_argument("config", help="JSON/YAML path or inline JSON")
    check.add_argument("--world-size", type=int, default=0, help="also resolve the batch-size invariant")
    check.set_defaults(run=_check_config)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
