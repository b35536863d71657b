"""Optimizers beyond Adam/AdamW from the config's optimizer block (DeepSpeed's names) and a
user-passed torch optimizer, against DDP + a per-tensor reference (optimizer_cases.py), at
stages 0-3 on 2 ranks with parameters straddling the rank chunks; the refusals; and three
configs of the DeepSpeed corpus through the HF Trainer at world 2 against the stock Trainer
under DDP (ds_corpus_cases.py; same spawn)."""

import pytest
import torch

import hf_zero
import optimizer_cases
from hf_zero.testing import run_on_ranks

_cache: dict = {}


def grid() -> list:
    if not _cache:
        _cache["results"] = run_on_ranks(optimizer_cases.all_cases, 2, timeout_s=500)
    return _cache["results"]


CASES = [(kind, stage) for kind in ("Lion", "Adagrad", "Lamb", "Muon", "SGD") for stage in (0, 1, 2, 3)]
CASES += [("AdamW-size0", stage) for stage in (1, 2, 3)]


@pytest.mark.parametrize("kind, stage", CASES)
def test_matches_ddp_with_the_same_optimizer(kind, stage):
    for rank, results in enumerate(grid()):
        ref_losses, losses, (max_diff, worst), moved = results[(kind, stage)]
        assert losses == pytest.approx(ref_losses, rel=1e-5), f"rank {rank}"
        # Lamb's norms and Muon's Newton-Schulz sum in another order than the whole-tensor
        # reference: a few float32 ulps of the weights (about 0.02-0.5 in magnitude).
        assert max_diff <= 2e-6, f"rank {rank}: '{worst}' differs by {max_diff:.3g}"
        assert moved > 1e-3, "the optimizer did not move the weights: the comparison would be vacuous"


@pytest.mark.parametrize("kind", ("Lamb", "Muon"))
def test_checkpoint_resumes_at_another_stage_and_layout(kind):
    # Their states are elementwise per master chunk (the whole-tensor parts are recomputed each
    # step), so the usual resharding applies: stage 1 -> stage 3 with other bucket boundaries.
    for rank, results in enumerate(grid()):
        continued, resumed = results[("resume", kind)]
        assert resumed == pytest.approx(continued, rel=1e-6), f"rank {rank}"


@pytest.mark.parametrize("cls", ("Adafactor", "Muon", "LBFGS"))
def test_whole_tensor_torch_optimizers_are_refused_by_name(cls):
    model = torch.nn.Linear(4, 4, bias=False)   # torch's Muon takes matrices only
    optimizer = getattr(torch.optim, cls)(model.parameters())
    with pytest.raises(ValueError, match=f"cannot step {cls} over sharded parameters"):
        hf_zero.initialize(model, {"train_micro_batch_size_per_gpu": 1}, optimizer=optimizer)


def test_offload_refuses_non_adam_by_key():
    model = torch.nn.Linear(4, 4)
    config = {"train_micro_batch_size_per_gpu": 1, "optimizer": {"type": "Lion"},
              "zero_optimization": {"stage": 1, "offload_optimizer": {"device": "cpu"}}}
    with pytest.raises(hf_zero.ConfigError, match="offload_optimizer.device"):
        hf_zero.initialize(model, config)


def test_one_bit_optimizer_needs_the_opt_in_then_runs_uncompressed():
    config = {"train_micro_batch_size_per_gpu": 1, "optimizer": {"type": "OneBitAdam", "params": {"lr": 1e-3,
                                                                                               "freeze_step": 10}}}
    with pytest.raises(hf_zero.ConfigError, match="allow_unhonoured_keys"):
        hf_zero.initialize(torch.nn.Linear(4, 4), config)
    with pytest.warns(UserWarning, match="'optimizer.type': runs as Adam .* without 1-bit compression"):
        engine = hf_zero.initialize(torch.nn.Linear(4, 4), {**config, "allow_unhonoured_keys": True})
    assert type(engine.optimizer.inner) is torch.optim.AdamW


@pytest.mark.parametrize("name", __import__("ds_corpus_cases").TRAINER_CONFIGS)
def test_corpus_configs_train_through_the_trainer_like_ddp(name):
    from test_ds_config_corpus import EXPECTED

    for rank, results in enumerate(grid()):
        ref_losses, losses, (max_diff, worst), warned, stage = results[("trainer", name)]
        assert stage == __import__("json").loads((optimizer_cases.CORPUS / name).read_text())[
            "zero_optimization"]["stage"], "the Trainer did not run hf_zero with the config's stage"
        assert len(losses) == 3 and losses == pytest.approx(ref_losses, rel=1e-5), f"rank {rank}"
        assert max_diff <= 1e-6, f"rank {rank}: '{worst}' differs by {max_diff:.3g}"
        assert set(warned) == EXPECTED[name][0], "each unhonoured key warned once, by name, in the run too"


def test_user_adagrad_with_its_eager_state_is_rebound():
    # torch's Adagrad creates its state in __init__ (step 0); it is still "fresh" and must be
    # re-created for the master chunks. One process: hf_zero at stage 2 vs torch on a copy.
    import copy

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    reference = copy.deepcopy(model)
    initial = copy.deepcopy(model)
    ref_opt = torch.optim.Adagrad(reference.parameters(), lr=0.1, initial_accumulator_value=0.5)
    engine = hf_zero.initialize(model, {"train_micro_batch_size_per_gpu": 4, "gradient_clipping": 0.0,
                                        "zero_optimization": {"stage": 2, "reduce_bucket_size": 7}},
                                optimizer=torch.optim.Adagrad(model.parameters(), lr=0.1,
                                                              initial_accumulator_value=0.5))
    for step in range(3):
        x = torch.randn(4, 6, generator=torch.Generator().manual_seed(step))
        engine.backward(model(x).square().mean())
        engine.step()
        reference(x).square().mean().backward()
        ref_opt.step()
        ref_opt.zero_grad()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)
    assert (reference[0].weight - initial[0].weight).abs().max() > 1e-2, "the comparison would be vacuous"


def test_other_libraries_whole_tensor_optimizers_are_refused_but_hf_zeros_own_run():
    from hf_zero.optim.lamb import Lamb

    class FusedLAMB(torch.optim.SGD):   # stands in for apex's class: only the name is looked at
        pass

    model = torch.nn.Linear(4, 4)
    with pytest.raises(ValueError, match="cannot step FusedLAMB.*trust ratio"):
        hf_zero.initialize(model, {"train_micro_batch_size_per_gpu": 1},
                           optimizer=FusedLAMB(model.parameters(), lr=0.1))
    engine = hf_zero.initialize(model, {"train_micro_batch_size_per_gpu": 1}, optimizer=Lamb(model.parameters()))
    engine.backward(model(torch.ones(1, 4)).sum())
    engine.step()
    assert engine.optimizer.inner.layout is not None and engine.optimizer.inner.state


def test_muon_orthogonalises_batches_and_convolutions_as_deepspeed():
    from hf_zero.optim.muon import orthogonalise
    from optimizer_cases import ref_newton_schulz

    g = torch.randn(3, 6, 4, generator=torch.Generator().manual_seed(0))
    batched = orthogonalise(g)            # a fused expert stack: each matrix on its own
    for i in range(3):
        torch.testing.assert_close(batched[i], ref_newton_schulz(g[i]), rtol=1e-5, atol=1e-6)
    conv = torch.randn(5, 2, 3, 3, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(orthogonalise(conv), ref_newton_schulz(conv.reshape(5, -1)), rtol=1e-5, atol=1e-6)
    singular = ref_newton_schulz(g[0]).T @ ref_newton_schulz(g[0])   # ~orthogonal: the iteration did work
    assert (torch.linalg.eigvalsh(singular) > 0.3).all()
