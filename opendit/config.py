"""Dataclass configs -> command-line flags, with an optional YAML file (`--config FILE`).

Precedence: dataclass defaults < YAML file < explicit flags. Unknown YAML keys and unknown flags are errors
(the original silently dropped them). A field's help text is its `metadata["help"]`.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A bad flag or config-file entry; the message names it."""


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _parse_bool(v: str) -> bool:
    if v.lower() in ("1", "true", "yes", "y", "on"):
        return True
    if v.lower() in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {v!r}")


def _add_field(parser: argparse.ArgumentParser, f: dataclasses.Field, hints: dict) -> None:
    tp, optional = _unwrap_optional(hints[f.name])
    help_text = f.metadata.get("help", "")
    names = [f"--{f.name}"] + [f"--{a}" for a in f.metadata.get("aliases", ())]
    kw: dict[str, Any] = dict(dest=f.name, default=argparse.SUPPRESS, help=help_text)
    if "choices" in f.metadata:
        kw["choices"] = f.metadata["choices"]
    origin = typing.get_origin(tp)
    if tp is bool:
        if optional:  # tri-state (None = auto): --flag / --flag false
            parser.add_argument(*names, nargs="?", const=True, type=_parse_bool, **kw)
        else:
            parser.add_argument(*names, action=argparse.BooleanOptionalAction, **kw)
    elif origin is tuple:
        args = typing.get_args(tp)
        parser.add_argument(*names, nargs=len(args), type=args[0], metavar=f.name.upper(), **kw)
    elif origin is list:
        (inner,) = typing.get_args(tp)
        parser.add_argument(*names, nargs="+", action="extend", type=inner, **kw)  # repeatable
    else:
        parser.add_argument(*names, type=tp, **kw)


def build_parser(cls: type, prog: str, description: str = "") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description, allow_abbrev=False)
    parser.add_argument("--config", default=None, help="YAML file whose keys are these flags (flags override it)")
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.init and not f.metadata.get("internal"):
            _add_field(parser, f, hints)
    return parser


def _coerce(cls: type, name: str, value: Any, source: str) -> Any:
    tp, optional = _unwrap_optional(typing.get_type_hints(cls)[name])
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{source}: '{name}' may not be null")
    origin = typing.get_origin(tp)
    mapping_ok = any(f.name == name and f.metadata.get("mapping") for f in dataclasses.fields(cls))
    if mapping_ok and isinstance(value, dict):  # a YAML mapping inline where the flag takes a file of one
        return value
    try:
        if origin is tuple:
            return tuple(typing.get_args(tp)[0](v) for v in value)
        if origin is list:
            inner = typing.get_args(tp)[0]
            return [inner(v) for v in (value if isinstance(value, (list, tuple)) else [value])]
        if tp is bool:
            return value if isinstance(value, bool) else _parse_bool(str(value))
        if tp in (int, float, str):
            return tp(value)
    except (TypeError, ValueError, argparse.ArgumentTypeError) as e:
        raise ConfigError(f"{source}: bad value for '{name}': {value!r} ({e})") from None
    return value


def load_yaml(path: str, cls: type) -> dict:
    import yaml

    try:
        with open(path) as fh:
            data = yaml.safe_load(fh) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path} (--config)") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of flag names to values")
    known = {f.name: f for f in dataclasses.fields(cls)}
    out = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name not in known:
            raise ConfigError(f"{path}: unknown key '{key}' (not a flag of this command)")
        out[name] = _coerce(cls, name, value, path)
    return out


def parse_config(cls: type[T], argv: list[str] | None, prog: str, description: str = "") -> T:
    """Build `cls` from defaults, `--config FILE` and flags. Exits with a one-line message on bad flags."""
    parser = build_parser(cls, prog, description)
    ns = parser.parse_args(sys.argv[1:] if argv is None else argv)
    values = {}
    try:
        if ns.config:
            values.update(load_yaml(ns.config, cls))
        values.update({k: _coerce(cls, k, v, f"--{k}") for k, v in vars(ns).items() if k != "config"})
        return cls(**values)
    except (ConfigError, ValueError) as e:
        parser.exit(2, f"{prog}: error: {e}\n")


def save_yaml(cfg: Any, path: str) -> None:
    """Write a config dataclass as YAML that `--config` reads back."""
    import yaml

    data = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        data[f.name] = list(v) if isinstance(v, tuple) else v
    with open(path, "w") as fh:
        yaml.safe_dump(data, fh, sort_keys=False)
