"""The ``hf-zero`` command: ``check-config``, ``consolidate``, ``estimate``, ``env``, ``launch`` and
``import-deepspeed``."""

from __future__ import annotations

import argparse
import json
import sys
import warnings

from hf_zero import __version__
from hf_zero.config import ConfigError, config_to_dict, load_config, resolve_batch_sizes


def _check_config(args: argparse.Namespace) -> int:
    from hf_zero.config.parse import unhonoured_keys

    try:
        notes = unhonoured_keys(args.config)
        with warnings.catch_warnings():   # listed below instead, once
            warnings.simplefilter("ignore")
            config = load_config(args.config)
        if args.world_size:
            config = resolve_batch_sizes(config, args.world_size)
    except (ConfigError, FileNotFoundError) as err:
        print(err, file=sys.stderr)
        return 2
    print(json.dumps(config_to_dict(config), indent=2))
    # The resolved config goes to stdout (machine-readable); what is not honoured to stderr.
    if notes:
        print(f"{len(notes)} DeepSpeed key(s) hf_zero accepts without honouring them:", file=sys.stderr)
    for note in notes:
        severity = " [changes numerics or memory; allowed by allow_unhonoured_keys]" if note.severe else ""
        print(f"  {note.key}: {note.instead}{severity}", file=sys.stderr)
    return 0


def _consolidate(args: argparse.Namespace) -> int:
    from hf_zero.checkpoint import consolidate

    max_shard: int | str = int(args.max_shard_size) if args.max_shard_size.isdigit() else args.max_shard_size
    out = consolidate(args.checkpoint_dir, args.out_dir, tag=args.tag, max_shard_size=max_shard,
                      dtype=args.dtype, adapter_only=args.adapter_only)
    print(f"wrote {out}")
    return 0


def _import_deepspeed(args: argparse.Namespace) -> int:
    from hf_zero.checkpoint import CheckpointError
    from hf_zero.checkpoint.deepspeed_import import import_deepspeed

    try:
        out = import_deepspeed(args.ds_checkpoint_dir, args.out_dir, tag=args.tag, model_config=args.model_config)
    except (CheckpointError, ValueError) as err:
        print(f"hf-zero import-deepspeed: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


def _estimate(args: argparse.Namespace) -> int:
    import json as json_module

    from hf_zero.diagnostics.report import load_model_config, model_shape, render

    overrides = json_module.loads(args.set) if args.set else {}
    shape = model_shape(load_model_config(args.model, overrides))
    memory = _parse_bytes(args.device_memory) if args.device_memory else None
    print(render(shape, args.world_size * args.nodes, args.dtype != "fp32", args.micro_batch, args.seq, memory,
                 nodes=args.nodes))
    return 0


def _parse_bytes(text: str) -> float:
    units = {"TB": 1e12, "GB": 1e9, "MB": 1e6, "TIB": 2**40, "GIB": 2**30, "MIB": 2**20}
    upper = text.strip().upper()
    for unit, factor in units.items():
        if upper.endswith(unit):
            return float(upper[: -len(unit)]) * factor
    return float(upper)


def _env(args: argparse.Namespace) -> int:
    from hf_zero.diagnostics.env_report import environment

    for key, value in environment().items():
        print(f"{key:<32} {value}")
    return 0


def _launch(args: argparse.Namespace) -> int:
    from hf_zero.integrations.launch import DEEPSPEED_UNSUPPORTED, launch
    from hf_zero.integrations.multinode import NodeOptions

    unsupported = [f"--{name}" for name, value in vars(args).items()
                   if f"--{name}" in DEEPSPEED_UNSUPPORTED and value is not None]
    if unsupported:
        print(f"hf-zero launch: {', '.join(unsupported)} (a `deepspeed` launcher option) is not supported: hf-zero "
              f"launch runs on every node (torchrun's rendezvous): start it on each node with --nnodes N "
              f"--node-rank I --master-addr HOST (or under srun), see docs/multinode.md", file=sys.stderr)
        return 2
    if args.config is not None and args.deepspeed is not None and args.config != args.deepspeed:
        print("hf-zero launch: --config and --deepspeed differ; give one", file=sys.stderr)
        return 2
    nodes = NodeOptions(nnodes=args.nnodes, node_rank=args.node_rank, master_addr=args.master_addr,
                        master_port=args.master_port, rdzv_backend=args.rdzv_backend, rdzv_endpoint=args.rdzv_endpoint,
                        rdzv_id=args.rdzv_id, max_restarts=args.max_restarts)
    try:
        return launch(args.config or args.deepspeed, args.nproc, args.script, args.script_args,
                      dry_run=args.dry_run, allow_unsharded=args.allow_unsharded, nodes=nodes)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        print(f"hf-zero launch: {err}", file=sys.stderr)
        return 2


def _add_launch(commands: argparse._SubParsersAction) -> None:
    from hf_zero.integrations.launch import DEEPSPEED_UNSUPPORTED

    launch = commands.add_parser("launch", help="run an unmodified HF Trainer / accelerate script under hf_zero "
                                 "(torchrun or accelerate launch)")
    launch.add_argument("--config", default=None, help="hf_zero / DeepSpeed config (JSON/YAML path or inline JSON), "
                        "or an accelerate config YAML with an 'hf-zero:' section or distributed_type: DEEPSPEED. "
                        "Default: the script's own --deepspeed CONFIG")
    launch.add_argument("--deepspeed", default=None, help="the same as --config (DeepSpeed's spelling)")
    launch.add_argument("--nproc", "--num_gpus", "--num_processes", dest="nproc", type=int, default=None,
                        help="local processes (default: 1, or the accelerate config's num_processes); "
                        "--num_gpus is the `deepspeed` launcher's spelling, --num_processes accelerate's")
    launch.add_argument("--allow-unsharded", action="store_true", help="let the script train without any model "
                        "sharded by hf_zero (otherwise every rank reports an error and the launch fails)")
    launch.add_argument("--dry-run", action="store_true", help="print the command instead of running it (under "
                        "SLURM: the command of every node)")
    _add_node_options(launch)
    for option in DEEPSPEED_UNSUPPORTED:   # named so that the error can say why, not "unrecognized"
        launch.add_argument(option, default=None, nargs="?", const="", help=argparse.SUPPRESS)
    launch.add_argument("script")
    launch.add_argument("script_args", nargs=argparse.REMAINDER)
    launch.set_defaults(run=_launch)


def _add_node_options(launch: argparse.ArgumentParser) -> None:
    """torchrun's multi-node options, in its spellings (and DeepSpeed's where they differ)."""
    nodes = launch.add_argument_group("several nodes (torchrun's options; default under SLURM: from the job)")
    nodes.add_argument("--nnodes", "--num_nodes", dest="nnodes", default=None,
                       help="nodes, or MIN:MAX for an elastic job (--num_nodes: DeepSpeed's spelling)")
    nodes.add_argument("--node-rank", "--node_rank", dest="node_rank", type=int, default=None,
                       help="this node's rank (static rendezvous)")
    nodes.add_argument("--master-addr", "--master_addr", dest="master_addr", default=None,
                       help="node 0's address (static rendezvous)")
    nodes.add_argument("--master-port", "--master_port", dest="master_port", type=int, default=None,
                       help="node 0's port (torchrun's default 29500)")
    nodes.add_argument("--rdzv-backend", "--rdzv_backend", dest="rdzv_backend", default=None,
                       help="e.g. c10d (with --rdzv-endpoint and --rdzv-id; no --node-rank needed)")
    nodes.add_argument("--rdzv-endpoint", "--rdzv_endpoint", dest="rdzv_endpoint", default=None, help="HOST:PORT")
    nodes.add_argument("--rdzv-id", "--rdzv_id", dest="rdzv_id", default=None, help="the job's rendezvous id")
    nodes.add_argument("--max-restarts", "--max_restarts", dest="max_restarts", type=int, default=None,
                       help="restart the whole group up to this many times after a rank fails; with checkpoints the "
                       "Trainer resumes from the last complete one (docs/multinode.md)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hf-zero", description="hf_zero: ZeRO for the Hugging Face stack")
    parser.add_argument("--version", action="version", version=f"hf_zero {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check-config", help="validate a DeepSpeed-style config, print it resolved and "
                                "list the DeepSpeed keys it holds that hf_zero does not honour")
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
    imp = commands.add_parser("import-deepspeed", help="convert a DeepSpeed ZeRO 1/2/3 checkpoint into an hf_zero "
                              "checkpoint (resumable at any world size and stage)")
    imp.add_argument("ds_checkpoint_dir", help="the directory holding 'latest', or a global_stepN directory")
    imp.add_argument("out_dir", help="hf_zero checkpoint directory to write (e.g. checkpoint-N/hf_zero)")
    imp.add_argument("--tag", default=None, help="default: the one named in 'latest'")
    imp.add_argument("--model-config", default=None, help="HF config.json to record (default: config.json beside "
                     "the checkpoint, if any), used by 'hf-zero consolidate'")
    imp.set_defaults(run=_import_deepspeed)
    est = commands.add_parser("estimate", help="per-rank memory for each stage and offload choice")
    est.add_argument("model", help="config.json path/directory, or a model type such as llama")
    est.add_argument("--set", default="", help='config overrides as JSON, e.g. \'{"hidden_size": 4096}\'')
    est.add_argument("--world-size", type=int, default=8, help="ranks per node")
    est.add_argument("--nodes", type=int, default=1)
    est.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    est.add_argument("--micro-batch", type=int, default=1)
    est.add_argument("--seq", type=int, default=2048)
    est.add_argument("--device-memory", default="", help="e.g. 80GB: also print the largest model that fits")
    est.set_defaults(run=_estimate)
    env = commands.add_parser("env", help="versions, backends and usable accelerated paths")
    env.set_defaults(run=_env)
    _add_launch(commands)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
