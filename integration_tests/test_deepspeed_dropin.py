"""Issue 17, DeepSpeed users' command lines and accelerate configs unchanged, through the real
launchers on 2 gloo processes, against the same unmodified scripts under plain torchrun DDP.

- the stock Trainer script with ``--deepspeed ds_config.json`` (and inline JSON), stages 2 and 3;
- an unmodified accelerate loop (no hf_zero line) with the repository's hf_zero yaml and with
  an accelerate DeepSpeed yaml: losses match DDP, and each rank's model-state bytes equal the
  ZeRO stage formula (so ZeRO really ran);
- a loop that never builds a model hf_zero can shard fails on every rank (unless opted out).

Eight launches in all, shared through module fixtures; their wall times are printed at the
end of the module (``pytest -s`` shows them).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "integration_tests" / "scripts"
BIN = Path(sys.executable).parent
LAUNCH_SECONDS: dict[str, float] = {}
TRAINER_ARGS = ["--max_steps", "6", "--logging_steps", "1", "--adam_epsilon", "1e-6", "--weight_decay", "0.01",
                "--report_to", "none", "--seed", "0", "--dataloader_drop_last", "--per_device_eval_batch_size", "2",
                "--disable_tqdm", "true", "--per_device_train_batch_size", "2", "--learning_rate", "1e-3",
                "--save_strategy", "no"]
# transformers' DeepSpeed test configs use "auto" like this (ds_config_zero2.json / _zero3.json)
DS_CONFIG = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
             "train_batch_size": "auto", "gradient_clipping": "auto", "fp16": {"enabled": "auto"},
             "bf16": {"enabled": "auto"}, "zero_optimization": {"stage": 2, "reduce_bucket_size": "auto"}}
# An accelerate DeepSpeed config as `accelerate config` writes it (accelerate's templates).
DS_YAML = """compute_environment: LOCAL_MACHINE
debug: false
deepspeed_config:
  deepspeed_multinode_launcher: standard
  gradient_accumulation_steps: 2
  offload_optimizer_device: none
  offload_param_device: none
  zero3_init_flag: false
  zero3_save_16bit_model: true
  zero_stage: 2
distributed_type: DEEPSPEED
downcast_bf16: 'no'
machine_rank: 0
main_training_function: main
mixed_precision: 'no'
num_machines: 1
num_processes: 2
rdzv_backend: static
same_network: true
use_cpu: false
"""


def launch(name: str, command: list, **env: str) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **env)
    start = time.perf_counter()
    result = subprocess.run([str(c) for c in command], capture_output=True, text=True, timeout=300, env=full_env)
    LAUNCH_SECONDS[name] = round(time.perf_counter() - start, 1)
    return result


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"{result.args}\n{result.stdout[-2000:]}\n{result.stderr[-5000:]}"
    return result


def summaries(result: subprocess.CompletedProcess) -> list[dict]:
    # other ranks' progress bars (carriage returns, no newline) may share a line with a summary
    prefix, decoder = "hf_zero summary: ", json.JSONDecoder()
    return [decoder.raw_decode(line, line.index(prefix) + len(prefix))[0]
            for line in result.stderr.splitlines() if prefix in line]


def formula_bytes(stage: int, psi: int, world: int) -> int:
    """ZeRO's fp32 model-state bytes per rank (PEERS.md)."""
    return {1: 8 * psi + 8 * psi // world, 2: 4 * psi + 12 * psi // world, 3: 16 * psi // world}[stage]


def assert_zero_ran(result: subprocess.CompletedProcess, stage: int) -> None:
    found = summaries(result)
    assert sorted(s["rank"] for s in found) == [0, 1], result.stderr[-3000:]
    for s in found:
        assert s["stage"] == stage and s["world_size"] == 2
        mem = s["memory"]
        model_state = mem["params"] + mem["grads"] + mem["master_params"] + mem["optimizer_states"]
        assert 0.99 <= model_state / formula_bytes(stage, s["numel"], 2) <= 1.05, s


@pytest.fixture(scope="module", autouse=True)
def report_launch_durations():
    yield
    print("\nlaunch wall seconds:", json.dumps(LAUNCH_SECONDS, indent=1))


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("dropin")
    (path / "ds_config.json").write_text(json.dumps(DS_CONFIG))
    (path / "accelerate_ds.yaml").write_text(DS_YAML)
    return path


# ---- item 1: the stock Trainer script with --deepspeed -----------------------------------------
@pytest.fixture(scope="module")
def trainer_runs(work) -> dict:
    script = SCRIPTS / "stock_trainer.py"
    ddp = work / "trainer_ddp"
    # run_and_teardown.py: the unmodified script, then its process group destroyed before exit
    # (plain torchrun runs here sometimes abort at interpreter shutdown otherwise).
    ok(launch("trainer DDP (torchrun)", [BIN / "torchrun", "--standalone", "--nproc_per_node", "2",
                                         SCRIPTS / "run_and_teardown.py", script,
                                         "--output_dir", ddp, "--use_cpu", *TRAINER_ARGS]))
    runs = {"ddp": ddp}
    # stage 2: a config file, the `deepspeed` launcher's --num_gpus; no --use_cpu (hf-zero launch sets it up)
    runs[2] = work / "trainer_z2"
    runs["z2"] = ok(launch("trainer --deepspeed file, stage 2", [
        BIN / "hf-zero", "launch", "--num_gpus", "2", script, "--output_dir", runs[2],
        "--deepspeed", work / "ds_config.json", *TRAINER_ARGS]))
    # stage 3: inline JSON in the --deepspeed=VALUE form
    inline = json.dumps({**DS_CONFIG, "zero_optimization": {"stage": 3, "reduce_bucket_size": "auto",
                                                            "stage3_param_persistence_threshold": "auto"}})
    runs[3] = work / "trainer_z3"
    runs["z3"] = ok(launch("trainer --deepspeed inline JSON, stage 3", [
        BIN / "hf-zero", "launch", "--nproc", "2", script, "--output_dir", runs[3], f"--deepspeed={inline}",
        *TRAINER_ARGS]))
    # stage 3, the model loaded with from_pretrained after the TrainingArguments: built
    # partitioned (meta, each rank reading its slices); the DDP run built the same weights.
    sys.path.insert(0, str(SCRIPTS))
    from stock_trainer import build_model

    build_model(lora=False).save_pretrained(work / "pretrained")
    runs["pretrained"] = work / "trainer_z3_pretrained"
    runs["z3_pretrained"] = ok(launch("trainer --deepspeed stage 3, from_pretrained after the arguments", [
        BIN / "hf-zero", "launch", "--nproc", "2", script, "--output_dir", runs["pretrained"], f"--deepspeed={inline}",
        "--pretrained", work / "pretrained", *TRAINER_ARGS]))
    return runs


def trainer_losses(out: Path) -> dict:
    history = json.loads((out / "results.json").read_text())["log_history"]
    return {h["step"]: h["loss"] for h in history if "loss" in h}


@pytest.mark.parametrize("stage", [2, 3])
def test_stock_trainer_with_deepspeed_flag_matches_ddp(trainer_runs, stage):
    expected, got = trainer_losses(trainer_runs["ddp"]), trainer_losses(trainer_runs[stage])
    assert sorted(got) == list(range(1, 7))
    for step in range(1, 7):
        assert got[step] == pytest.approx(expected[step], rel=1e-5), step
    assert_zero_ran(trainer_runs[f"z{stage}"], stage)


def test_stock_trainer_loading_pretrained_after_its_arguments_builds_partitioned(trainer_runs):
    """Issue 14: DeepSpeed's zero.Init contract under hf_zero (docs/integrations.md,
    partitioned loading): the model never exists whole on a rank, the losses are DDP's."""
    results = json.loads((trainer_runs["pretrained"] / "results.json").read_text())
    assert results["built_on_meta"] and not json.loads((trainer_runs["ddp"] / "results.json").read_text())[
        "built_on_meta"]
    expected, got = trainer_losses(trainer_runs["ddp"]), trainer_losses(trainer_runs["pretrained"])
    assert sorted(got) == list(range(1, 7))
    for step in range(1, 7):
        assert got[step] == pytest.approx(expected[step], rel=1e-5), step
    assert_zero_ran(trainer_runs["z3_pretrained"], 3)


# ---- items 2, 4, 5: an unmodified accelerate loop -----------------------------------------------
@pytest.fixture(scope="module")
def accelerate_runs(work) -> dict:
    script = SCRIPTS / "accelerate_stock_loop.py"
    ddp = work / "acc_ddp"
    ok(launch("accelerate loop DDP (torchrun, two runs)", [
        BIN / "torchrun", "--standalone", "--nproc_per_node", "2", SCRIPTS / "run_and_teardown.py", script,
        "--clip", "1.0,0", "--out", ddp],
        ACCELERATE_USE_CPU="true"))
    runs = {"ddp_clip": ddp / "clip1", "ddp_noclip": ddp / "clip0", "hf_yaml": work / "acc_hf_yaml",
            "ds_yaml": work / "acc_ds_yaml"}
    # The repository's example (no gradient_clipping key) and a loop that never clips: item 5.
    runs["hf_yaml_result"] = ok(launch("accelerate loop, hf_zero yaml, stage 3", [
        BIN / "hf-zero", "launch", "--config", ROOT / "example_configs" / "accelerate_zero3.yaml", script,
        "--clip", "0", "--out", runs["hf_yaml"]]))
    # The DeepSpeed yaml sets accumulation 2 (the script asks for 1: accelerate's env wins, as
    # under DeepSpeed) and no gradient_clipping (accelerate fills 1.0): the script never clips.
    runs["ds_yaml_result"] = ok(launch("accelerate loop, accelerate DeepSpeed yaml, stage 2", [
        BIN / "hf-zero", "launch", "--config", work / "accelerate_ds.yaml", script, "--clip", "0", "--accum", "1",
        "--out", runs["ds_yaml"]]))
    return runs


def loop_results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def assert_loop_losses(got: dict, expected: dict, rel: float) -> None:
    for step in map(str, range(1, 7)):
        assert got["loss"][step] == pytest.approx(expected["loss"][step], rel=rel, abs=0), step


def test_references_differ_with_clipping(accelerate_runs):
    """The clip / no-clip references differ beyond the tolerance used below, so the two
    accelerate tests can tell whether the engine clipped."""
    clipped, unclipped = loop_results(accelerate_runs["ddp_clip"]), loop_results(accelerate_runs["ddp_noclip"])
    assert any(abs(clipped["loss"][s] / unclipped["loss"][s] - 1) > 2e-6 for s in map(str, range(3, 7)))
    assert all(norm > 1.0 for norm in clipped["grad_norm"].values())   # clipping at 1.0 acts at every step


def test_unmodified_accelerate_loop_hf_zero_yaml_absent_clipping_is_auto(accelerate_runs):
    """example_configs/accelerate_zero3.yaml has no gradient_clipping: the engine must not clip
    when the script never calls clip_grad_norm_ (it clipped at 1.0 before; rel drift ~1e-3)."""
    got = loop_results(accelerate_runs["hf_yaml"])
    # DDP's all-reduce and hf_zero's reduce-scatter sum in different orders: 1-2 ulp apart, not bit for bit
    assert_loop_losses(got, loop_results(accelerate_runs["ddp_noclip"]), rel=1e-6)
    assert_zero_ran(accelerate_runs["hf_yaml_result"], 3)


def test_unmodified_accelerate_loop_deepspeed_yaml(accelerate_runs):
    got = loop_results(accelerate_runs["ds_yaml"])
    assert got["accum"] == 2
    assert_loop_losses(got, loop_results(accelerate_runs["ddp_clip"]), rel=1e-6)
    assert_zero_ran(accelerate_runs["ds_yaml_result"], 2)


# ---- item 6: never silently not ZeRO ----------------------------------------------------------
GUARD_CONFIG = json.dumps({"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": 4})


def test_unsharded_script_fails_on_every_rank(work):
    out = work / "unsharded"
    result = launch("plain torch loop under hf-zero launch (guard)", [
        BIN / "hf-zero", "launch", "--config", GUARD_CONFIG, "--nproc", "2", SCRIPTS / "plain_torch_loop.py", out])
    assert result.returncode != 0
    for rank in (0, 1):
        assert f"ERROR hf_zero (rank {rank} of 2): the first optimizer step (SGD) was reached but no model was " \
               f"sharded by hf_zero" in result.stderr
    assert "--allow-unsharded" in result.stderr
    assert not (out / "done").exists()   # stopped before the first step


def test_unsharded_script_runs_when_opted_out(work):
    out = work / "unsharded_allowed"
    result = ok(launch("plain torch loop, --allow-unsharded", [
        BIN / "hf-zero", "launch", "--allow-unsharded", "--config", GUARD_CONFIG, "--nproc", "2",
        SCRIPTS / "plain_torch_loop.py", out]))
    assert (out / "done").exists()
    for rank in (0, 1):
        assert result.stderr.count(f"WARNING hf_zero (rank {rank} of 2)") == 1


