"""One typed loader for every YAML of the suite: experiments (`Config`, experiments/), sweeps (`SweepSpec`, sweeps/)
and bench specs (`BenchSpec`, bench/) all go through `load_yaml`: a structured (dataclass) schema, `extends:` chains,
`key=value` overrides, and did-you-mean errors naming the file and the key. It knows no schema of its own, so
pha_lab.config, pha_lab.sweep.spec and pha_lab.bench.spec all import it (pha_lab.config re-exports its names).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from pha_lab.errors import ConfigError


def yaml_names(directory: Path) -> list[str]:
    return sorted(p.stem for p in directory.glob("*.yaml"))


def resolve_yaml(name_or_path: str | os.PathLike, directory: Path, kind: str, relative_to: Path | None = None) -> Path:
    """A YAML path, or a bare name looked up in `directory` (`kind` names what is looked for in the error)."""
    raw = str(name_or_path)
    candidates = [Path(raw)]
    if relative_to is not None:
        candidates.insert(0, relative_to / raw)
    if not raw.endswith((".yaml", ".yml")):
        candidates.append(directory / f"{raw}.yaml")
    for path in candidates:
        if path.is_file():
            return path
    names = yaml_names(directory)
    near = difflib.get_close_matches(Path(raw).stem, names, n=3, cutoff=0.4)
    hint = f" Did you mean: {', '.join(near)}?" if near else ""
    raise ConfigError(
        f"unknown {kind} '{raw}': not found (looked for a file and for {directory}/{Path(raw).stem}.yaml).{hint} "
        f"Available: {', '.join(names)}"
    )


def _read_yaml_chain(
    path: Path, directory: Path, kind: str, seen: tuple[Path, ...] = ()
) -> list[tuple[Path, DictConfig]]:
    """The YAML at `path` preceded by the files its `extends:` key names (recursively): a name is looked up
    beside the file, then in `directory`."""
    if path.resolve() in [p.resolve() for p in seen]:
        raise ConfigError(f"'extends' cycle: {' -> '.join(str(p) for p in (*seen, path))}")
    try:
        node = OmegaConf.load(path)
    except Exception as exc:  # yaml syntax errors etc.
        raise ConfigError(f"cannot parse {kind} file {path}: {exc}") from exc
    if not isinstance(node, DictConfig):
        raise ConfigError(f"{kind} file {path} must hold a mapping at top level")
    parent = node.pop("extends", None)
    if parent is None:
        return [(path, node)]
    if not isinstance(parent, str):
        raise ConfigError(f"{path}: extends must name one {kind} (a name or a path), got {parent!r}")
    try:
        parent_path = resolve_yaml(parent, directory, kind, path.parent)
    except ConfigError as exc:
        raise ConfigError(f"{path}: 'extends: {parent}': {exc}") from None
    return [*_read_yaml_chain(parent_path, directory, kind, (*seen, path)), (path, node)]


def _keys_at(cfg: DictConfig, dotted: str) -> list[str]:
    node: Any = cfg
    for part in [p for p in dotted.split(".") if p]:
        if isinstance(node, DictConfig) and part in node:
            node = node[part]
        elif isinstance(node, ListConfig) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return []
    return list(node.keys()) if isinstance(node, DictConfig) else []


def _merge(base: DictConfig, overlay: DictConfig | dict, origin: str) -> DictConfig:
    """OmegaConf.merge with errors rewritten to name the key, its origin and the nearest valid keys."""
    try:
        return OmegaConf.merge(base, overlay)
    except ConfigKeyError as exc:
        full = str(exc.full_key or exc.key)
        parent, _, leaf = full.rpartition(".")
        valid = [k for k in _keys_at(base, parent) if not k.startswith("_")]
        where = f"'{parent}'" if parent else "the top level"
        if (
            dataclasses.is_dataclass(exc.object_type)
            and exc.object_type is not OmegaConf.get_type(base)
            and (not parent or not valid)
        ):
            # a key inside a list entry (model.overrides[i]: OmegaConf reports no path) or below a key with a dot
            # in its name (a sweep's search.optim.lr): name the entry's schema instead of a path
            valid = [f.name for f in dataclasses.fields(exc.object_type)]
            where = getattr(exc.object_type, "_where", f"a {exc.object_type.__name__} entry")
        near = difflib.get_close_matches(leaf, valid, n=3, cutoff=0.5)
        hint = f" Nearest valid keys: {', '.join((parent + '.' if parent else '') + k for k in near)}." if near else ""
        raise ConfigError(
            f"unknown config key '{full}' (from {origin}).{hint} Valid keys under {where}: {', '.join(valid)}"
        ) from None
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "?"
        msg = str(exc).split("\n")[0]
        raise ConfigError(f"bad value for config key '{key}' (from {origin}): {msg}") from None


def load_yaml(
    schema: type | DictConfig,
    name_or_path: str | os.PathLike | None,
    directory: Path,
    kind: str,
    overrides: list[str] | tuple[str, ...] = (),
    sections: dict[str, bool] | None = None,
    replace: tuple[str, ...] = (),
    own: tuple[str, ...] = (),
) -> DictConfig:
    """The dataclass `schema`'s defaults <- the YAML's `extends:` chain, base first <- the YAML's `sections` that are
    switched on <- `key=value` overrides. Every step type-checks against the schema and fails naming the file (or
    the override), the key and the nearest valid keys; a required key (MISSING in the schema) left unset fails too.

    sections: keys holding an optional overlay of the file itself ({"cpu": True}: bench's tiny CPU version); they
        are always taken out of the result, and merged only when switched on.
    replace: mappings whose entries a later file replaces whole rather than merges into (a sweep's grid axes and
        search spaces), keeping the entry's position.
    own: keys that a file which extends another must set itself (a sweep's `name`, which keys its study).
    """
    cfg = schema.copy() if isinstance(schema, DictConfig) else OmegaConf.structured(schema)
    origin = "defaults"
    if name_or_path is not None:
        path = resolve_yaml(name_or_path, directory, kind)
        chain = _read_yaml_chain(path, directory, kind)
        for origin_path, node in chain:
            for key in replace:  # (the schema types these entries Optional)
                entries = node.get(key)
                for entry in entries if isinstance(entries, DictConfig) and cfg[key] is not None else ():
                    if entry in cfg[key]:
                        cfg[key][entry] = None  # then the merge puts the file's entry in its place
            cfg = _merge(cfg, node, str(origin_path))
        missing = [key for key in own if len(chain) > 1 and key not in chain[-1][1]]
        if missing:
            raise ConfigError(
                f"{path} extends {chain[-2][0]} but does not set its own {', '.join(missing)}: set it "
                f"in {path} (an inherited value would make two {kind}s share it)"
            )
        origin = str(path)
    for key, switched_on in (sections or {}).items():
        section = OmegaConf.to_container(cfg[key]) if cfg[key] is not None else None
        cfg[key] = None
        if switched_on and section:
            cfg = _merge(cfg, section, f"{origin}, its {key}: section")
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"overrides must look like key=value, got: {' '.join(bad)}")
    for override in overrides:
        try:
            node = OmegaConf.from_dotlist([override])
        except Exception as exc:
            raise ConfigError(
                f"cannot parse override '{override}' (YAML after '='): {str(exc).splitlines()[0]}"
            ) from None
        cfg = _merge(cfg, node, "command-line overrides")
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"{origin}: missing required key{'s' * (len(missing) > 1)} {', '.join(missing)}")
    return cfg
