"""The config's own documentation: each field's one-line attribute docstring, and the commented
YAML that `pretrain config RECIPE` prints (a resolved recipe that reads like a documented one)."""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect

import yaml

from pretrain import config as config_module
from pretrain.config import Config


@functools.cache
def field_descriptions() -> dict[str, dict[str, str]]:
    """Dataclass name -> field name -> the string literal written right under the field in pretrain/config.py."""
    out: dict[str, dict[str, str]] = {}
    for node in ast.parse(inspect.getsource(config_module)).body:
        if not isinstance(node, ast.ClassDef):
            continue
        docs = out.setdefault(node.name, {})
        for stmt, after in zip(node.body, node.body[1:], strict=False):
            if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and isinstance(after, ast.Expr)
                    and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
                docs[stmt.target.id] = after.value.value.strip()
    return out


def describe(cls: type) -> dict[str, str]:
    """Field name -> description of one config dataclass (empty for a class without any)."""
    return field_descriptions().get(cls.__name__, {})


def commented_yaml(cfg: Config, source: str) -> str:
    """`cfg` as a YAML recipe, every section and key followed by its description as a comment."""
    lines = [f"# The resolved config of {source}: defaults, the recipe, its `extends:` and the overrides.",
             "# Each comment: meaning, unit, default. This text is itself a valid recipe."]
    sections = describe(Config)
    for section in dataclasses.fields(cfg):
        values = getattr(cfg, section.name)
        docs = describe(type(values))
        rows = [(f"  {f.name}: {yaml_value(getattr(values, f.name))}", docs[f.name])
                for f in dataclasses.fields(values)]
        width = max(len(text) for text, _ in rows)
        lines += ["", f"# {sections[section.name]}", f"{section.name}:"]
        lines += [f"{text:<{width}}  # {doc}" for text, doc in rows]
    return "\n".join(lines) + "\n"


def yaml_value(value: object) -> str:
    """One value as inline YAML (tuples as lists), as it would be written in a recipe."""
    text = yaml.safe_dump(list(value) if isinstance(value, tuple) else value, default_flow_style=True,
                          width=1 << 16).strip()
    return text.removesuffix("...").strip()
