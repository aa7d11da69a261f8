"""Typed run configs: dataclasses filled from a JSON/YAML file and ``key=value`` overrides.

Nested dataclasses are addressed with dotted keys (``loss.tau=2``). A list on the command line
is comma-separated (``sizes=tiny,mini``) or a JSON list, whose items may hold commas
(``teachers.dialog_overrides=["train.adam_betas=0.9,0.95"]``). Unknown keys and values
of the wrong type are errors that name the key and the accepted type; each config dataclass
checks conflicting fields in its own ``__post_init__``.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

from conkd_scale.utils.errors import ConfigError

T = TypeVar("T")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert ``value`` (from JSON, or a string from the command line) to type ``tp``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        # a choice literally named "none" (e.g. kg=none) wins over None
        if any(
            typing.get_origin(a) is typing.Literal and value in typing.get_args(a) for a in args
        ):
            return value
        is_none = value is None or (isinstance(value, str) and value.lower() in ("none", "null"))
        if is_none and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: cannot read {value!r} as {tp}")
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not one of {list(allowed)}")
        return value
    if origin in (list, tuple):
        (inner, *_) = typing.get_args(tp) or (Any,)
        if isinstance(value, str) and value.lstrip().startswith("["):
            try:  # a JSON list: its items may hold commas (key=value overrides for a child job)
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{key}: {value!r} is not a JSON list ({e})") from None
        elif isinstance(value, str):
            value = [v for v in value.split(",") if v != ""]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        out = [_coerce(v, inner, key) for v in value]
        return tuple(out) if origin is tuple else out
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
        if f != int(f):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return int(f)
    if tp is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if tp is str:
        if not isinstance(value, str | int | float):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    return value


def _set(obj: Any, dotted: str, value: Any, full: str) -> None:
    head, _, rest = dotted.partition(".")
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    if head not in names:
        raise ConfigError(f"unknown config key {full!r} (valid here: {', '.join(sorted(names))})")
    cur = getattr(obj, head)
    if dataclasses.is_dataclass(cur):
        if rest:
            _set(cur, rest, value, full)
            return
        if not isinstance(value, dict):
            raise ConfigError(f"{full}: expected a mapping of sub-keys, got {value!r}")
        for k, v in value.items():
            _set(cur, k, v, f"{full}.{k}")
        return
    if rest:
        raise ConfigError(f"unknown config key {full!r}: {head!r} has no sub-keys")
    object.__setattr__(obj, head, _coerce(value, hints[head], full))


def _revalidate(obj: Any) -> None:
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            _revalidate(v)
    post = getattr(obj, "__post_init__", None)
    if post is not None:
        post()


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A JSON or YAML mapping from ``path``, with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as e:
        raise ConfigError(f"{path}: cannot parse ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def build_config(
    cls: type[T], config_file: str | Path | None = None, overrides: Sequence[str] = ()
) -> T:
    """``cls()`` updated from ``config_file`` then from ``key=value`` overrides, validated."""
    cfg = cls()
    if config_file is not None:
        for k, v in read_config_file(config_file).items():
            _set(cfg, k, v, k)
    for ov in overrides:
        key, sep, value = ov.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {ov!r} is not of the form key=value")
        _set(cfg, key.strip(), value, key.strip())
    _revalidate(cfg)
    return cfg


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain dict (for ``config.json``)."""
    return dataclasses.asdict(cfg)
