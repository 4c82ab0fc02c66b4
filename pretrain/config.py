"""Typed run configuration: dataclass sections, YAML recipes with `extends:`, dotted CLI overrides.

A recipe is a YAML mapping whose top-level keys are the sections below. `extends: other.yaml`
(relative to the recipe) loads another recipe first and deep-merges this one over it.
Overrides such as `optim.lr=3e-3` are parsed as YAML scalars and applied last.
Every key and value is validated: an unknown key names the closest valid one, a wrong type
names the key and the expected type.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from pretrain.errors import UserError

OPTIMIZERS = ("adamw", "adamw-plain", "lion", "sgdm", "rv-adamw", "rv-lion", "rv-sgdm")


@dataclass
class ModelConfig:
    arch: Literal["llama", "gpt2"] = "llama"
    preset: str = "tiny"
    # Free overrides of the preset; None keeps the preset's value.
    hidden_size: Optional[int] = None
    num_layers: Optional[int] = None
    num_heads: Optional[int] = None
    num_kv_heads: Optional[int] = None
    intermediate_size: Optional[int] = None
    max_position_embeddings: Optional[int] = None
    tie_embeddings: Optional[bool] = None
    dropout: float = 0.0
    init_std: float = 0.02
    # Learnable per-output gain on every linear layer, folded into the weight at export.
    linear_gains: bool = False
    # A local `transformers` model folder or hub id to continue pretraining from.
    init_from: Optional[str] = None


@dataclass
class DataConfig:
    # "embedded" (Shakespeare + Python stdlib), a local .txt/.jsonl/.parquet file or folder,
    # a `datasets` folder written by `save_to_disk`, or a `datasets` hub name.
    source: str = "embedded"
    text_field: str = "text"
    dataset_config: Optional[str] = None
    dataset_split: str = "train"
    # "bpe" trains a byte-level BPE at prepare time; anything else is a tokenizer dir or hub id.
    tokenizer: str = "bpe"
    vocab_size: int = 8192
    # Where `pretrain prepare` writes the shards and where training reads them.
    dir: str = "data/embedded"
    shard_tokens: int = 1 << 24
    val_fraction: float = 0.005
    dtype: Literal["auto", "uint16", "uint32"] = "auto"
    num_proc: int = 2
    seq_len: int = 256


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    momentum: float = 0.9
    eps: float = 1e-8
    # Rotational-variant options (DESIGN section 4); ignored by the plain optimizers.
    update_norm_decay: float = 0.9
    zero_mean: bool = True
    per_neuron: bool = True
    center_init: bool = True
    rotational_eps: float = 1e-8
    # Embeddings rotate per token row, as every decayed matrix does in the paper's GPT-2 code;
    # false gives them the plain inner step (docs/rotation-metrics.md, "Which tensors").
    rotational_embeddings: bool = True
    # torch AdamW implementation: None picks fused on CUDA, foreach elsewhere.
    fused: Optional[bool] = None


@dataclass
class ScheduleConfig:
    name: Literal["constant", "cosine", "linear", "wsd"] = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    # Warmup-stable-decay: fraction of the steps spent in the final linear decay.
    decay_fraction: float = 0.2


@dataclass
class TrainConfig:
    steps: int = 1000
    micro_batch_size: int = 16
    grad_accum: int = 1
    seed: int = 1337
    grad_clip: float = 1.0
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    compile: bool = False
    device: str = "auto"
    eval_every: int = 100
    eval_batches: int = 8
    out_dir: str = "runs/tiny"
    nan_policy: Literal["stop", "skip"] = "stop"
    # Number of skipped non-finite steps tolerated in a row before stopping anyway.
    max_skips: int = 10


@dataclass
class CheckpointConfig:
    every: int = 500
    keep_last: int = 3
    save_final: bool = True


@dataclass
class LoggingConfig:
    log_every: int = 10
    rotation_every: int = 10
    tensorboard: bool = True
    wandb: bool = False
    trackio: bool = False
    project: str = "rotational-pretrain"
    progress: bool = True
    sample_prompt: str = "ROMEO:"
    sample_tokens: int = 64


@dataclass
class ParallelConfig:
    strategy: Literal["single", "ddp", "fsdp2", "deepspeed"] = "single"
    zero_stage: int = 0
    # The world size the run expects; None accepts whatever the launcher gives (and records it).
    world_size: Optional[int] = None
    # Extra DeepSpeed settings (buckets, offload, ...) merged under the ones derived from this config.
    deepspeed_config: Optional[str] = None
    # Seconds a collective may wait for a peer before the run fails (a dead or hung rank).
    timeout_s: int = 600


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    @property
    def global_batch_size(self) -> int:
        """Sequences per optimizer step, over all ranks (world size taken from parallel)."""
        return self.train.micro_batch_size * self.train.grad_accum * (self.parallel.world_size or 1)


# ----------------------------------------------------------------------------- loading


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a recipe (or the defaults when `path` is None), apply overrides, validate."""
    raw = _read_recipe(Path(path), seen=()) if path is not None else {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"override {item!r} is not of the form section.key=value")
        _set_dotted(raw, key.strip(), yaml.safe_load(value) if value.strip() else None)
    return config_from_dict(raw)


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Build a validated Config from a plain mapping (as saved in a run dir)."""
    cfg = _build(Config, raw, prefix="")
    validate(cfg)
    return cfg


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """Plain, YAML-safe mapping of a config (tuples become lists)."""

    def plain(value: Any) -> Any:
        if isinstance(value, tuple):
            return list(value)
        return value

    return {sec.name: {k: plain(v) for k, v in dataclasses.asdict(getattr(cfg, sec.name)).items()}
            for sec in dataclasses.fields(cfg)}


def save_config(cfg: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def validate(cfg: Config) -> None:
    """Cross-field checks that a type alone cannot express."""
    if cfg.optim.name not in OPTIMIZERS:
        raise UserError(f"optim.name must be one of {', '.join(OPTIMIZERS)}, got {cfg.optim.name!r}"
                        f"{_did_you_mean(cfg.optim.name, OPTIMIZERS)}")
    positive = {"train.steps": cfg.train.steps, "train.micro_batch_size": cfg.train.micro_batch_size,
                "train.grad_accum": cfg.train.grad_accum, "data.seq_len": cfg.data.seq_len,
                "data.vocab_size": cfg.data.vocab_size, "data.shard_tokens": cfg.data.shard_tokens,
                "logging.log_every": cfg.logging.log_every, "train.eval_every": cfg.train.eval_every,
                "checkpoint.every": cfg.checkpoint.every, "checkpoint.keep_last": cfg.checkpoint.keep_last}
    for key, value in positive.items():
        if value <= 0:
            raise UserError(f"{key} must be positive, got {value}")
    if not 0.0 < cfg.data.val_fraction < 1.0:
        raise UserError(f"data.val_fraction must be in (0, 1), got {cfg.data.val_fraction}")
    if cfg.schedule.warmup_steps < 0 or cfg.schedule.warmup_steps > cfg.train.steps:
        raise UserError(f"schedule.warmup_steps must be in [0, train.steps={cfg.train.steps}], "
                        f"got {cfg.schedule.warmup_steps}")
    if cfg.parallel.zero_stage not in (0, 1, 2, 3):
        raise UserError(f"parallel.zero_stage must be 0, 1, 2 or 3, got {cfg.parallel.zero_stage}")
    if cfg.parallel.strategy == "deepspeed" and cfg.train.nan_policy == "skip":
        raise UserError("train.nan_policy=skip is not available under DeepSpeed (its gradients are reduced into its "
                        "own buffers before the loss is checked); use train.nan_policy=stop")
    if cfg.parallel.world_size is not None and cfg.parallel.world_size < 1:
        raise UserError(f"parallel.world_size must be positive, got {cfg.parallel.world_size}")
    if cfg.optim.lr <= 0:
        raise UserError(f"optim.lr must be positive, got {cfg.optim.lr}")


# ----------------------------------------------------------------------------- internals


def read_yaml_mapping(path: Path, what: str, example: str, shape: str) -> dict[str, Any]:
    """A YAML file that must hold a mapping, with one-line errors naming `what` it is."""
    if not path.is_file():
        raise UserError(f"{what} {path} does not exist; pass {example}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"{what} {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{what} {path} must be {shape}, got {type(raw).__name__}")
    return raw


def _read_recipe(path: Path, seen: tuple[Path, ...]) -> dict[str, Any]:
    resolved = path.resolve()
    if resolved in seen:
        raise UserError(f"config {path} extends itself through {' -> '.join(map(str, seen))}")
    raw = read_yaml_mapping(path, "config file", "a YAML recipe such as configs/tiny-cpu.yaml",
                            "a YAML mapping of sections")
    parent = raw.pop("extends", None)
    if parent is None:
        return raw
    base = _read_recipe((path.parent / parent), seen + (resolved,))
    return _deep_merge(base, raw)


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise UserError(f"override {key} goes inside {part!r}, which is not a section")
        node = child
    node[parts[-1]] = value


def _did_you_mean(name: str, options: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else ""


def _build(cls: type, raw: Any, prefix: str) -> Any:
    where = prefix.rstrip(".") or "config"
    if not isinstance(raw, dict):
        raise UserError(f"{where} must be a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            hint = f"; did you mean {prefix}{close[0]}?" if close else f"; valid keys: {', '.join(names)}"
            raise UserError(f"unknown config key {prefix}{key}{hint}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(value, hint, f"{prefix}{key}")
    return cls(**kwargs)


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(hint)))
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in typing.get_args(hint))
    if origin is tuple:
        return "a list of " + ", ".join(_type_name(a) for a in typing.get_args(hint))
    return getattr(hint, "__name__", str(hint))


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check `value` against `hint`; ints are accepted for floats, lists for tuples."""
    origin = typing.get_origin(hint)
    bad = UserError(f"{key} must be {_type_name(hint)}, got {type(value).__name__} {value!r}")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except UserError:
                continue
        raise bad
    if origin is Literal:
        if value in typing.get_args(hint):
            return value
        raise bad
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise bad
        return tuple(_coerce(v, a, key) for v, a in zip(value, args, strict=True))
    if hint is float:
        if isinstance(value, str):  # PyYAML reads exponents without a dot ("3e-4") as strings
            try:
                return float(value)
            except ValueError:
                raise bad from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if hint is str:
        if not isinstance(value, str):
            raise bad
        return value
    raise TypeError(f"unsupported config type {hint!r} for {key}")
