"""The stock Trainer script (stock_trainer.py) with a fault: with ``--kill_at_step K``, on the
launcher's first attempt (``TORCHELASTIC_RESTART_COUNT`` 0) rank ``--kill_rank`` SIGKILLs
itself right after the step-K checkpoint, once every rank has finished writing it (a
barrier), so the survivors are in their next collective when it dies. Nothing else differs:
the restart resumes through the hf_zero bootstrap (no resume argument given here).
"""

import functools
import os
import signal
from dataclasses import dataclass

import torch.distributed as dist
from stock_trainer import ScriptArguments, run
from transformers import HfArgumentParser, Trainer, TrainerCallback, TrainingArguments


@dataclass
class FaultArguments:
    kill_at_step: int = 0
    kill_rank: int = 1


class KillAfterCheckpoint(TrainerCallback):
    def __init__(self, step: int, rank: int):
        self.step, self.rank = step, rank

    def on_save(self, args, state, control, **kwargs):
        if state.global_step != self.step or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
            return
        dist.barrier()   # every rank's part of checkpoint-K is on disk
        if dist.get_rank() == self.rank:
            os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    script, fault, args = HfArgumentParser((ScriptArguments, FaultArguments,
                                            TrainingArguments)).parse_args_into_dataclasses()
    trainer_cls = Trainer
    if fault.kill_at_step:
        trainer_cls = functools.partial(Trainer, callbacks=[KillAfterCheckpoint(fault.kill_at_step, fault.kill_rank)])
    run(script, args, trainer_cls)


if __name__ == "__main__":
    main()
