"""The suite's user-facing error types, in a leaf module that imports nothing of the suite.

Every layer raises them (config loading, the branch registry, data sources, the MQAR generator, sweeps, the
bench) without importing another layer for it; `pha_lab.config` re-exports `ConfigError` and `pha_lab.data`
re-exports `DataError`, where users import them.
"""

from __future__ import annotations

import difflib
from typing import Any


class ConfigError(ValueError):
    """A configuration problem, with the offending key and a way to fix it in the message."""


class DataError(ConfigError):
    """A data problem (missing file, empty split, unreachable hub), with the path, the config key and a fix."""


def check_choice(key: str, value: Any, valid: tuple[str, ...], prep: str = "for") -> None:
    """ConfigError naming `key`, the nearest valid value and every choice, unless `value` is one of `valid`."""
    if value not in valid:
        near = difflib.get_close_matches(str(value), valid, n=1)
        hint = f" (did you mean '{near[0]}'?)" if near else ""
        raise ConfigError(f"invalid value '{value}' {prep} {key}{hint}; choose one of: {', '.join(valid)}")
