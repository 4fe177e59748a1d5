"""Settings: one frozen dataclass per service, read from flags and `DISTSERVE_*` variables.

Each field's `metadata["help"]` documents it; `add_arguments` turns the dataclass into argparse
flags whose defaults come from the environment (`--kv-cache-bytes` <- `DISTSERVE_KV_CACHE_BYTES`),
and `from_args` builds and validates the frozen settings, naming the setting on any bad value.
`settings_table` renders the same fields as the documentation table.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from typing import Any


def setting(default: Any, help: str, choices: tuple | None = None) -> Any:
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices})


def env_name(field: str) -> str:
    return "DISTSERVE_" + field.upper()


def _type_of(cls, f: dataclasses.Field) -> type:
    hint = typing.get_type_hints(cls)[f.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def _convert(cls, f: dataclasses.Field, raw: Any) -> Any:
    if raw is None or not isinstance(raw, str):
        return raw
    t = _type_of(cls, f)
    if raw == "" and f.default is None:
        return None
    try:
        if t is bool:
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        return t(raw)
    except ValueError:
        raise SystemExit(f"invalid value for {f.name} (--{f.name.replace('_', '-')} / {env_name(f.name)}): {raw!r} is not a {t.__name__}")


def add_arguments(parser: argparse.ArgumentParser, cls) -> None:
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        help_ = f.metadata.get("help", "")
        choices = f.metadata.get("choices")
        if choices:
            help_ += f" (one of: {', '.join(map(str, choices))})"
        help_ += f" [env {env_name(f.name)}; default {f.default!r}]"
        parser.add_argument(flag, dest=f.name, default=None, help=help_)


def from_args(cls, ns: argparse.Namespace | None = None, **overrides):
    """Flags win over environment variables, which win over defaults; then validate."""
    values = {}
    for f in dataclasses.fields(cls):
        raw = overrides.get(f.name)
        if raw is None and ns is not None:
            raw = getattr(ns, f.name, None)
        if raw is None:
            raw = os.environ.get(env_name(f.name))
        if raw is None:
            continue
        value = _convert(cls, f, raw)
        choices = f.metadata.get("choices")
        if choices and value not in choices:
            raise SystemExit(f"invalid value for {f.name}: {value!r}; allowed: {', '.join(map(str, choices))}")
        values[f.name] = value
    try:
        return cls(**values)
    except ValueError as exc:
        raise SystemExit(f"invalid settings for {cls.__name__}: {exc}")


def settings_table(cls) -> str:
    rows = ["| flag | environment | default | meaning |", "|---|---|---|---|"]
    for f in dataclasses.fields(cls):
        choices = f.metadata.get("choices")
        meaning = f.metadata.get("help", "") + (f" (one of: {', '.join(map(str, choices))})" if choices else "")
        rows.append(f"| `--{f.name.replace('_', '-')}` | `{env_name(f.name)}` | `{f.default!r}` | {meaning} |")
    return "\n".join(rows)


def setup_logging(level: str) -> None:
    """The log format of every command and service process; `level` is a name (info, debug, ...)."""
    import logging

    logging.basicConfig(level=getattr(logging, level.upper()), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
