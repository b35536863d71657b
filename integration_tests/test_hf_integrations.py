"""The Hugging Face integrations through the real launchers, on 2 gloo processes.

Every hf_zero run is compared, per logged step (fp32, rtol 1e-5), with a plain single-process
run of the same script seeing the same global batches: world 2 x micro-batch 2 feeds each
optimizer step the same 4 fixed-length samples as 1 x 4 (accelerate shards batches
round-robin, the Trainer averages the ranks' mean losses, and every sample has the same
number of label tokens, so the mean over 4 equals the mean of the two means). The saved
files are loaded back with transformers / peft. Launches are shared through module fixtures
(process start-up dominates: about 10 s per launch here).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPTS = Path(__file__).resolve().parent / "scripts"
BIN = Path(sys.executable).parent
RTOL = 1e-5
COMMON = ["--max_steps", "6", "--logging_steps", "1", "--adam_epsilon", "1e-6", "--weight_decay", "0.01",
          "--use_cpu", "--report_to", "none", "--seed", "0", "--dataloader_drop_last",
          "--per_device_eval_batch_size", "2", "--disable_tqdm", "true"]
# Checkpoint and evaluate every 2 steps and reload the best checkpoint at the end; "best" is
# the *highest* eval loss so that it is not simply the last one. Training losses are unaffected.
LOAD_BEST = ["--save_strategy", "steps", "--save_steps", "2", "--eval_strategy", "steps", "--eval_steps", "2",
             "--load_best_model_at_end", "true", "--metric_for_best_model", "loss", "--greater_is_better", "true"]
LORA = ["--lora", "--learning_rate", "1e-2", "--activation_checkpointing", "true"]
# "auto" everywhere transformers fills it for DeepSpeed; the per-step report on at every step
AUTO_CONFIG = {"zero_optimization": {"stage": 3, "reduce_bucket_size": "auto",
                                     "stage3_prefetch_bucket_size": "auto",
                                     "stage3_param_persistence_threshold": "auto"},
               "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
               "train_batch_size": "auto", "gradient_clipping": "auto",
               "fp16": {"enabled": "auto"}, "bf16": {"enabled": "auto"},
               "wall_clock_breakdown": True, "memory_breakdown": True, "steps_per_print": 1}


def run(command: list, timeout: int = 240, **env: str) -> None:
    full_env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **env)
    result = subprocess.run([str(c) for c in command], capture_output=True, text=True, timeout=timeout, env=full_env)
    assert result.returncode == 0, f"{' '.join(map(str, command))}\n{result.stdout[-2000:]}\n{result.stderr[-5000:]}"


def results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def step_losses(out: Path) -> dict[int, float]:
    return {h["step"]: h["loss"] for h in results(out)["log_history"] if "loss" in h}


def assert_losses_match(got: dict, reference: dict, steps=range(1, 7)) -> None:
    for step in steps:
        assert step in got, f"step {step} not logged"
        assert got[step] == pytest.approx(reference[step], rel=RTOL), f"step {step}: {got[step]} vs {reference[step]}"


def torchrun(script, *args) -> list:
    # run_and_teardown.py destroys the script's process group before exit: plain torchrun runs
    # here sometimes abort at interpreter shutdown otherwise (see its docstring).
    return [BIN / "torchrun", "--standalone", "--nproc_per_node", "2", SCRIPTS / "run_and_teardown.py", script, *args]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("hf_integrations")
    (path / "auto.json").write_text(json.dumps(AUTO_CONFIG))
    return path


@pytest.fixture(scope="module")
def reference(work) -> Path:
    out = work / "reference"
    run([sys.executable, SCRIPTS / "stock_trainer.py", "--output_dir", out, "--per_device_train_batch_size", "4",
         "--learning_rate", "1e-3", "--generate", *LOAD_BEST, *COMMON])
    return out


@pytest.fixture(scope="module")
def sweep(work) -> Path:
    """--hf_zero, stages 0-3 in one launch, checkpoints every 2 steps, best one reloaded at the end."""
    out = work / "sweep"
    run(torchrun(SCRIPTS / "zero_trainer.py", "--output_dir", out, "--per_device_train_batch_size", "2",
                 "--learning_rate", "1e-3", "--hf_zero", work / "auto.json", "--stages", "0,1,2,3",
                 "--generate", *LOAD_BEST, *COMMON))
    return out


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_trainer_flag_matches_single_process(sweep, reference, stage):
    from transformers import AutoModelForCausalLM

    out, ref = sweep / f"stage{stage}", results(reference)
    assert_losses_match(step_losses(out), step_losses(reference))
    got = results(out)
    assert got["eval"]["eval_loss"] == pytest.approx(ref["eval"]["eval_loss"], rel=RTOL)
    evals = [h["eval_loss"] for h in got["log_history"] if "eval_loss" in h][:-1]   # at steps 2, 4, 6
    assert len(evals) == 3
    assert got["eval"]["eval_loss"] == pytest.approx(max(evals), rel=RTOL)   # the best was reloaded
    assert got["eval"]["eval_loss"] != pytest.approx(evals[-1], rel=RTOL)    # ... and it is not the last
    assert got["predict"]["test_loss"] == pytest.approx(ref["predict"]["test_loss"], rel=RTOL)
    assert got["generated"] == ref["generated"]          # generate(synced_gpus=True) on every rank
    saved = AutoModelForCausalLM.from_pretrained(out).state_dict()
    expected = AutoModelForCausalLM.from_pretrained(reference).state_dict()
    for name, tensor in expected.items():
        torch.testing.assert_close(saved[name], tensor, rtol=1e-4, atol=1e-5, msg=name)
    assert (out / "checkpoint-4" / "hf_zero" / "latest").is_file()
    assert (out / "generation_config.json").is_file()


def test_trainer_logs_carry_the_engine_report(sweep):
    """Issue 7: with wall_clock_breakdown / memory_breakdown, every logged step has the report."""
    for stage in range(4):
        logs = [h for h in results(sweep / f"stage{stage}")["log_history"] if "loss" in h]
        assert len(logs) == 6
        for entry in logs:
            assert entry["hf_zero/comm_bytes"] > 0
            assert entry["hf_zero/time/step_s"] > 0
            assert entry["hf_zero/time/forward_s"] > 0 and entry["hf_zero/time/backward_s"] > 0
            assert entry["hf_zero/tokens_per_sec"] > 0
            assert entry["hf_zero/memory/total_bytes"] > 0
            assert entry["hf_zero/grad_norm"] == pytest.approx(entry["grad_norm"], rel=1e-4)


@pytest.mark.parametrize("nproc", [1, 2], ids=["world1", "world2"])
def test_trainer_resume(sweep, reference, work, nproc):
    """Resume the 2-rank stage-3 run from checkpoint-4 on 1 process (micro-batch 4, same global
    batch) and on 2, under stage 2: steps 5-6 match the uninterrupted reference."""
    out = work / f"resumed{nproc}"
    command = [SCRIPTS / "zero_trainer.py", "--output_dir", out, "--learning_rate", "1e-3",
               "--hf_zero", json.dumps({**AUTO_CONFIG, "zero_optimization": {"stage": 2}}),
               "--resume_from_checkpoint", sweep / "stage3" / "checkpoint-4", "--save_strategy", "no", *COMMON]
    if nproc == 1:
        run([sys.executable, *command, "--per_device_train_batch_size", "4"])
    else:
        run(torchrun(*command, "--per_device_train_batch_size", "2"))
    assert_losses_match(step_losses(out), step_losses(reference), steps=range(5, 7))


@pytest.fixture(scope="module")
def lora_reference(work) -> Path:
    out = work / "lora_reference"
    run([sys.executable, SCRIPTS / "stock_trainer.py", "--output_dir", out, "--per_device_train_batch_size", "4",
         "--save_strategy", "no", *LORA, *COMMON])
    return out


@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_unmodified_script_lora_stage3_checkpointing(work, lora_reference, reentrant):
    """`hf-zero launch` runs the stock Trainer script (LoRA, activation checkpointing) under
    stage 3; the adapter it saves loads with peft and merges."""
    from peft import PeftModel

    sys.path.insert(0, str(SCRIPTS))
    from stock_trainer import build_model

    out = work / f"lora_{reentrant}"
    run([BIN / "hf-zero", "launch", "--config", work / "auto.json", "--nproc", "2", SCRIPTS / "stock_trainer.py",
         "--output_dir", out, "--per_device_train_batch_size", "2", "--save_strategy", "no",
         "--activation_checkpointing_kwargs", json.dumps({"use_reentrant": reentrant}), *LORA, *COMMON])
    assert results(out)["activation_checkpointing"]
    assert_losses_match(step_losses(out), step_losses(lora_reference))
    assert (out / "adapter_model.safetensors").is_file() and not (out / "model.safetensors").exists()
    x = torch.arange(16)[None] % 256
    logits = {}
    for name, path in (("hf_zero", out), ("reference", lora_reference)):
        base = build_model(lora=False)   # same seed: the frozen base both runs started from
        model = PeftModel.from_pretrained(base, path)
        adapter = {n: p for n, p in model.named_parameters() if "lora_" in n}
        assert adapter and all(p.numel() > 0 for p in adapter.values())   # full shapes, not empty shards
        logits[name] = model.merge_and_unload()(input_ids=x).logits
    torch.testing.assert_close(logits["hf_zero"], logits["reference"], rtol=1e-4, atol=1e-4)


def test_accelerate_loop_and_state_resume(work):
    """An accelerate loop (2 changed lines) launched by `hf-zero launch` from an accelerate
    config with an `hf-zero:` section, stage 3: per-step loss and clipped gradient norm match
    a single-process plain run; `save_state` at step 3 resumes on 1 process under stage 2
    (`accelerate launch` with HF_ZERO_CONFIG); `get_state_dict` gives a loadable model."""
    from transformers import AutoModelForCausalLM

    script = SCRIPTS / "accelerate_loop.py"
    ref, out, resumed = work / "acc_reference", work / "acc_zero3", work / "acc_resumed"
    (work / "accelerate.yaml").write_text(
        "compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_CPU\nnum_machines: 1\nnum_processes: 2\n"
        "machine_rank: 0\nmixed_precision: 'no'\nuse_cpu: true\n"
        "hf-zero:\n  zero_optimization: {stage: 3, reduce_bucket_size: auto}\n  gradient_accumulation_steps: auto\n")
    run([sys.executable, script, "--plain", "--micro", "4", "--out", ref])
    run([BIN / "hf-zero", "launch", "--config", work / "accelerate.yaml", script, "--out", out, "--save_at", "3"])
    (work / "accelerate_single.yaml").write_text(
        "compute_environment: LOCAL_MACHINE\ndistributed_type: 'NO'\nnum_machines: 1\nnum_processes: 1\n"
        "machine_rank: 0\nmixed_precision: 'no'\nuse_cpu: true\n")
    run([BIN / "accelerate", "launch", "--config_file", work / "accelerate_single.yaml", script, "--micro", "4",
         "--out", resumed, "--resume", out / "state"], HF_ZERO_CONFIG=json.dumps({"zero_optimization": {"stage": 2}}))
    expected, got, again = results(ref), results(out), results(resumed)
    for step in map(str, range(1, 7)):
        assert got["loss"][step] == pytest.approx(expected["loss"][step], rel=RTOL)
        assert got["grad_norm"][step] == pytest.approx(expected["grad_norm"][step], rel=1e-4)
    for step in map(str, range(4, 7)):
        assert again["loss"][step] == pytest.approx(expected["loss"][step], rel=RTOL)
    saved = AutoModelForCausalLM.from_pretrained(out / "model").state_dict()
    unwrapped = AutoModelForCausalLM.from_pretrained(out / "model_unwrapped").state_dict()
    for name, tensor in AutoModelForCausalLM.from_pretrained(ref / "model").state_dict().items():
        torch.testing.assert_close(saved[name], tensor, rtol=1e-4, atol=1e-5, msg=name)
        torch.testing.assert_close(unwrapped[name], saved[name], rtol=0, atol=0, msg=name)
