"""Checkpoints: exact resume, resharding across world sizes and stages (against DDP),
consolidation to Hugging Face layout, and bad input."""

import pytest
import torch

import checkpoint_cases as cc
import hf_zero
from hf_zero.testing import run_on_ranks

_runs: dict = {}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("ckpt"))


def _once(key, fn, world, *args):
    if key not in _runs:
        _runs[key] = run_on_ranks(fn, world, *args, timeout_s=400)
    return _runs[key]


@pytest.mark.parametrize("stage", (0, 1, 2, 3))
@pytest.mark.parametrize("bf16", (False, True), ids=("fp32", "bf16"))
def test_exact_resume_is_bit_identical(root, stage, bf16):
    for rank, results in enumerate(_once("resume", cc.exact_resume, 2, root)):
        uninterrupted, resumed, client, same_path = results[(stage, bf16)]
        assert resumed == uninterrupted, f"rank {rank}"   # bit-identical, not approximately
        assert client == {"seen": cc.STEPS} and same_path


def _saved(root):
    w2 = _once("save2", cc.reshard_save, 2, root, (0, 1, 2, 3))
    w3 = _once("save3", cc.reshard_save, 3, root, (2,))
    return w2, w3


# (saved world, saved stage, loading stage) per loading world size
LOADS = {1: [(2, 1, 0), (2, 2, 2), (3, 2, 1), (2, 3, 3)],
         2: [(3, 2, 2), (3, 2, 0), (3, 2, 3)],
         3: [(2, 2, 1), (2, 0, 2), (2, 1, 1), (2, 3, 1), (2, 2, 3)]}


@pytest.mark.parametrize("world", (1, 2, 3))
def test_resharded_resume_matches_ddp(root, world):
    w2, w3 = _saved(root)
    for saved_world, saved in ((2, w2), (3, w3)):
        for rank, r in enumerate(saved):
            for stage, result in r.items():
                if stage != "ddp_state":
                    assert result["losses"] == pytest.approx(result["ddp_losses"], rel=1e-5)
    # Continue the DDP reference from its own world-2 state (a full optimizer state moves to
    # any world size) and every hf_zero checkpoint at this world size and stage.
    loads = _once(f"load{world}", cc.reshard_load, world, root, w2[0]["ddp_state"], LOADS[world])
    for saved_world, saved_stage, stage in LOADS[world]:
        saved = (w2 if saved_world == 2 else w3)[0][saved_stage]["params"]
        loaded = loads[0][(saved_world, saved_stage, stage)]["loaded_params"]
        for name in saved:
            assert torch.equal(saved[name], loaded[name]), (saved_world, saved_stage, stage, name)
        if saved_world == 2:   # the reference continues from the world-2 DDP run
            for rank, r in enumerate(loads):
                got = r[(saved_world, saved_stage, stage)]["losses"]
                assert got == pytest.approx(r["ddp_losses"], rel=1e-5), (rank, saved_stage, stage)


def _exports(root):
    return _once("exports", cc.exports, 2, root)[0]


def test_consolidated_gpt2_loads_with_transformers(root, tmp_path):
    from transformers import AutoModelForCausalLM

    trained = _exports(root)["gpt2"]
    out = hf_zero.consolidate(f"{root}/gpt2", tmp_path / "hf", max_shard_size=20_000)
    assert (out / "model.safetensors.index.json").is_file()
    assert len(list(out.glob("model-*-of-*.safetensors"))) >= 4
    model = AutoModelForCausalLM.from_pretrained(out)
    got = dict(model.named_parameters())
    for name, value in trained.items():
        assert torch.equal(got[name], value), name
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()  # still tied

    for online_dir in ("gpt2-online", "gpt2-online-stage3"):   # save_16bit_model from stage 2 and 3
        online = AutoModelForCausalLM.from_pretrained(f"{root}/{online_dir}")
        for name, value in online.named_parameters():
            assert torch.equal(value, trained[name]), (online_dir, name)


def test_consolidated_llama_bf16(root, tmp_path):
    from transformers import AutoModelForCausalLM

    trained = _exports(root)["llama"]
    out = hf_zero.consolidate(f"{root}/llama", tmp_path / "hf", dtype="bf16")
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    for name, value in model.named_parameters():
        assert value.dtype == torch.bfloat16 and torch.equal(value, trained[name].to(torch.bfloat16)), name


def test_adapter_only_consolidation_loads_with_peft(root, tmp_path):
    from peft import PeftModel

    from parity_cases import tiny_gpt2

    trained = _exports(root)["lora"]
    with pytest.raises(ValueError, match="adapter"):
        hf_zero.consolidate(f"{root}/lora", tmp_path / "full")
    out = hf_zero.consolidate(f"{root}/lora", tmp_path / "adapter", adapter_only=True)
    model = PeftModel.from_pretrained(tiny_gpt2(), out)
    got = dict(model.named_parameters())
    assert trained and all(torch.equal(got[n], v) for n, v in trained.items())


def test_cli_consolidate(root, tmp_path):
    from hf_zero.cli import main

    _exports(root)
    assert main(["consolidate", f"{root}/gpt2", str(tmp_path / "o"), "--dtype", "fp16"]) == 0
    assert (tmp_path / "o" / "model.safetensors").is_file()


@pytest.mark.parametrize("middle_world", (3, 1))
def test_bf16_round_trip_through_another_world_size_is_exact(root, middle_world):
    # 2 ranks (stage 2) -> save -> N ranks (stage 1) load+save -> 2 ranks (stage 2) load: the
    # continuation must equal the uninterrupted 2-rank run bit for bit, so nothing (masters,
    # moments, step counts, scheduler, RNG) was lost or altered by resharding.
    uninterrupted = _once("rt-first", cc.roundtrip_first, 2, root)
    run_on_ranks(cc.roundtrip_middle, middle_world, root, timeout_s=300)
    resumed = run_on_ranks(cc.roundtrip_last, 2, root, timeout_s=300)
    assert resumed == uninterrupted
