"""Partitioned construction: zero_init and per-rank slice loading, on 2 gloo ranks.

References: the same initialisation materialised whole (stage 0), the saved model itself,
DDP training of the original model, and the fp32 model size for the memory bound.
"""

import pytest
import torch

import zero_init_cases as cases
from hf_zero.testing import run_on_ranks
from parity_cases import tiny_gpt2

_cache: dict = {}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("pretrained")
    tiny_gpt2().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def results(saved):
    if "construction" not in _cache:
        _cache["construction"] = run_on_ranks(cases.construction, 2, str(saved), timeout_s=300)
    return _cache["construction"]


def test_zero_init_builds_on_meta_and_shards(results):
    for r in results:
        assert r["meta_before"] and r["at_rest_empty"]


def test_slice_by_slice_init_equals_whole_init_on_every_rank(results):
    for r in results:
        for name, value in r["whole"].items():
            assert torch.equal(r["sharded"][name], value), name
    assert all(torch.equal(results[0]["sharded"][n], results[1]["sharded"][n]) for n in results[0]["sharded"])


def test_zero_init_follows_the_model_initialisation_scheme(results):
    config, params = tiny_gpt2().config, results[0]["sharded"]
    assert params["transformer.h.0.ln_1.weight"].eq(1).all() and params["transformer.h.0.attn.c_attn.bias"].eq(0).all()
    assert params["transformer.wte.weight"].std().item() == pytest.approx(config.initializer_range, rel=0.1)
    # GPT-2 scales residual projections by 1/sqrt(2 n_layer) (a parent module's re-initialisation)
    scaled = config.initializer_range / (2 * config.n_layer) ** 0.5
    assert params["transformer.h.1.mlp.c_proj.weight"].std().item() == pytest.approx(scaled, rel=0.1)


def test_pretrained_slices_load_exactly_and_lora_starts_at_zero(results):
    reference = dict(tiny_gpt2().named_parameters())
    for r in results:
        for name, value in reference.items():
            assert torch.equal(r["pretrained"][name], value.detach()), name
        lora_b = [v for n, v in r["pretrained"].items() if "lora_B" in n]
        assert lora_b and all(v.eq(0).all() for v in lora_b)


def test_training_from_sliced_weights_matches_ddp(results):
    for rank, r in enumerate(results):
        ref_losses, losses = r["train"]
        assert losses == pytest.approx(ref_losses, rel=1e-5), rank


@pytest.fixture(scope="module")
def saved_100m(tmp_path_factory):
    from transformers import LlamaForCausalLM

    path = tmp_path_factory.mktemp("llama113m")
    torch.manual_seed(0)
    LlamaForCausalLM(cases.llama_config()).save_pretrained(path, max_shard_size="200MB")
    return path


@pytest.mark.parametrize("kind", ("random", "pretrained"))
def test_peak_rss_building_and_loading_100m_model_stays_under_0_6x_fp32(saved_100m, kind):
    # Each rank's fp32 shard alone is 0.5x: what is left for transients is 0.1x.
    for rank, r in enumerate(run_on_ranks(cases.peak_rss, 2, str(saved_100m), kind, timeout_s=400)):
        psi, growth = r["psi"], r["growth"]
        assert psi >= 100e6 and r["finite_logits"]
        print(f"rank {rank} {kind}: peak RSS growth {growth / 2**20:.0f} MiB = {growth / (4 * psi):.3f}x fp32")
        assert 0.5 * 4 * psi <= growth < 0.6 * 4 * psi, f"rank {rank}: {growth / (4 * psi):.3f}x of the fp32 model"
