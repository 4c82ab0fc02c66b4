"""Llama's rotary cos/sin computed once a forward pass under torch.compile, not once per layer.

`LlamaRotaryEmbedding` computes cos and sin of every (position, frequency) pair once a forward
pass, in eager mode, and hands them to every layer. Under torch.compile, inductor fuses that
small computation into each layer's query/key kernel instead, forward and backward: every layer
then evaluates sin and cos for every element of q and k (heads times more than the table has),
and those kernels became compute-bound. On an H200, llama-125m at 32 x 1024 spent 4.9 ms of a
61 ms step in them (24 kernels of 82-123 us whose memory traffic needs ~25 us; RESULTS.md,
session 6). Here the table comes from a custom op, which inductor cannot fuse into anything: it
is computed once and each layer's kernel reads it.

The arithmetic is transformers' own: freqs = position * inv_freq (one fp32 product, as its outer
product is), cat(freqs, freqs), cos/sin, times the attention scaling; tests/test_rope.py
compares it bit for bit. Only the module's class changes, at run time: no parameter or
persistent buffer is involved, so checkpoints are ordinary `transformers` ones. RoPE types whose
frequencies depend on the sequence (dynamic, longrope) keep transformers' module.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding


@torch.library.custom_op("pretrain::rotary_cos_sin", mutates_args=())
def rotary_cos_sin(inv_freq: Tensor, position_ids: Tensor, scaling: float) -> tuple[Tensor, Tensor]:
    """fp32 cos and sin [..., positions, 2 x frequencies] of `position_ids` [..., positions]."""
    freqs = position_ids[..., None].float() * inv_freq.float()
    angles = torch.cat((freqs, freqs), dim=-1)
    return angles.cos() * scaling, angles.sin() * scaling


@rotary_cos_sin.register_fake
def _(inv_freq: Tensor, position_ids: Tensor, scaling: float) -> tuple[Tensor, Tensor]:
    shape = (*position_ids.shape, 2 * inv_freq.shape[-1])
    return inv_freq.new_empty(shape, dtype=torch.float32), inv_freq.new_empty(shape, dtype=torch.float32)


class RotaryTable(LlamaRotaryEmbedding):
    """transformers' rotary embedding with its cos/sin from `rotary_cos_sin` (see the module docstring)."""

    def forward(self, x: Tensor, position_ids: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        cos, sin = rotary_cos_sin(self.inv_freq, position_ids, float(self.attention_scaling))
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)


def compute_rotary_once(model: nn.Module) -> int:
    """Give every static-frequency `LlamaRotaryEmbedding` of `model` the `RotaryTable` forward; returns how many."""
    count = 0
    for module in model.modules():
        static = getattr(module, "rope_type", None) in ("default", "linear", "llama3", "yarn")
        if type(module) is LlamaRotaryEmbedding and static and hasattr(module, "attention_scaling"):
            module.__class__ = RotaryTable
            count += 1
    return count
