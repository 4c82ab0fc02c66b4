"""Sample text from a checkpoint's exported `transformers` model."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pretrain.checkpoint import find_latest
from pretrain.errors import UserError


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or a run folder (then its newest complete checkpoint)."""
    path = Path(path)
    if (path / "model").is_dir():
        return path
    latest = find_latest(path)
    if latest is None:
        raise UserError(f"{path} is neither a checkpoint (no model/ folder) nor a run folder with a checkpoint")
    return latest


def generate_text(checkpoint: str | Path, prompt: str, max_new_tokens: int = 64, temperature: float = 0.8,
                  top_k: int = 50, seed: int = 0) -> str:
    """Prompt plus sampled continuation, decoded."""
    ckpt = resolve_checkpoint(checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(ckpt / "tokenizer")
    model = AutoModelForCausalLM.from_pretrained(ckpt / "model").eval()
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    if ids.shape[1] == 0:
        ids = torch.tensor([[tokenizer.eos_token_id]])
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=temperature > 0, temperature=temperature or None, top_k=top_k,
                             pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0], skip_special_tokens=True)
