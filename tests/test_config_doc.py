"""The config documents itself: a description per field, `pretrain config`, moved keys."""

import dataclasses
import typing

import pytest
import yaml

from pretrain import config
from pretrain.cli import main
from pretrain.config import Config, _coerce, config_to_dict, load_config
from pretrain.config_doc import describe
from pretrain.errors import UserError
from tests.train_utils import REPO

SECTIONS = [(section.name, section.type) for section in dataclasses.fields(Config)]
RECIPE = REPO / "configs" / "tiny-cpu.yaml"


def section_classes() -> list[type]:
    hints = typing.get_type_hints(Config)
    return [hints[name] for name, _ in SECTIONS]


def test_every_section_has_a_description():
    docs = describe(Config)
    for name, _ in SECTIONS:
        assert docs.get(name), f"section {name} has no description"


@pytest.mark.parametrize("cls", section_classes(), ids=lambda c: c.__name__)
def test_every_field_has_a_one_line_description_naming_its_true_default(cls):
    docs, hints = describe(cls), typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        doc = docs.get(f.name)
        assert doc, f"{cls.__name__}.{f.name} has no description"
        assert "\n" not in doc and len(doc) < 200, f"{cls.__name__}.{f.name}: not one line"
        assert doc.endswith(".") and "; default " in doc, f"{cls.__name__}.{f.name}: no stated default"
        stated = doc.rsplit("; default ", 1)[1].removesuffix(".")
        # Read back the way a recipe value is read: YAML, then the config's own type check.
        value = _coerce(yaml.safe_load(stated), hints[f.name], f.name)
        assert value == f.default, f"{cls.__name__}.{f.name}: states default {stated}, the field has {f.default!r}"


def test_pretrain_config_prints_every_key_with_its_description(capsys, tmp_path):
    assert main(["config", str(RECIPE), "optim.lr=2e-3"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    cfg = load_config(RECIPE, ["optim.lr=2e-3"])
    for (name, _), cls in zip(SECTIONS, section_classes(), strict=True):
        start = lines.index(f"{name}:")
        assert lines[start - 1] == f"# {describe(Config)[name]}"
        for f in dataclasses.fields(cls):
            line = next(line for line in lines[start + 1:] if line.startswith(f"  {f.name}: "))
            assert line.endswith(f"  # {describe(cls)[f.name]}"), line
    # The printed text is a recipe: it loads back to the very same config.
    printed = tmp_path / "printed.yaml"
    printed.write_text(out)
    assert config_to_dict(load_config(printed)) == config_to_dict(cfg)
    assert load_config(printed).optim.lr == 2e-3


def test_a_bad_recipe_is_a_one_line_error(capsys, tmp_path):
    assert main(["config", str(tmp_path / "missing.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "does not exist" in err[0]


def test_the_old_sample_keys_still_load_with_a_note(capsys, monkeypatch):
    monkeypatch.setattr(config, "_noted", set())  # the note is printed once per process
    cfg = load_config(RECIPE, ["logging.sample_prompt='JULIET:'", "logging.sample_tokens=5"])
    assert (cfg.sample.prompt, cfg.sample.tokens) == ("JULIET:", 5)
    assert not hasattr(cfg.logging, "sample_prompt")
    notes = capsys.readouterr().err.splitlines()
    assert notes == [f"note: logging.sample_{key} is now sample.{key}; read as sample.{key} (rename it in the recipe)"
                     for key in ("prompt", "tokens")]
    # Equal values under both names are one setting; different ones are refused.
    assert load_config(RECIPE, ["logging.sample_tokens=5", "sample.tokens=5"]).sample.tokens == 5
    with pytest.raises(UserError, match="keep only sample.tokens"):
        load_config(RECIPE, ["logging.sample_tokens=5", "sample.tokens=6"])
