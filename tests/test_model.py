"""Models from transformers classes: presets, the parameter table, gain folding on export."""

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

from pretrain.config import ModelConfig
from pretrain.errors import UserError
from pretrain.model import PRESETS, build_model, padded_vocab_size, resolve_size, save_hf_model
from pretrain.params import ParameterLookup, classify_parameters, summarize_table

VOCAB, SEQ, EOS = 300, 32, 299


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_parameter_table_axes_follow_module_types(arch):
    model = build_model(ModelConfig(arch=arch, preset="tiny"), VOCAB, SEQ, EOS)
    table = {spec.name: spec for spec in classify_parameters(model, rotational_embeddings=False)}
    assert len(table) == len(list(model.parameters()))
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module is not model.get_output_embeddings():
            spec = table[f"{name}.weight"]
            assert (spec.kind, spec.neuron_axis, spec.rotational) == ("linear", 0, True)
            assert spec.num_neurons == module.out_features
        elif isinstance(module, Conv1D):
            spec = table[f"{name}.weight"]
            assert (spec.kind, spec.neuron_axis, spec.rotational) == ("conv1d", 1, True)
            assert spec.num_neurons == module.nf  # output features are the columns of [in, out]
            assert table[f"{name}.bias"].weight_decay is False
        elif isinstance(module, nn.Embedding):
            spec = table[f"{name}.weight"]
            assert (spec.kind, spec.neuron_axis, spec.rotational) == ("embedding", 0, False)
    norms = [s for s in table.values() if s.kind == "norm"]
    assert norms and all(not s.weight_decay and not s.rotational and not s.tracked for s in norms)
    assert "total" in summarize_table(list(table.values()))


def test_rotational_embeddings_option():
    model = build_model(ModelConfig(preset="tiny"), VOCAB, SEQ, EOS)
    table = classify_parameters(model, rotational_embeddings=True)
    assert [s.rotational for s in table if s.kind == "embedding"] == [True]


def test_presets_and_overrides():
    size = resolve_size(ModelConfig(preset="llama-125m", num_layers=2), seq_len=4096)
    assert size["hidden_size"] == 768 and size["num_layers"] == 2 and size["max_position_embeddings"] == 4096
    assert set(PRESETS) >= {"tiny", "gpt2-124m", "llama-125m", "llama-350m", "llama-1b"}
    assert padded_vocab_size(8193) == 8256
    with pytest.raises(UserError, match="divisible"):
        resolve_size(ModelConfig(hidden_size=130), seq_len=16)
    with pytest.raises(UserError, match="model.preset must be one of"):
        resolve_size(ModelConfig(preset="huge"), seq_len=16)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_causal_sdpa_passes_no_mask_even_when_compiled_and_saves_as_plain_sdpa(arch, tmp_path, monkeypatch):
    """Training attention is SDPA's causal kernel (no mask tensor), also under torch.compile, with the
    stock SDPA logits; the saved checkpoint names no custom attention and loads as SDPA."""
    import transformers.integrations.sdpa_attention as sdpa_module

    from pretrain.model import CAUSAL_SDPA

    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append((kwargs.get("attn_mask") is None, kwargs.get("is_causal")))
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(sdpa_module.torch.nn.functional, "scaled_dot_product_attention", spy)
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch=arch, preset="tiny"), VOCAB, SEQ, EOS).eval()
    assert model.config._attn_implementation == CAUSAL_SDPA
    x = torch.randint(0, VOCAB, (2, SEQ))
    with torch.no_grad():
        compiled = torch.compile(lambda ids: model(input_ids=ids).logits)(x)
        assert set(calls) == {(True, True)}
        model.config._attn_implementation = "sdpa"
        stock = model(input_ids=x).logits
        model.config._attn_implementation = CAUSAL_SDPA
    torch.testing.assert_close(compiled, stock, rtol=1e-4, atol=1e-5)
    model.save_pretrained(tmp_path)
    assert CAUSAL_SDPA not in (tmp_path / "config.json").read_text()
    assert AutoModelForCausalLM.from_pretrained(tmp_path).config._attn_implementation == "sdpa"


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_gains_fold_into_a_plain_transformers_checkpoint(arch, tmp_path):
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch=arch, preset="tiny", linear_gains=True), VOCAB, SEQ, EOS).eval()
    table = classify_parameters(model, rotational_embeddings=False)
    gains = [s for s in table if s.kind == "gain"]
    assert gains and all(not s.weight_decay and not s.rotational for s in gains)
    with torch.no_grad():  # non-trivial gains, so folding is really exercised
        for spec in gains:
            model.get_parameter(spec.name).uniform_(0.5, 1.5)
    save_hf_model(model, tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert not any("gain" in n or "parametrizations" in n for n, _ in loaded.named_parameters())
    x = torch.randint(0, VOCAB, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=1e-5, atol=1e-5)


def test_fp32_weights_of_a_bf16_model_load_as_fp32(tmp_path):
    """DeepSpeed's bf16 mode casts the model; its export hands save_hf_model the fp32 masters. The config must
    name their dtype: from_pretrained's default (dtype="auto") follows it, and would round them to bf16."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="llama", preset="tiny"), VOCAB, SEQ, EOS)
    masters = {k: v.clone() for k, v in model.state_dict().items()}
    model.to(torch.bfloat16)
    training_dtype = model.config.dtype
    save_hf_model(model, tmp_path, dict(masters))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.dtype == torch.float32
    state = loaded.state_dict()
    assert state.keys() == masters.keys() and all(torch.equal(state[k], w) for k, w in masters.items())
    assert model.config.dtype == training_dtype  # the training model's config is left as it was


def test_parameter_lookup_reads_the_current_tensors():
    """The rotation sources' name lookup: the tensors `get_parameter` gives, parametrized ones too, and a
    parameter replaced after the lookup was built (load_state_dict(assign=True)) is the one returned."""
    model = build_model(ModelConfig(arch="gpt2", preset="tiny", linear_gains=True), 256, 32, eos_id=0)
    names = [name for name, _ in model.named_parameters()]
    lookup = ParameterLookup(model, names)
    assert all(a is model.get_parameter(n) for a, n in zip(lookup(), names, strict=True))
    assert any(name.endswith(".parametrizations.weight.original") for name in names)
    state = {k: v.clone() + 1 for k, v in model.state_dict().items()}
    model.load_state_dict(state, assign=True)
    fresh = lookup()
    assert all(a is model.get_parameter(n) for a, n in zip(fresh, names, strict=True))
    torch.testing.assert_close(fresh[0], state[names[0]])
    with pytest.raises(AttributeError, match="no parameter 'transformer.h.0.nope'"):
        ParameterLookup(model, ["transformer.h.0.nope"])
