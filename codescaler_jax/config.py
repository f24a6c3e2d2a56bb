"""Typed run configs: YAML files and ``--set key.sub=value`` overrides onto nested dataclasses.

Every key has a typed default in a dataclass. Unknown keys and values of the wrong type fail
fast with a ``ConfigError`` naming the dotted key, so a typo in a 50-line YAML file is caught
before any device work starts.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

from codescaler_jax.errors import InputError

T = TypeVar("T")


class ConfigError(InputError):
    """A config key is unknown or its value has the wrong type or range."""


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert ``value`` to type ``tp`` or raise ConfigError naming ``key``."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: {value!r} does not match {tp}")
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not one of {list(allowed)}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, prefix=key + ".")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{key}: expected {len(args)} items, got {len(value)}")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        out = [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if isinstance(value, tp):
        return value
    raise ConfigError(f"{key}: expected {tp}, got {value!r}")


def from_dict(cls: type[T], data: dict[str, Any], *, prefix: str = "") -> T:
    """Build dataclass ``cls`` from a (nested) dict; unknown keys raise ConfigError."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]!s}; "
            f"known keys under {prefix.rstrip('.') or 'the top level'}: {sorted(fields)}"
        )
    kwargs = {name: _coerce(v, hints[name], prefix + name) for name, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        where, msg = prefix.rstrip(".") or cls.__name__, str(e)
        # Range checks already name their dotted key ("train.max_steps must be ...").
        raise ConfigError(msg if msg.startswith(where + ".") else f"{where}: {msg}") from e


def check_at_least(prefix: str, section: Any, **minimum: float) -> None:
    """Raise ``ValueError`` naming ``prefix.key`` for the first field below its minimum (``None``
    values pass: they mean "not set"). For ``__post_init__`` range checks."""
    for key, lo in minimum.items():
        v = getattr(section, key)
        if v is not None and v < lo:
            raise ValueError(f"{prefix}.{key} must be >= {lo}, got {v}")


def check_fraction(prefix: str, section: Any, *keys: str, high: float = 1.0) -> None:
    """Raise ``ValueError`` naming ``prefix.key`` for the first field outside ``[0, high]``."""
    for key in keys:
        v = getattr(section, key)
        if v is not None and not 0.0 <= v <= high:
            raise ValueError(f"{prefix}.{key} must be in [0, {high}], got {v}")


_LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".yaml", ".yml")


def check_input_path(
    key: str, value: str | None, *, need: str = "exists", hint: str = ""
) -> None:
    """Raise ConfigError naming ``key`` when the local path ``value`` is missing.

    ``need``: ``"exists"``, ``"file"`` or ``"dir"``. A value that is not a local path (no file
    suffix, not absolute or relative-with-dots, e.g. a Hugging Face dataset name ``org/name``)
    passes: it is resolved later, by the library that reads it. ``None`` and the built-in names
    (``humaneval``, ``qwen3``) pass too. ``hint`` is appended to the message.
    """
    if value is None or value in ("humaneval", "qwen3"):
        return
    p = Path(value).expanduser()
    if p.exists():
        if need == "file" and not p.is_file():
            raise ConfigError(f"{key}: {value} is not a file")
        if need == "dir" and not p.is_dir():
            raise ConfigError(f"{key}: {value} is not a directory")
        return
    local = (
        need != "exists"
        or value.endswith(_LOCAL_SUFFIXES)
        or value.startswith(("/", "./", "../", "~"))
        or value.count("/") > 1
    )
    if local:
        what = "directory" if need == "dir" else "file"
        raise ConfigError(f"{key}: no such {what}: {value}" + (f" ({hint})" if hint else ""))


def to_dict(cfg: Any) -> dict[str, Any]:
    """Nested plain-dict view of a config dataclass (tuples become lists), for YAML/JSON."""

    def conv(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v

    return conv(cfg)


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"--set {dotted}: {p} is not a section")
        node = nxt
    node[parts[-1]] = value


def parse_override(item: str) -> tuple[str, Any]:
    """Parse ``key.sub=value``; the value is read as YAML (``3``, ``1e-4``, ``true``, ``[1,2]``)."""
    if "=" not in item:
        raise ConfigError(f"--set expects key=value, got {item!r}")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set expects key=value, got {item!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def load_config(
    cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None
) -> T:
    """Load ``cls`` from a YAML file (optional) with ``key.sub=value`` overrides applied on top."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from e
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
        data = loaded
    for item in overrides or []:
        key, value = parse_override(item)
        _set_dotted(data, key, value)
    return from_dict(cls, data)


def apply_overrides(cfg: T, overrides: list[str]) -> T:
    """A copy of config ``cfg`` with ``key.sub=value`` overrides applied (validated anew)."""
    data = to_dict(cfg)
    for item in overrides:
        key, value = parse_override(item)
        _set_dotted(data, key, value)
    return from_dict(type(cfg), data)


def save_config(cfg: Any, path: str | Path) -> None:
    """Write a config dataclass as YAML (what a run directory keeps next to its checkpoints)."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
