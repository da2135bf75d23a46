"""Layered settings for the daemons and gpuctl: defaults < TOML file < GPUORCH_* env < flags.

Each daemon describes its settings as a dataclass; `load_settings` fills it from
the layers and fails with an error that names the bad key and where it came from.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

ENV_PREFIX = "GPUORCH_"

T = TypeVar("T")


class SettingsError(ValueError):
    """A setting is unknown or has a value of the wrong kind."""


def convert(value: Any, kind: Any, where: str) -> Any:
    """Converts a TOML or environment value to a field's declared type."""
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        options = [arg for arg in typing.get_args(kind) if arg is not type(None)]
        if value is None or value == "":
            return None
        return convert(value, options[0], where)
    if origin is list:
        (item_kind,) = typing.get_args(kind)
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if not isinstance(value, list):
            raise SettingsError(f"{where}: expected a list, got {value!r}")
        return [convert(item, item_kind, where) for item in value]
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
            return False
        raise SettingsError(f"{where}: expected true or false, got {value!r}")
    if kind in (int, float):
        if isinstance(value, bool):
            raise SettingsError(f"{where}: expected a number, got {value!r}")
        try:
            converted = kind(value)
        except (TypeError, ValueError):
            raise SettingsError(f"{where}: expected {'an integer' if kind is int else 'a number'}, got {value!r}") from None
        if kind is int and isinstance(value, float) and value != converted:
            raise SettingsError(f"{where}: expected an integer, got {value!r}")
        return converted
    if kind is str:
        if not isinstance(value, str):
            raise SettingsError(f"{where}: expected a string, got {value!r}")
        return value
    if kind is Path:
        return Path(value)
    return value


def load_settings(
    cls: type[T],
    *,
    config_file: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> T:
    """Builds `cls` from its defaults, then the TOML file, then GPUORCH_<FIELD> env vars, then overrides.

    `overrides` holds command-line flags; a value of None means "flag not given".
    """
    hints = typing.get_type_hints(cls)
    fields = {field.name: field for field in dataclasses.fields(cls)}  # type: ignore[arg-type]
    values: dict[str, Any] = {}
    if config_file is not None:
        path = Path(config_file)
        try:
            with path.open("rb") as handle:
                document = tomllib.load(handle)
        except FileNotFoundError:
            raise SettingsError(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as error:
            raise SettingsError(f"config file {path} is not valid TOML: {error}") from None
        for key, value in document.items():
            name = key.replace("-", "_")
            if name not in fields:
                raise SettingsError(f"config file {path}: unknown setting {key!r} (known: {', '.join(sorted(fields))})")
            values[name] = convert(value, hints[name], f"config file {path}: {key}")
    environment = os.environ if env is None else env
    for name in fields:
        variable = ENV_PREFIX + name.upper()
        if variable in environment:
            values[name] = convert(environment[variable], hints[name], f"environment variable {variable}")
    for name, value in (overrides or {}).items():
        if value is not None:
            values[name] = convert(value, hints[name], f"--{name.replace('_', '-')}")
    return cls(**values)


def daemon_settings(cls: type[T], args: argparse.Namespace, program: str) -> T:
    """A daemon's settings from `args.config`, GPUORCH_* and the other flags, validated, with
    logging set up. A bad setting ends the program with one line naming it and exit status 2
    (systemd's units do not restart on 2: a bad config does not fix itself)."""
    from gpuorch.logs import configure_logging

    flags = {key: value for key, value in vars(args).items() if key != "config"}
    try:
        settings = load_settings(cls, config_file=args.config, overrides=flags)
        settings.validate()  # type: ignore[attr-defined]
        configure_logging(settings.log_level, settings.log_format)  # type: ignore[attr-defined]
    except (SettingsError, ValueError) as error:
        print(f"{program}: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    return settings
