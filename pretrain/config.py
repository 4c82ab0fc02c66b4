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
import os
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from pretrain.errors import UserError


@dataclass(frozen=True)
class OptimizerKind:
    """What an `optim.name` means: its inner update rule, whether it is the rotational variant, whose code."""

    rule: str  # adamw, lion or sgdm (pretrain/optim/rules.py)
    rotational: bool
    torch_adamw: bool = False  # torch.optim.AdamW instead of pretrain.optim.RotationalOptimizer


# The one table of optimizer names (docs/design.md §4); everything else looks names up here.
OPTIMIZERS: dict[str, OptimizerKind] = {
    "adamw": OptimizerKind("adamw", rotational=False, torch_adamw=True),
    "adamw-plain": OptimizerKind("adamw", rotational=False),
    "lion": OptimizerKind("lion", rotational=False),
    "sgdm": OptimizerKind("sgdm", rotational=False),
    "rv-adamw": OptimizerKind("adamw", rotational=True),
    "rv-lion": OptimizerKind("lion", rotational=True),
    "rv-sgdm": OptimizerKind("sgdm", rotational=True),
}

# Every field below carries a one-line attribute docstring: what it means, its unit, its default.
# `pretrain config RECIPE` prints them as comments (pretrain/config_doc.py); a test checks that
# each one is there and that the default it names is the field's default.


@dataclass
class ModelConfig:
    arch: Literal["llama", "gpt2"] = "llama"
    """Model family: llama (LlamaForCausalLM) or gpt2 (GPT2LMHeadModel); default llama."""
    preset: str = "tiny"
    """Named size: tiny, small, gpt2-124m, llama-125m, llama-350m or llama-1b; default tiny."""
    hidden_size: Optional[int] = None
    """Width of the residual stream in features (null: the preset's); default null."""
    num_layers: Optional[int] = None
    """Transformer blocks (null: the preset's); default null."""
    num_heads: Optional[int] = None
    """Attention heads (null: the preset's); default null."""
    num_kv_heads: Optional[int] = None
    """Key/value heads, llama only (null: num_heads if that is set, else the preset's); default null."""
    intermediate_size: Optional[int] = None
    """MLP width in features (null: the preset's); default null."""
    max_position_embeddings: Optional[int] = None
    """Context in tokens; explicit: >= data.seq_len (null: the preset's, raised to data.seq_len); default null."""
    tie_embeddings: Optional[bool] = None
    """Share the input embedding with the output head (null: true); default null."""
    dropout: float = 0.0
    """Dropout probability: attention (llama); attention, residual and embedding (gpt2); default 0.0."""
    init_std: float = 0.02
    """Standard deviation of the normal initial weights (transformers initializer_range); default 0.02."""
    linear_gains: bool = False
    """Learnable per-output gain on every block linear layer, folded into the weight at export; default false."""
    init_from: Optional[str] = None
    """A local transformers model folder or hub id to continue pretraining from (null: random init); default null."""


@dataclass
class DataConfig:
    source: str = "embedded"
    """Corpus: embedded, a .txt/.jsonl/.parquet file or folder, a datasets folder or hub name; default embedded."""
    text_field: str = "text"
    """Column or JSON key holding the text; default text."""
    dataset_config: Optional[str] = None
    """Configuration name of a datasets hub dataset; default null."""
    dataset_split: str = "train"
    """Split of a datasets dataset to read; default train."""
    tokenizer: str = "bpe"
    """bpe trains a byte-level BPE at prepare time; anything else is a tokenizer folder or hub id; default bpe."""
    vocab_size: int = 8192
    """Tokens in a trained BPE vocabulary, before <|endoftext|>; default 8192."""
    dir: str = "data/embedded"
    """Folder `pretrain prepare` writes the shards to and training reads them from; default data/embedded."""
    shard_tokens: int = 1 << 24
    """Tokens per shard file; default 16777216."""
    val_fraction: float = 0.005
    """Fraction of the tokens held out for validation, in (0, 1); default 0.005."""
    dtype: Literal["auto", "uint16", "uint32"] = "auto"
    """Token dtype of the shards (auto: uint16 when the vocabulary fits, else uint32); default auto."""
    num_proc: int = 2
    """Processes that tokenize in parallel at prepare time; default 2."""
    seq_len: int = 256
    """Training context in tokens per sequence; default 256."""


@dataclass
class OptimConfig:
    name: str = "adamw"
    """Optimizer: adamw (torch), adamw-plain, lion, sgdm, rv-adamw, rv-lion or rv-sgdm; default adamw."""
    lr: float = 1e-3
    """Peak learning rate per optimizer step (the schedule scales it); default 0.001."""
    weight_decay: float = 0.1
    """Decoupled weight decay per unit lr (L2 through the momentum for sgdm); > 0 for rv-*; default 0.1."""
    betas: tuple[float, float] = (0.9, 0.95)
    """Moment decay rates (b1, b2) of AdamW and Lion; default [0.9, 0.95]."""
    momentum: float = 0.9
    """Momentum of SGDM; default 0.9."""
    eps: float = 1e-8
    """AdamW's denominator epsilon; default 1.0e-08."""
    update_norm_decay: float = 0.9
    """RV only (docs/design.md §4 step 4): decay c of the running average of the squared update norm; default 0.9."""
    zero_mean: bool = True
    """RV only: keep every neuron's update and weights at zero mean; default true."""
    per_neuron: bool = True
    """RV only: rotate every neuron on its own (false: the whole tensor as one vector); default true."""
    center_init: bool = True
    """RV only: centre every neuron to zero mean at construction, keeping its norm; default true."""
    rotational_eps: float = 1e-8
    """RV only: epsilon added to sqrt(s_hat) in the rotation step; default 1.0e-08."""
    rotational_embeddings: bool = True
    """RV only: rotate the token embedding per row, as the paper's code does every decayed matrix; default true."""
    fused: Optional[bool] = None
    """Fused step (torch AdamW: fused; ours: true = Triton on CUDA + C++ on CPU, null = CUDA only); default null."""


@dataclass
class ScheduleConfig:
    name: Literal["constant", "cosine", "linear", "wsd"] = "cosine"
    """Learning-rate shape after warmup: constant, cosine, linear or wsd (warmup-stable-decay); default cosine."""
    warmup_steps: int = 0
    """Optimizer steps of linear warmup from lr/warmup_steps to lr (0: none); default 0."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of the peak (cosine, linear, wsd); default 0.1."""
    decay_fraction: float = 0.2
    """wsd only: fraction of train.steps spent in the final linear decay; default 0.2."""


@dataclass
class TrainConfig:
    steps: int = 1000
    """Optimizer steps of the whole run (the schedule spans them); default 1000."""
    micro_batch_size: int = 16
    """Sequences per forward pass on each rank; default 16."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step on each rank; default 1."""
    seed: int = 1337
    """Seed of the initial weights, the data order and (offset by rank) dropout; default 1337."""
    grad_clip: float = 1.0
    """Maximum global L2 norm of the gradient (0: no clipping); default 1.0."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Compute precision (auto: bf16 on GPUs that support it, else fp32); master weights stay fp32; default auto."""
    compile: bool = False
    """Run the model through torch.compile; default false."""
    device: str = "auto"
    """cpu, cuda or cuda:N (auto: this rank's GPU if there is one, else cpu); default auto."""
    eval_every: int = 100
    """Optimizer steps between validation passes (and at the last step); default 100."""
    eval_batches: int = 8
    """Validation batches of micro_batch_size sequences per pass, over all ranks; default 8."""
    out_dir: str = "runs/tiny"
    """Run folder: config, metrics log, tracker output and checkpoints; default runs/tiny."""
    nan_policy: Literal["stop", "skip"] = "stop"
    """Non-finite loss or gradient: stop (keep the last good checkpoint) or skip; fp16 overflows skip; default stop."""
    max_skips: int = 10
    """Skipped steps (under nan_policy=skip, or fp16 overflows) tolerated in a row before stopping; default 10."""


@dataclass
class CheckpointConfig:
    every: int = 500
    """Optimizer steps between checkpoints; default 500."""
    keep_last: int = 3
    """Newest checkpoints kept; older ones are pruned; default 3."""
    save_final: bool = True
    """Also write a checkpoint at the run's last step; default true."""
    on_signal: bool = True
    """On SIGTERM/SIGUSR1 (a stop notice), checkpoint after the running step, exit 128+signal; default true."""


@dataclass
class LoggingConfig:
    log_every: int = 10
    """Optimizer steps between train/* log records (and at the last step); default 10."""
    rotation_every: int = 10
    """Optimizer steps between rotation measurements, also taken at step 1 (0: off); default 10."""
    tensorboard: bool = True
    """Write TensorBoard event files into the run folder; default true."""
    wandb: bool = False
    """Log to Weights & Biases (the wandb package must be installed); default false."""
    trackio: bool = False
    """Log to trackio (the trackio package must be installed); default false."""
    project: str = "rotational-pretrain"
    """Project name for wandb and trackio; default rotational-pretrain."""
    progress: bool = True
    """Show a progress bar on rank 0; default true."""


@dataclass
class SampleConfig:
    prompt: str = "ROMEO:"
    """Prompt of the text sampled from the final checkpoint into sample.txt; default 'ROMEO:'."""
    tokens: int = 64
    """New tokens sampled after training (0: no sample); default 64."""


@dataclass
class ParallelConfig:
    strategy: Literal["single", "ddp", "fsdp2", "deepspeed"] = "single"
    """How ranks share the work: single, ddp, fsdp2 or deepspeed (docs/design.md §9); default single."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage 0-3 (deepspeed only); default 0."""
    world_size: Optional[int] = None
    """Processes the run expects (null: whatever the launcher starts, recorded in the saved config); default null."""
    deepspeed_config: Optional[str] = None
    """DeepSpeed JSON merged under the settings derived from this config (buckets, offload, ...); default null."""
    timeout_s: int = 600
    """Seconds a collective waits for a peer before the run fails (setup, evaluation, checkpoints); default 600."""
    step_timeout_s: float = 60.0
    """Seconds a training step may stall (or 10x the slowest step, if longer) before the rank stops; default 60.0."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    """The transformer: family, size, gains, initialisation."""
    data: DataConfig = field(default_factory=DataConfig)
    """The corpus, tokenizer and shards (`pretrain prepare`), and the sequence length."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """The optimizer and its hyperparameters."""
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    """The learning-rate schedule over train.steps."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Steps, batch, precision, device, evaluation and the run folder."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """When checkpoints are written and how many are kept."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Scalar logs, trackers, rotation metrics and the progress bar."""
    sample: SampleConfig = field(default_factory=SampleConfig)
    """The text sample `pretrain train` writes after a finished run."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """The distributed strategy and what the launch must deliver."""

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
        try:
            parsed = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError as exc:
            raise UserError(f"override {key.strip()}={value} is not valid YAML ({_yaml_problem(exc)}); quote it "
                            "or fix it, e.g. 'optim.betas=[0.9, 0.95]'") from None
        _set_dotted(raw, key.strip(), parsed)
    return config_from_dict(raw)


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Build a validated Config from a plain mapping (as saved in a run dir)."""
    cfg = _build(Config, _migrate_moved_keys(raw), prefix="")
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
    _validate_parallel(cfg)
    if cfg.optim.lr <= 0:
        raise UserError(f"optim.lr must be positive, got {cfg.optim.lr}")
    if cfg.optim.name.startswith("rv-") and cfg.optim.weight_decay <= 0:
        raise UserError(f"optim.weight_decay must be positive for {cfg.optim.name} (it sets the equilibrium rotation "
                        f"rate), got {cfg.optim.weight_decay}; set it (e.g. 0.1) or use a plain optimizer")
    max_pos = cfg.model.max_position_embeddings
    if max_pos is not None and max_pos < cfg.data.seq_len:
        raise UserError(f"model.max_position_embeddings={max_pos} is below data.seq_len={cfg.data.seq_len}; "
                        "raise it or lower data.seq_len")


def _validate_parallel(cfg: Config) -> None:
    if cfg.parallel.zero_stage not in (0, 1, 2, 3):
        raise UserError(f"parallel.zero_stage must be 0, 1, 2 or 3, got {cfg.parallel.zero_stage}")
    if cfg.parallel.strategy == "deepspeed" and cfg.train.nan_policy == "skip":
        raise UserError("train.nan_policy=skip is not available under DeepSpeed (its gradients are reduced into its "
                        "own buffers before the loss is checked); use train.nan_policy=stop")
    if cfg.parallel.step_timeout_s <= 0 or cfg.parallel.timeout_s <= 0:
        raise UserError("parallel.timeout_s and parallel.step_timeout_s must be positive")
    if cfg.parallel.world_size is not None and cfg.parallel.world_size < 1:
        raise UserError(f"parallel.world_size must be positive, got {cfg.parallel.world_size}")


# ----------------------------------------------------------------------------- internals

# Keys that moved, old -> new. Recipes and saved run configs that use the old name still load: the
# value moves to the new key with a note on stderr; both names with different values are refused.
MOVED_KEYS = {"logging.sample_prompt": "sample.prompt", "logging.sample_tokens": "sample.tokens"}
_noted: set[str] = set()


def _migrate_moved_keys(raw: dict[str, Any]) -> dict[str, Any]:
    raw = {key: dict(value) if isinstance(value, dict) else value for key, value in raw.items()}
    for old, new in MOVED_KEYS.items():
        (old_section, old_key), (new_section, new_key) = old.split("."), new.split(".")
        source, target = raw.get(old_section), raw.setdefault(new_section, {})
        if not (isinstance(source, dict) and old_key in source and isinstance(target, dict)):
            continue
        value = source.pop(old_key)
        if new_key in target and target[new_key] != value:
            raise UserError(f"{old} (the old name of {new}) is {value!r} but {new} is {target[new_key]!r}; "
                            f"keep only {new}")
        target[new_key] = value
        if old not in _noted and os.environ.get("RANK", "0") == "0":  # once per process, from rank 0
            _noted.add(old)
            print(f"note: {old} is now {new}; read as {new} (rename it in the recipe)", file=sys.stderr)
    return raw



def read_yaml_mapping(path: Path, what: str, example: str, shape: str) -> dict[str, Any]:
    """A YAML file that must hold a mapping, with one-line errors naming `what` it is."""
    if not path.is_file():
        raise UserError(f"{what} {path} does not exist; pass {example}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"{what} {path} is not valid YAML: {_yaml_problem(exc)}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{what} {path} must be {shape}, got {type(raw).__name__}")
    return raw


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """PyYAML's problem with its line and column (1-based), on one line."""
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    mark = getattr(exc, "problem_mark", None)
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark is not None else problem


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
        return _coerce_union(value, typing.get_args(hint), key, bad)
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
        return _coerce_float(value, bad)
    if hint in (int, bool, str):
        if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):  # bool is an int subclass
            raise bad
        return value
    raise TypeError(f"unsupported config type {hint!r} for {key}")


def _coerce_union(value: Any, args: tuple[Any, ...], key: str, bad: UserError) -> Any:
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


def _coerce_float(value: Any, bad: UserError) -> float:
    if isinstance(value, str):  # PyYAML reads exponents without a dot ("3e-4") as strings
        try:
            return float(value)
        except ValueError:
            raise bad from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad
    return float(value)
