"""The suite's two user-facing error types, in a module that imports nothing.

Every layer raises them (config loading, data sources, the MQAR generator, sweeps, the bench) without
importing another layer for it; `pha_lab.config` re-exports `ConfigError` and `pha_lab.data` re-exports
`DataError`, where users import them.
"""


class ConfigError(ValueError):
    """A configuration problem, with the offending key and a way to fix it in the message."""


class DataError(ConfigError):
    """A data problem (missing file, empty split, unreachable hub), with the path, the config key and a fix."""
