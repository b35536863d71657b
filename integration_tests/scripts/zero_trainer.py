"""The stock script with hf_zero's two names: ``ZeroTrainingArguments`` (``--hf_zero CONFIG``) and
``HfZeroTrainer``. ``--stages 0,1,2,3`` trains once per ZeRO stage in one launch (the config's
stage overridden), each into ``<output_dir>/stage<N>``, to share the process start-up."""

import os
import sys
from dataclasses import dataclass

from transformers import HfArgumentParser

from hf_zero import HfZeroTrainer, ZeroTrainingArguments
from hf_zero.config import read_config_dict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from stock_trainer import ScriptArguments, run  # noqa: E402


@dataclass
class SweepArguments:
    stages: str = ""


def main() -> None:
    parser = HfArgumentParser((ScriptArguments, SweepArguments, ZeroTrainingArguments))
    script, sweep, args = parser.parse_args_into_dataclasses()
    if not sweep.stages:
        run(script, args, HfZeroTrainer)
        return
    base_config, _ = read_config_dict(args.hf_zero)
    base_dir = args.output_dir
    for stage in (int(s) for s in sweep.stages.split(",")):
        config = dict(base_config, zero_optimization={**base_config.get("zero_optimization", {}), "stage": stage})
        args.hf_zero, args.output_dir = config, os.path.join(base_dir, f"stage{stage}")
        run(script, args, HfZeroTrainer)


if __name__ == "__main__":
    main()
