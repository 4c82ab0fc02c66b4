"""Config system: every recipe loads, inheritance, overrides, and one-line errors."""

from pathlib import Path

import pytest

from pretrain.config import Config, config_from_dict, config_to_dict, load_config
from pretrain.errors import UserError

# Run recipes only; configs/study/ holds study grids, read by `pretrain study` (tests/test_study.py).
CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


def test_there_are_recipes():
    names = {p.name for p in CONFIGS}
    assert {"tiny-cpu.yaml", "gpt2-124m.yaml", "llama-125m.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_every_recipe_loads_and_round_trips(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_extends_merges_over_the_parent():
    cfg = load_config(Path("configs/llama-350m.yaml"))
    parent = load_config(Path("configs/llama-125m.yaml"))
    assert cfg.model.preset == "llama-350m" and cfg.optim.lr == 6e-4
    assert cfg.optim.weight_decay == parent.optim.weight_decay  # inherited
    assert cfg.data.seq_len == parent.data.seq_len


def test_dotted_overrides_parse_yaml_scalars():
    cfg = load_config(Path("configs/tiny-cpu.yaml"), ["optim.lr=3e-3", "train.steps=200", "optim.betas=[0.8, 0.9]",
                                                      "model.linear_gains=true", "model.hidden_size=null"])
    assert cfg.optim.lr == 3e-3 and cfg.train.steps == 200 and cfg.optim.betas == (0.8, 0.9)
    assert cfg.model.linear_gains is True and cfg.model.hidden_size is None


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=1", "unknown config key optim.lrr; did you mean optim.lr?"),
    ("trian.steps=3", "unknown config key trian; did you mean train?"),
    ("optim.lr=fast", "optim.lr must be float, got str 'fast'"),
    ("train.steps=2.5", "train.steps must be int, got float 2.5"),
    ("model.arch=bert", "model.arch must be one of llama, gpt2"),
    ("optim.name=rv-adam", "did you mean 'rv-adamw'?"),
    ("optim.betas=[0.9]", "optim.betas must be a list of float, float"),
    ("train.steps", "is not of the form section.key=value"),
    ("schedule.warmup_steps=100000", "schedule.warmup_steps must be in"),
])
def test_bad_values_give_one_line_errors(override, message):
    with pytest.raises(UserError) as err:
        load_config(Path("configs/tiny-cpu.yaml"), [override])
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_and_cyclic_files(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(UserError, match="extends itself"):
        load_config(tmp_path / "a.yaml")
