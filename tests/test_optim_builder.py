"""build_optimizer puts every tensor of a real transformers model in the right group."""

from __future__ import annotations

import pytest
import torch
from torch.nn.utils import parametrize
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from pretrain.config import OPTIMIZERS, OptimConfig
from pretrain.optim import RotationalOptimizer, build_optimizer
from pretrain.params import LinearGain, classify_parameters


def _llama() -> torch.nn.Module:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32))


def _gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=96, n_embd=64, n_layer=2, n_head=4, n_positions=32))


def _names_by_group(opt: torch.optim.Optimizer) -> list[tuple[dict, set[str]]]:
    return [({k: v for k, v in g.items() if k not in ("params", "param_names")}, set(g["param_names"]))
            for g in opt.param_groups]


@pytest.mark.parametrize("make,axis", [(_llama, 0), (_gpt2, 1)])
def test_rv_groups_follow_the_parameter_table(make, axis: int) -> None:
    model = make()
    table = classify_parameters(model, rotational_embeddings=False)
    opt = build_optimizer(model, table, OptimConfig(name="rv-adamw", weight_decay=0.1))
    assert isinstance(opt, RotationalOptimizer)
    groups = _names_by_group(opt)
    rotational = {s.name for s in table if s.rotational}
    decayed_plain = {s.name for s in table if s.weight_decay and not s.rotational}
    undecayed = {s.name for s in table if not s.weight_decay}
    assert rotational and decayed_plain and undecayed
    by_kind = {(g["rotational"], g["weight_decay"]): names for g, names in groups}
    assert by_kind == {(True, 0.1): rotational, (False, 0.1): decayed_plain, (False, 0.0): undecayed}
    rot_group = next(g for g, _ in groups if g["rotational"])
    assert rot_group["neuron_axis"] == axis  # Linear: [out, in]; GPT-2's Conv1D: [in, out]
    if make is _gpt2:
        assert "transformer.h.0.attn.c_attn.weight" in rotational
        assert "transformer.wte.weight" in decayed_plain  # the tied embedding is not rotational by default
    else:
        assert "lm_head.weight" in rotational and "model.embed_tokens.weight" in decayed_plain
    # Every trainable tensor is in exactly one group.
    assert sorted(n for _, names in groups for n in names) == sorted(n for n, _ in model.named_parameters())


@pytest.mark.parametrize("name", ["adamw-plain", "lion", "sgdm"])
def test_plain_names_never_rotate(name: str) -> None:
    model = _llama()
    table = classify_parameters(model, rotational_embeddings=False)
    opt = build_optimizer(model, table, OptimConfig(name=name, weight_decay=0.1))
    assert isinstance(opt, RotationalOptimizer)
    assert all(g["rotational"] is False for g in opt.param_groups)
    assert {g["rule"] for g in opt.param_groups} == {name.removesuffix("-plain")}
    assert not any("neuron_norm" in s for s in opt.state.values())


def test_adamw_is_torch_adamw_foreach_on_cpu() -> None:
    model = _llama()
    table = classify_parameters(model, rotational_embeddings=False)
    opt = build_optimizer(model, table, OptimConfig(name="adamw", weight_decay=0.1))
    assert type(opt) is torch.optim.AdamW
    assert all(g["foreach"] and not g["fused"] for g in opt.param_groups)
    assert sorted(g["weight_decay"] for g in opt.param_groups) == [0.0, 0.1]


def test_gains_are_undecayed_and_their_weights_rotate() -> None:
    model = _llama()
    linear = model.model.layers[0].mlp.up_proj
    parametrize.register_parametrization(linear, "weight", LinearGain(linear.weight.shape[0], 0))
    table = classify_parameters(model, rotational_embeddings=False)
    opt = build_optimizer(model, table, OptimConfig(name="rv-lion", weight_decay=0.1))
    groups = _names_by_group(opt)
    rotational = next(names for g, names in groups if g["rotational"])
    undecayed = next(names for g, names in groups if g["weight_decay"] == 0.0)
    assert "model.layers.0.mlp.up_proj.parametrizations.weight.original" in rotational
    assert "model.layers.0.mlp.up_proj.parametrizations.weight.0.gain" in undecayed


@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("make", [_llama, _gpt2])
def test_every_optimizer_trains_a_real_model(name: str, make) -> None:
    model = make()
    table = classify_parameters(model, rotational_embeddings=False)
    opt = build_optimizer(model, table, OptimConfig(name=name, lr=1e-3, weight_decay=0.1))
    rotational = [model.get_parameter(s.name) for s in table if s.rotational and name.startswith("rv-")]
    axes = [s.neuron_axis for s in table if s.rotational and name.startswith("rv-")]
    norms = [p.detach().norm(dim=1 - a) for p, a in zip(rotational, axes, strict=True)]
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(3):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for p, a, n in zip(rotational, axes, norms, strict=True):
        torch.testing.assert_close(p.detach().norm(dim=1 - a), n, rtol=1e-5, atol=0.0)
