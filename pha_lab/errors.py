"""The suite's user-facing error types, in a leaf module that imports nothing of the suite (so that the config
schema, the branch registry and the data layer can all raise them without importing each other)."""

from __future__ import annotations

import difflib
from typing import Any


class ConfigError(ValueError):
    """A configuration problem, with the offending key and a way to fix it in the message."""


def check_choice(key: str, value: Any, valid: tuple[str, ...], prep: str = "for") -> None:
    """ConfigError naming `key`, the nearest valid value and every choice, unless `value` is one of `valid`."""
    if value not in valid:
        near = difflib.get_close_matches(str(value), valid, n=1)
        hint = f" (did you mean '{near[0]}'?)" if near else ""
        raise ConfigError(f"invalid value '{value}' {prep} {key}{hint}; choose one of: {', '.join(valid)}")
