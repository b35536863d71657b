"""Which modules become stage-3 units (stage3_units.py's [Note: stage-3 units]); no process group."""

import logging

import pytest
from torch import nn

import hf_zero
from hf_zero.stages.stage3_units import _embedding_modules, assign_units, find_unit_modules
from parity_cases import tiny_gpt2, tiny_llama


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)


class _NoSplitModel(nn.Module):   # names no _no_split_modules
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.blocks = nn.ModuleList([_Block(), _Block()])
        self.head = nn.Linear(8, 16)


def test_llama_embeddings_and_head_are_units_of_their_own():
    model = tiny_llama()
    blocks = find_unit_modules(model)
    embedding, head = _embedding_modules(model, blocks)
    assert embedding == [model.model.embed_tokens] and head == [model.lm_head]
    units = embedding + blocks + head
    assignment = assign_units(model, units, persistence_threshold=0)
    assert assignment[id(model.lm_head.weight)] == len(units) - 1
    assert assignment[id(model.model.embed_tokens.weight)] == 0
    assert assignment[id(model.model.norm.weight)] < 0   # the final norm stays in the root


def test_tied_embeddings_stay_in_the_root():
    model = tiny_gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight
    assert _embedding_modules(model, find_unit_modules(model)) == ([], [])


def test_set_z3_leaf_modules_makes_units_and_missing_blocks_warn(caplog):
    model = _NoSplitModel()
    with caplog.at_level(logging.WARNING, logger="hf_zero.stages.stage3_units"):
        assert find_unit_modules(model) == []
    assert "no _no_split_modules" in caplog.text and "set_z3_leaf_modules" in caplog.text
    marked = hf_zero.set_z3_leaf_modules(model, [_Block])
    assert marked == list(model.blocks)
    assert find_unit_modules(model) == list(model.blocks)
    with pytest.raises(ValueError, match="no module of"):
        hf_zero.set_z3_leaf_modules(model, [nn.Conv2d])


def test_a_leaf_inside_a_block_is_gathered_with_the_block():
    model = tiny_llama()
    hf_zero.set_z3_leaf_modules(model, [type(model.model.layers[0].mlp)])
    assert find_unit_modules(model) == list(model.model.layers)
