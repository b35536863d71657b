"""Single-process weights in and out, against peft's and transformers' own savers and loaders:
a LoRA model saved at stages 0-2 writes peft's adapter; peft's modules_to_save copies load
the checkpoint's tensor; stage-3 save_pretrained options hf_zero's writer lacks (variant) are
honoured by transformers, not dropped."""

import pytest
import torch
from safetensors.torch import load_file

import hf_zero
from parity_cases import VOCAB, batch, tiny_gpt2

PROBE = torch.arange(12).reshape(2, 6) % VOCAB


def _config(stage: int) -> dict:
    return {"train_micro_batch_size_per_gpu": 2, "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}},
            "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0}}


def _lora(model, init_lora_weights: bool = False, **extra):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=4, target_modules=["c_attn"], init_lora_weights=init_lora_weights,
                                            **extra))


@pytest.mark.parametrize("stage", (1, 2))
def test_lora_model_saved_at_stages_1_2_writes_peft_adapter(tmp_path, stage):
    torch.manual_seed(1)
    model = _lora(tiny_gpt2())
    engine = hf_zero.initialize(model, _config(stage))
    x = batch(0, 0, 0)
    engine.backward(engine(input_ids=x, labels=x).loss)
    engine.step()
    engine.save_16bit_model(str(tmp_path / "hf_zero"), dtype=torch.float32)
    model.save_pretrained(tmp_path / "peft")   # peft's own writer: the oracle
    got = load_file(str(tmp_path / "hf_zero" / "adapter_model.safetensors"))
    want = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_modules_to_save_copies_load_the_checkpoint_tensor(tmp_path):
    from transformers import AutoModelForCausalLM

    tiny_gpt2().save_pretrained(tmp_path)
    # LoRA's B = 0 (peft's default init): the logits depend on the base and lm_head's copies only
    reference = _lora(AutoModelForCausalLM.from_pretrained(tmp_path), True, modules_to_save=["lm_head"])
    model = _lora(hf_zero.from_pretrained(tmp_path), True, modules_to_save=["lm_head"])
    hf_zero.initialize(model, _config(3))
    for module in (model, reference):
        module.eval()
    with torch.no_grad():   # lm_head is tied to wte in GPT-2: its copy must hold the pretrained values
        assert (model(input_ids=PROBE).logits - reference(input_ids=PROBE).logits).abs().max() <= 1e-6


def test_stage3_save_pretrained_variant_is_written_as_transformers_names_it(tmp_path):
    reference = tiny_gpt2()
    reference.save_pretrained(tmp_path / "want", variant="v1")
    model = tiny_gpt2()
    hf_zero.initialize(model, _config(3))
    model.save_pretrained(tmp_path / "got", variant="v1")
    names = sorted(p.name for p in (tmp_path / "got").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "want").iterdir())
    got = load_file(str(tmp_path / "got" / "model.v1.safetensors"))
    want = load_file(str(tmp_path / "want" / "model.v1.safetensors"))
    assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)
