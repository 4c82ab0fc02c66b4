"""Build decoder-only models from `transformers` classes; add and fold learnable gains.

Models are `LlamaForCausalLM` (default: RMSNorm, RoPE, SwiGLU) or `GPT2LMHeadModel`, built
from a named size preset plus free overrides, always with SDPA attention. No hand-written
transformer: a checkpoint's `model/` folder is a plain `transformers` checkpoint.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import parametrize
from transformers import (
    AttentionInterface,
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from pretrain.config import ModelConfig
from pretrain.errors import UserError
from pretrain.params import LinearGain, neuron_axis_of
from pretrain.rope import compute_rotary_once

# Sizes: hidden, layers, heads, kv heads, MLP width, context. MLP widths of the llama presets
# follow the SwiGLU rule (~8/3 hidden, rounded to 256); gpt2 uses 4x hidden.
PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=4, intermediate_size=384,
                 max_position_embeddings=512),
    "small": dict(hidden_size=256, num_layers=6, num_heads=8, num_kv_heads=8, intermediate_size=768,
                  max_position_embeddings=1024),
    "gpt2-124m": dict(hidden_size=768, num_layers=12, num_heads=12, num_kv_heads=12, intermediate_size=3072,
                      max_position_embeddings=1024),
    "llama-125m": dict(hidden_size=768, num_layers=12, num_heads=12, num_kv_heads=12, intermediate_size=2048,
                       max_position_embeddings=2048),
    "llama-350m": dict(hidden_size=1024, num_layers=24, num_heads=16, num_kv_heads=16, intermediate_size=2816,
                       max_position_embeddings=2048),
    "llama-1b": dict(hidden_size=2048, num_layers=16, num_heads=32, num_kv_heads=8, intermediate_size=8192,
                     max_position_embeddings=2048),
}

# The attention implementation models train with: transformers' SDPA attention, except that a
# plain causal self-attention (no padding mask, as many queries as keys, no cache offset) gets no
# mask tensor, so SDPA runs its causal flash/cuDNN kernel. transformers itself skips that mask only
# outside torch.compile (on torch < 2.14 it cannot tell compiling from exporting), and with the
# mask SDPA takes its masked kernel: 3.5x slower attention, 22% of a GPT-2 step on an H200
# (benchmarks/RESULTS.md). The name is runtime-only: `save_pretrained` does not write it, so
# checkpoints load as ordinary SDPA models.
CAUSAL_SDPA = "causal_sdpa"


def _causal_sdpa_mask(*args, **kwargs) -> torch.Tensor | None:
    q_length, q_offset = kwargs.get("q_length"), kwargs.get("q_offset", 0)
    if q_length is None and kwargs.get("cache_position") is not None:  # transformers releases before q_length
        q_length = kwargs["cache_position"].shape[0]
    plain_causal = (kwargs.get("allow_is_causal_skip", False) and kwargs.get("attention_mask") is None
                    and kwargs.get("local_size") is None and isinstance(q_offset, int) and q_offset == 0
                    and q_length is not None and q_length == kwargs.get("kv_length"))
    return None if plain_causal else sdpa_mask(*args, **kwargs)


AttentionInterface.register(CAUSAL_SDPA, sdpa_attention_forward)
AttentionMaskInterface.register(CAUSAL_SDPA, _causal_sdpa_mask)

# Embedding rows are padded to a multiple of this for fast matmuls; extra rows are never targets.
VOCAB_MULTIPLE = 64


def padded_vocab_size(vocab_size: int) -> int:
    return int(math.ceil(vocab_size / VOCAB_MULTIPLE) * VOCAB_MULTIPLE)


def resolve_size(cfg: ModelConfig, seq_len: int) -> dict[str, int | bool]:
    """The preset's sizes with the config's overrides applied, checked for consistency."""
    if cfg.preset not in PRESETS:
        raise UserError(f"model.preset must be one of {', '.join(PRESETS)}, got {cfg.preset!r}")
    size: dict[str, int | bool] = dict(PRESETS[cfg.preset])
    for key in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size",
                "max_position_embeddings"):
        value = getattr(cfg, key)
        if value is not None:
            size[key] = value
    if cfg.num_heads is not None and cfg.num_kv_heads is None:
        size["num_kv_heads"] = cfg.num_heads
    size["tie_embeddings"] = cfg.tie_embeddings if cfg.tie_embeddings is not None else True
    size["max_position_embeddings"] = max(int(size["max_position_embeddings"]), seq_len)
    if size["hidden_size"] % size["num_heads"]:
        raise UserError(f"model.hidden_size={size['hidden_size']} must be divisible by "
                        f"model.num_heads={size['num_heads']}")
    if size["num_heads"] % size["num_kv_heads"]:
        raise UserError(f"model.num_heads={size['num_heads']} must be divisible by "
                        f"model.num_kv_heads={size['num_kv_heads']}")
    return size


def _hf_config(cfg: ModelConfig, vocab_size: int, seq_len: int, eos_id: int) -> LlamaConfig | GPT2Config:
    size = resolve_size(cfg, seq_len)
    vocab = padded_vocab_size(vocab_size)
    if cfg.arch == "llama":
        return LlamaConfig(
            vocab_size=vocab, hidden_size=size["hidden_size"], intermediate_size=size["intermediate_size"],
            num_hidden_layers=size["num_layers"], num_attention_heads=size["num_heads"],
            num_key_value_heads=size["num_kv_heads"], max_position_embeddings=size["max_position_embeddings"],
            initializer_range=cfg.init_std, tie_word_embeddings=size["tie_embeddings"],
            attention_dropout=cfg.dropout, bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id,
        )
    if not size["tie_embeddings"]:
        raise UserError("model.tie_embeddings=false is not supported for gpt2, whose head is always tied")
    return GPT2Config(
        vocab_size=vocab, n_embd=size["hidden_size"], n_layer=size["num_layers"], n_head=size["num_heads"],
        n_inner=size["intermediate_size"], n_positions=size["max_position_embeddings"],
        initializer_range=cfg.init_std, resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout,
        bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id,
    )


def build_model(cfg: ModelConfig, vocab_size: int, seq_len: int, eos_id: int) -> nn.Module:
    """A freshly initialised (or `init_from`-loaded) causal LM, fp32, on the CPU."""
    if cfg.init_from:
        model = _load_pretrained(cfg.init_from, vocab_size, seq_len)
    else:
        hf_config = _hf_config(cfg, vocab_size, seq_len, eos_id)
        model_cls = LlamaForCausalLM if cfg.arch == "llama" else GPT2LMHeadModel
        model = model_cls(hf_config)
    model.config._attn_implementation = CAUSAL_SDPA
    compute_rotary_once(model)
    if cfg.linear_gains:
        add_linear_gains(model)
    return model


def _load_pretrained(source: str, vocab_size: int, seq_len: int) -> nn.Module:
    try:
        model = AutoModelForCausalLM.from_pretrained(source, attn_implementation="sdpa", dtype=torch.float32)
    except OSError as exc:
        raise UserError(f"model.init_from={source!r} is not a loadable transformers model folder or hub id "
                        f"({str(exc).splitlines()[0]})") from None
    if model.config.vocab_size < vocab_size:
        raise UserError(f"model.init_from={source!r} has {model.config.vocab_size} token rows but the data's "
                        f"tokenizer has {vocab_size}; prepare the data with that model's tokenizer")
    max_pos = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", 0)
    if max_pos < seq_len:
        raise UserError(f"model.init_from={source!r} supports {max_pos} positions, less than data.seq_len={seq_len}")
    return model


def _gain_targets(model: nn.Module) -> list[tuple[nn.Module, int]]:
    """Linear/Conv1D layers inside the transformer blocks (not the tied output head)."""
    head = model.get_output_embeddings()
    targets = []
    for module in model.modules():
        axis = neuron_axis_of(module)
        if axis is not None and module is not head:
            targets.append((module, axis))
    return targets


def add_linear_gains(model: nn.Module) -> None:
    """Give every block linear layer a learnable per-output gain: W_eff = diag(g) W."""
    for module, axis in _gain_targets(model):
        weight = module.weight
        parametrize.register_parametrization(module, "weight", LinearGain(weight.shape[axis], axis))


def unwrap(model: nn.Module) -> nn.Module:
    """The plain `transformers` model under torch.compile / DDP wrappers."""
    while True:
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if inner is None:
            return model
        model = inner


def folded_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict of a plain `transformers` model: each gain folded into its weight."""
    return fold_gains(model.state_dict(), model)


def fold_gains(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Fold each learnable gain of `state` (a state dict of `model`, full tensors) into its weight.

    Tied parameters (the output head) keep only their first name: a gathered state dict holds
    separate copies that `save_pretrained` could not recognise as one tensor.
    """
    state = dict(state)
    seen: set[int] = set()
    for name, p in unwrap(model).named_parameters(remove_duplicate=False):
        if id(p) in seen:
            state.pop(name, None)
        seen.add(id(p))
    for prefix, module in unwrap(model).named_modules():
        if not parametrize.is_parametrized(module, "weight"):
            continue
        gain_module = module.parametrizations.weight[0]
        original = state.pop(f"{prefix}.parametrizations.weight.original")
        gain = state.pop(f"{prefix}.parametrizations.weight.0.gain")
        shape = (-1, 1) if gain_module.neuron_axis == 0 else (1, -1)
        state[f"{prefix}.weight"] = original * gain.view(shape)
    return state


def save_hf_model(model: nn.Module, out_dir: Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """`save_pretrained` (safetensors) of the plain model, gains folded, generation config included.

    `state_dict`: already folded full weights (gathered from a sharded model); default: the model's own.
    """
    model = unwrap(model)
    weights = state_dict if state_dict is not None else folded_state_dict(model)
    dtypes = {str(t.dtype).removeprefix("torch.") for t in weights.values() if t.is_floating_point()}
    training_dtype = model.config.dtype  # save_pretrained overwrites it (and empties `weights`)
    model.save_pretrained(out_dir, state_dict=weights, safe_serialization=True)
    if len(dtypes) == 1 and dtypes != {str(model.config.dtype).removeprefix("torch.")}:
        # save_pretrained names the model's own dtype (bf16 under DeepSpeed's bf16 mode), not that of the
        # weights it was handed (the fp32 masters), and from_pretrained's default dtype="auto" would load
        # them in it: the config names the weights' dtype.
        model.config.dtype = dtypes.pop()
        model.config.save_pretrained(out_dir)
    model.config.dtype = training_dtype
