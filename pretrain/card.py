"""The model card (README.md) written into every checkpoint and hub export.

Its metadata is built with `huggingface_hub.ModelCardData`, so the hub reads it as it writes it:
library and pipeline, tags, the license when one is given (`pretrain export/push --license`),
the dataset and base model when they are hub ids, and a model-index entry with the val loss.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from pretrain.config import Config, config_to_dict
from pretrain.metrics import model_card_section

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def hub_id(name: str | None) -> str | None:
    """`name` when it names a hub repo (`name` or `owner/name`), None for local paths and the embedded corpus."""
    if not name or name == "embedded" or Path(name).expanduser().exists() or not _HUB_ID.fullmatch(name):
        return None
    return name


def card_metadata(cfg: Config, val_loss: float | None, license: str | None = None) -> str:
    """The card's YAML front matter, through huggingface_hub.ModelCardData."""
    from huggingface_hub import EvalResult, ModelCardData

    dataset = hub_id(cfg.data.source)
    name = f"{cfg.model.arch}-{cfg.model.preset}-{cfg.optim.name}"
    results = None
    if val_loss is not None:
        results = [EvalResult(task_type="text-generation", dataset_type=dataset or "custom",
                              dataset_name=f"held-out split of {dataset or cfg.data.source}",
                              metric_type="loss", metric_name="validation loss (nats/token)",
                              metric_value=round(float(val_loss), 4))]
    data = ModelCardData(license=license, library_name="transformers", pipeline_tag="text-generation",
                         tags=["rotational-pretrain", cfg.model.arch, cfg.optim.name],
                         datasets=[dataset] if dataset else None, base_model=hub_id(cfg.model.init_from),
                         model_name=name, eval_results=results)
    return data.to_yaml()


def model_card(cfg: Config, step: int, tokens_seen: int, val_loss: float | None, rotation_dir: Path,
               license: str | None = None) -> str:
    """Markdown with hub metadata, the run summary, the rotation table and the full config."""
    val = f"{val_loss:.4f}" if val_loss is not None else "not measured yet"
    rotation = model_card_section(rotation_dir) if (rotation_dir / "summary.json").is_file() else ""
    return "\n".join([
        "---", card_metadata(cfg, val_loss, license).strip(), "---", "",
        f"# {cfg.model.arch} ({cfg.model.preset}) trained with {cfg.optim.name}", "",
        "Pretrained from scratch with rotational-pretrain on pre-tokenized shards."
        if not cfg.model.init_from else f"Continued pretraining of {cfg.model.init_from} with rotational-pretrain.", "",
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
