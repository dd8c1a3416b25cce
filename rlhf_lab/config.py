"""Typed configs from YAML plus command-line overrides (LightningCLI-style), for dataclasses.

    build(FitConfig, load_yaml("sft.yaml"), overrides=["--config.lr", "1e-4", "--model.lora.r=4"])

`build` turns nested dicts into nested dataclasses, checking every key against the dataclass'
fields and every value against the field's type annotation. Errors name the dotted key (and the
file, when the dict came from one), e.g. `sft.yaml: config.lr: expected a float, got 'fast'`.
Override values are parsed as YAML scalars/lists (`1e-4`, `null`, `true`, `[q_proj, v_proj]`).
"""

from __future__ import annotations

import copy
import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, Union

import yaml

from rlhf_lab.errors import ConfigError

__all__ = ["ConfigError", "apply_overrides", "build", "dump_yaml", "field_help", "load_yaml", "parse_overrides"]


_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def load_yaml(path: str | Path) -> dict:
    """The mapping at the top of a YAML file (an empty file is `{}`)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: no such config file")
    try:
        with open(p) as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of keys, got {type(data).__name__}")
    return data


def parse_overrides(args: list[str]) -> list[tuple[str, Any]]:
    """`["--a.b", "1", "--c=x"]` → `[("a.b", 1), ("c", "x")]`, values parsed as YAML."""
    out, i = [], 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(f"expected an override --key.sub value, got {arg!r}")
        key = arg[2:]
        if "=" in key:
            key, raw = key.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"override --{key} has no value")
            raw = args[i + 1]
            i += 2
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        if isinstance(value, str) and _FLOAT.fullmatch(value):  # YAML 1.1 leaves 1e-4 a string
            value = float(value)
        out.append((key, value))
    return out


def apply_overrides(data: dict, overrides: list[tuple[str, Any]]) -> dict:
    """A copy of `data` with each dotted key set (intermediate mappings are created)."""
    data = copy.deepcopy(data)
    for key, value in overrides:
        parts = key.split(".")
        node = data
        for j, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"--{key}: '{'.'.join(parts[: j + 1])}' is {child!r}, not a mapping")
            node = child
        node[parts[-1]] = value
    return data


def _origin(tp):
    return typing.get_origin(tp)


def _is_optional(tp) -> tuple[bool, Any]:
    if _origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return True, args[0]
    return False, tp


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _convert(value, tp, where: str, hooks: dict):
    if where in hooks:  # a field whose dataclass depends on another value (e.g. the stage's config)
        tp = hooks[where]
    optional, inner = _is_optional(tp)
    if value is None:
        if optional or tp is Any:
            return None
        raise ConfigError(f"{where}: may not be null (expected {_type_name(inner)})")
    tp = inner
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if dataclasses.is_dataclass(value):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, where, hooks)
    origin = _origin(tp)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)[:1] or (Any,)
        return [_convert(v, item, f"{where}[{i}]", hooks) for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if origin in (Union, types.UnionType):  # e.g. int | str: the first type that takes it
        for option in typing.get_args(tp):
            try:
                return _convert(value, option, where, hooks)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: {value!r} fits none of {typing.get_args(tp)}")
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def _build(cls, data: dict, prefix: str, hooks: dict):
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    spill = next((name for name, f in fields.items() if f.metadata.get("flatten")), None)
    if unknown and spill is not None:
        # A field marked `metadata={"flatten": True}` (a dict) takes the keys no other field has,
        # and the class' __post_init__ checks them (e.g. TrainerConfig.options: any Trainer argument).
        # `plain_config` writes its items back beside the other fields, so a dump loads back the same.
        given = data.get(spill)
        if given is not None and not isinstance(given, dict):
            raise ConfigError(f"{prefix + '.' if prefix else ''}{spill}: expected a mapping, got {given!r}")
        data = {**{k: v for k, v in data.items() if k not in unknown},
                spill: {**(given or {}), **{k: v for k, v in data.items() if k in unknown}}}
        unknown = []
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"unknown key(s) {', '.join(where + k for k in unknown)}; "
                          f"{prefix or 'the top level'} takes: {', '.join(fields)}")
    kwargs = {}
    for name, value in data.items():
        where = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _convert(value, hints[name], where, hooks)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{prefix or cls.__name__}: {e}") from None


def build(cls, data: dict, hooks: dict | None = None, source: str | None = None):
    """An instance of dataclass `cls` from nested dict `data` (keys checked, values typed).

    `hooks` maps dotted keys to the dataclass that key takes (overriding the annotation).
    `source` (a file name) prefixes every error message.
    """
    try:
        return _build(cls, data, "", hooks or {})
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}" if source else str(e)) from None


def dump_yaml(data: dict) -> str:
    """YAML text of a plain nested dict, keys in the order given."""
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False, width=100)


def field_help(cls, prefix: str = "") -> list[tuple[str, str, str]]:
    """`(dotted key, default, comment)` for every field of `cls`, nested dataclasses flattened.

    The comment is the `# ...` note after the field in the dataclass' source, when there is one.
    """
    import inspect

    comments: dict[str, str] = {}
    try:
        for line in inspect.getsource(cls).splitlines():
            m = re.match(r"\s+(\w+)\s*:[^#]*#\s*(.*)$", line)
            if m:
                comments[m.group(1)] = m.group(2).strip()
    except (OSError, TypeError):
        pass
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        _, inner = _is_optional(hints[f.name])
        if dataclasses.is_dataclass(inner) and f.default is not None:
            rows.extend(field_help(inner, f"{key}."))
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = "(required)"
        rows.append((key, repr(default), comments.get(f.name, "")))
    return rows
