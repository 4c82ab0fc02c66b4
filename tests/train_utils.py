"""A tiny, fast training config over the fixture data, shared by integration tests."""

from pathlib import Path

from pretrain.config import Config, load_config

REPO = Path(__file__).resolve().parent.parent

TINY_OVERRIDES = [
    "model.hidden_size=32", "model.num_layers=2", "model.num_heads=2", "model.intermediate_size=64",
    "data.seq_len=32", "train.micro_batch_size=4", "train.steps=8", "train.eval_every=4", "train.eval_batches=2",
    "checkpoint.every=4", "checkpoint.keep_last=5", "logging.log_every=1", "logging.rotation_every=1",
    "logging.progress=false", "logging.tensorboard=false", "sample.tokens=0", "train.device=cpu",
    "train.precision=fp32",
]


def tiny_config(data_dir: Path, out_dir: Path, *overrides: str) -> Config:
    return load_config(REPO / "configs" / "tiny-cpu.yaml",
                       [*TINY_OVERRIDES, f"data.dir={data_dir}", f"train.out_dir={out_dir}", *overrides])


def tiny_args(data_dir: Path, out_dir: Path, *overrides: str) -> list[str]:
    """The same config as CLI arguments (recipe + overrides)."""
    return [str(REPO / "configs" / "tiny-cpu.yaml"), *TINY_OVERRIDES, f"data.dir={data_dir}",
            f"train.out_dir={out_dir}", *overrides]
