"""Rank functions for stage-3 specific behaviour."""

from __future__ import annotations

import torch

import hf_zero
from parity_cases import MICRO, batch, tiny_gpt2


def _engine(rank: int):
    model = tiny_gpt2(n_layer=3)
    engine = hf_zero.initialize(model, {"train_micro_batch_size_per_gpu": MICRO,
                                        "optimizer": {"params": {"lr": 1e-3}},
                                        "zero_optimization": {"stage": 3, "reduce_bucket_size": 3000,
                                                              "stage3_param_persistence_threshold": 0}})
    return model, engine


def gathered_and_eval(rank: int, world: int) -> dict:
    reference = tiny_gpt2(n_layer=3)            # same seed: the unsharded initial weights
    model, engine = _engine(rank)
    out = {"at_rest_empty": all(p.numel() == 0 for p in model.parameters()),
           "ds_shape": tuple(model.transformer.wte.weight.ds_shape) == tuple(reference.transformer.wte.weight.shape)}
    with hf_zero.GatheredParameters(list(model.parameters())):
        out["gathered_equal"] = all(torch.equal(p, q) for p, q in zip(model.parameters(), reference.parameters()))
    out["released_after"] = all(p.numel() == 0 for p in model.parameters())

    # Evaluation under no_grad: same logits as the unsharded model, nothing left gathered.
    x = batch(rank, 0, 0)
    model.eval()
    reference.eval()
    with torch.no_grad():
        out["eval_close"] = torch.allclose(model(input_ids=x).logits, reference(input_ids=x).logits, atol=1e-6)
    out["released_after_eval"] = all(p.numel() == 0 for p in model.parameters())

    # modifier_rank: rank 0's in-place edit reaches every rank's shard (and the training step).
    with hf_zero.GatheredParameters(model.transformer.wte.weight, modifier_rank=0):
        if rank == 0:
            with torch.no_grad():
                model.transformer.wte.weight[3].fill_(0.5)
    with hf_zero.GatheredParameters(model.transformer.wte.weight):
        out["edit_everywhere"] = bool((model.transformer.wte.weight[3] == 0.5).all())

    # Different generation lengths per rank finish in lockstep (transformers' synced_gpus).
    prompt = batch(0, 1, 0)[:1, :4]
    with torch.no_grad():
        generated = model.generate(prompt, max_new_tokens=2 + 3 * rank, do_sample=False, synced_gpus=True,
                                   pad_token_id=0)
    out["generated_len"] = generated.shape[1]
    model.train()
    engine.backward(engine(input_ids=x, labels=x).loss)
    engine.step()
    out["train_after"] = all(p.numel() == 0 for p in model.parameters())
    engine.destroy()
    out["destroy_whole"] = all(p.numel() == q.numel() for p, q in zip(model.parameters(), reference.parameters()))
    return out
