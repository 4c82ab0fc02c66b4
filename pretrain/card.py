"""The model card (README.md) written into every checkpoint and hub export."""

from __future__ import annotations

from pathlib import Path

import yaml

from pretrain.config import Config, config_to_dict
from pretrain.metrics import model_card_section


def model_card(cfg: Config, step: int, tokens_seen: int, val_loss: float | None, rotation_dir: Path) -> str:
    """Markdown with hub metadata, the run summary, the rotation table and the full config."""
    front = {"library_name": "transformers", "pipeline_tag": "text-generation",
             "tags": ["rotational-pretrain", cfg.model.arch, cfg.optim.name]}
    val = f"{val_loss:.4f}" if val_loss is not None else "not measured yet"
    rotation = model_card_section(rotation_dir) if (rotation_dir / "summary.json").is_file() else ""
    return "\n".join([
        "---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
        f"# {cfg.model.arch} ({cfg.model.preset}) trained with {cfg.optim.name}", "",
        "Trained with [rotational-pretrain](https://github.com/) on pre-tokenized shards.", "",
        "| | |", "|---|---|",
        f"| optimizer step | {step} |",
        f"| tokens seen | {tokens_seen:,} |",
        f"| validation loss | {val} |",
        f"| optimizer | {cfg.optim.name}, lr {cfg.optim.lr:g}, weight decay {cfg.optim.weight_decay:g} |",
        f"| schedule | {cfg.schedule.name}, warmup {cfg.schedule.warmup_steps} steps |",
        f"| data | {cfg.data.source} (seq_len {cfg.data.seq_len}) |", "",
        "Load it with `AutoModelForCausalLM.from_pretrained(...)`; learnable gains, if any, are folded "
        "into the weights.", "",
        rotation, "",
        "## Training config", "", "```yaml", yaml.safe_dump(config_to_dict(cfg), sort_keys=False).strip(), "```", "",
    ])
