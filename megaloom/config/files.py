"""Loading a config: defaults, the TOML file, `--set section.key=value` overrides (each coerced to its field's type),
then `model.pretrained` and `peft.init`, then validation; and writing one back as TOML."""

from __future__ import annotations

import dataclasses
import difflib
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

from megaloom.config.checks import validate
from megaloom.config.pretrained import apply_peft_init, apply_pretrained
from megaloom.config.schema import SECTIONS, Config, attr_name, key_name, keys_of, toml_value
from megaloom.errors import ConfigError


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the TOML file, then `section.key=value` overrides, then validation."""
    raw: dict[str, Any] = {}
    if path is not None:
        raw = read_toml(path)
    cfg = Config()
    given: set[str] = set()  # the keys the user set: they must agree with model.pretrained
    for section, values in raw.items():
        if not isinstance(values, dict):
            raise ConfigError(f"{section!r}: expected a [{section}] table, got {values!r}; "
                              f"write it as [{section}] with keys below")
        for key, value in values.items():
            set_value(cfg, f"{section}.{key}", value)
            given.add(f"{section}.{key}")
    for item in overrides or []:
        key, value = parse_override(item)
        set_value(cfg, key, value)
        given.add(key)
    if cfg.model.pretrained:
        apply_pretrained(cfg, given)
    if cfg.peft.init:
        apply_peft_init(cfg)
    validate(cfg)
    return cfg


# Hugging Face module names each family's adapters can target (peft.targets)


def read_toml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file '{path}' does not exist; pass a TOML file such as configs/debug.toml")
    try:
        return tomllib.loads(p.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file '{path}' is not valid TOML: {e}") from None


def parse_override(item: str) -> tuple[str, Any]:
    """`section.key=value`; the value is read as a TOML value, else taken as a plain string."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. --set train.steps=50")
    key, text = item.split("=", 1)
    key = key.strip()
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text
    return key, value


def set_value(cfg: Config, dotted: str, value: Any) -> None:
    section, _, key = dotted.partition(".")
    if section not in SECTIONS:
        raise ConfigError(f"unknown config section {section!r} in {dotted!r}{_suggest(section, SECTIONS)}")
    sub = getattr(cfg, section)
    hints = keys_of(type(sub))
    if key not in hints:
        raise ConfigError(f"unknown config key {dotted!r}{_suggest(key, hints, prefix=section + '.')}")
    setattr(sub, attr_name(key), coerce(dotted, value, hints[key]))


def _suggest(name: str, options: Any, prefix: str = "") -> str:
    close = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    valid = ", ".join(prefix + o for o in options)
    if close:
        return f"; did you mean '{prefix}{close[0]}'?"
    return f"; valid keys: {valid}"


def coerce(key: str, value: Any, typ: Any) -> Any:
    """Check `value` against the field type; ints are accepted for floats, nothing else is converted."""
    origin = typing.get_origin(typ)
    if origin is Literal:
        choices = typing.get_args(typ)
        if value not in choices:
            raise ConfigError(f"{key} = {value!r} is not one of {' | '.join(map(str, choices))}; pick one of those")
        return value
    if origin in (list,):
        (item_type,) = typing.get_args(typ)
        if isinstance(value, str):  # `--set data.sources=path` means a one-element list
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{key} = {value!r} should be a list of {item_type.__name__}, e.g. {key}=[...]")
        return [coerce(f"{key}[{i}]", v, item_type) for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        raise TypeError(f"unsupported config type {typ}")  # not used by any field
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} = {value!r} should be true or false")
    if typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key} = {value!r} should be a whole number")
    if typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key} = {value!r} should be a number")
    if typ is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key} = {value!r} should be a string, e.g. {key}=\"...\"")
    raise TypeError(f"unsupported config type {typ}")


# ---------------------------------------------------------------- validation




def to_dict(cfg: Config) -> dict[str, dict[str, Any]]:
    return {section: {key_name(k): v for k, v in values.items()} for section, values in dataclasses.asdict(cfg).items()}


def to_toml(cfg: Config) -> str:
    """The resolved config as TOML (written into every run directory)."""
    lines: list[str] = []
    for section, values in to_dict(cfg).items():
        lines.append(f"[{section}]")
        lines.extend(f"{k} = {toml_value(v)}" for k, v in values.items())
        lines.append("")
    return "\n".join(lines)




def describe() -> str:
    """Every key with its type, default and help, for `--help-config` and the docs."""
    out = []
    for section, typ in SECTIONS.items():
        out.append(f"[{section}]")
        hints = typing.get_type_hints(typ)
        for f in dataclasses.fields(typ):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            typ_ = hints[f.name]
            if typing.get_origin(typ_) is Literal:
                tname = " | ".join(typing.get_args(typ_))
            else:
                tname = getattr(typ_, "__name__", str(typ_))
            out.append(f"  {section}.{key_name(f.name)} ({tname}, default {toml_value(default)}): {f.metadata['help']}")
    return "\n".join(out)
