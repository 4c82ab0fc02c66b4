"""Llama's rotary cos/sin from one custom op (pretrain/rope.py) against transformers' own module."""

from __future__ import annotations

import re

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from pretrain.loss import causal_lm_loss
from pretrain.rope import RotaryTable, compute_rotary_once


def tiny_llama(**overrides) -> LlamaConfig:
    fields = dict(num_hidden_layers=3, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=300, max_position_embeddings=64, **overrides)
    return LlamaConfig(**fields)


@pytest.mark.parametrize("rope", [None, {"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0},
                                  {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                   "original_max_position_embeddings": 16}],
                         ids=["default", "linear", "yarn"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_the_table_is_transformers_own_bit_for_bit(rope, dtype, device):
    config = tiny_llama(**({"rope_parameters": rope} if rope else {}))
    stock = LlamaRotaryEmbedding(config).to(device)
    ours = LlamaRotaryEmbedding(config).to(device)
    assert compute_rotary_once(ours) == 1 and type(ours) is RotaryTable
    x = torch.randn(2, 50, 64, dtype=dtype, device=device)
    for positions in (torch.arange(50)[None], torch.stack([torch.arange(50), torch.arange(7, 57)])):
        positions = positions.to(device)
        for got, expected in zip(ours(x, positions), stock(x, positions), strict=True):
            assert got.dtype == expected.dtype == dtype
            assert torch.equal(got, expected)


def test_sequence_dependent_rope_keeps_the_stock_module():
    config = tiny_llama(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    model = LlamaForCausalLM(config)
    assert compute_rotary_once(model) == 0 and type(model.model.rotary_emb) is LlamaRotaryEmbedding


def test_the_model_is_unchanged_and_saves_as_a_stock_one(tmp_path):
    torch.manual_seed(0)
    stock = LlamaForCausalLM(tiny_llama())
    ours = LlamaForCausalLM(tiny_llama())
    ours.load_state_dict(stock.state_dict())
    compute_rotary_once(ours)
    x = torch.randint(0, 300, (2, 40))
    assert torch.equal(ours(input_ids=x).logits, stock(input_ids=x).logits)
    ours.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(loaded.model.rotary_emb) is LlamaRotaryEmbedding
    assert torch.equal(loaded(input_ids=x).logits, stock(input_ids=x).logits)


def test_compiled_layers_read_the_table_instead_of_computing_sin_and_cos():
    """Inductor's code: the op runs once a forward pass; no generated kernel evaluates sin or cos (stock
    transformers: each layer's query/key kernels do, forward and backward)."""
    from torch._inductor.utils import run_and_get_code

    def compiled_code(model: torch.nn.Module) -> str:
        x = torch.randint(0, 300, (2, 32))

        def step() -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = torch.compile(causal_lm_loss)(model, x, x)
            loss.backward()

        torch._dynamo.reset()
        return "\n".join(run_and_get_code(step)[1])

    trig = re.compile(r"std::(?:cos|sin)\(|\.(?:cos|sin)\(\)")
    stock = LlamaForCausalLM(tiny_llama())
    assert len(trig.findall(compiled_code(stock))) >= 2 * 3  # sanity: the pattern sees the stock layers' sin/cos
    compute_rotary_once(stock)
    code = compiled_code(stock)
    assert not trig.findall(code)
    assert len(re.findall(r"= torch\.ops\.pretrain\.rotary_cos_sin\.default\(", code)) == 1
