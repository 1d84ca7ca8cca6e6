"""Corpora: one registry of data sources, each a small function from the data config to its splits.

A source returns `{split: SplitSource}`. A `SplitSource` (pha_lab.data.split_source) only *describes* a split (local
files, or a hub dataset id and revision, plus how the files become documents), so the token cache key can be
computed without reading the text or importing `datasets`; `SplitSource.load()` reads the documents when a cache
is built.
Local files always come first (under `data.data_dir`, `$PHA_DATA_DIR` or `../shared/data`); the Hugging Face hub is
the fallback (`data.hub`). Every failure is a `DataError` naming the path, the config key and a fix.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pha_lab import PROJECT_ROOT
from pha_lab.data.mqar import MQARSplit
from pha_lab.data.split_source import SplitSource, seeded_split
from pha_lab.errors import DataError

if TYPE_CHECKING:
    from omegaconf import DictConfig

SPLITS = ("train", "valid", "test")
WIKITEXT_REPO = "Salesforce/wikitext"  # the hub's canonical id of `load_dataset("wikitext", ...)`
OPENWEBTEXT_REPO = "Skylion007/openwebtext"
DEFAULT_FRACTION = {"text": 0.05, "openwebtext": 0.0005}  # openwebtext: nanoGPT's 0.05% validation split

# The novels test split: books taken out of pd-english-novels/train by the rule that made its valid split
# (order all books by sha256 of their source filename; take books until >= 3,000,000 bytes). See docs/data.md.
NOVELS_TEST_BOOKS = (
    "1920_Fitzgerald_FScott_ThisSideofParadise_Novel.txt",
    "1912_sky_island.txt",
    "1848_Bronte_Ann_TheTenantofWildfellHall_Novel.txt",
    "1861_Dickens_Charles_GreatExpectations_Novel.txt",
    "1913_Lawrence_D.H._SonsandLovers_Novel.txt",
)


# --------------------------------------------------------------------------- locations
def data_root(d: DictConfig, required: bool = False) -> Path | None:
    """Local data root: `data.data_dir`, else `$PHA_DATA_DIR`, else `../shared/data` beside the project if present."""
    for value, key in ((d.data_dir, "data.data_dir"), (os.environ.get("PHA_DATA_DIR"), "$PHA_DATA_DIR")):
        if value:
            path = Path(value).expanduser().resolve()
            if not path.is_dir():
                raise DataError(f"{key}={value} is not a directory; point it at the local data root (or unset it)")
            return path
    default = PROJECT_ROOT.parent / "shared" / "data"
    if default.is_dir():
        return default.resolve()
    if required:
        raise DataError(
            f"no local data directory: set data.data_dir or $PHA_DATA_DIR (the default {default} does not exist)"
        )
    return None


def cache_root(d: DictConfig) -> Path:
    """`data.cache_dir`; a relative path is taken from the project root in a source checkout, else from the cwd."""
    path = Path(d.cache_dir).expanduser()
    if not path.is_absolute():
        path = (PROJECT_ROOT if (PROJECT_ROOT / "pyproject.toml").is_file() else Path.cwd()) / path
    return path


# --------------------------------------------------------------------------- path helpers
def _resolve(entry: str, key: str, root: Path | None) -> Path:
    """A configured path: absolute, or relative to the data root, else to the cwd."""
    p = Path(entry).expanduser()
    tried = [p] if p.is_absolute() else ([root / p] if root else []) + [Path.cwd() / p]
    for cand in tried:
        if cand.exists():
            return cand.resolve()
    raise DataError(
        f"{key} entry '{entry}' does not exist (looked at: {', '.join(map(str, tried))}); relative paths are taken "
        f"from the data root (data.data_dir / $PHA_DATA_DIR) or the current directory"
    )


def _expand(entries: list[str], key: str, root: Path | None) -> list[Path]:
    """Files as given; a folder stands for every *.txt below it (sorted), so folders with README/MANIFEST work."""
    out: list[Path] = []
    for entry in entries:
        p = _resolve(str(entry), key, root)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*.txt") if f.is_file() and not f.name.startswith("."))
            if not found:
                raise DataError(f"{key} entry '{entry}' is a folder without *.txt files ({p})")
            out.extend(found)
        else:
            out.append(p)
    return out


def _fraction(d: DictConfig, split: str) -> float:
    value = d[f"{split}_fraction"]
    return DEFAULT_FRACTION.get(d.source, 0.05) if value is None else float(value)


def _hub_allowed(d: DictConfig) -> bool:
    return d.hub != "never"


def _local_allowed(d: DictConfig) -> bool:
    return d.hub != "always"


# --------------------------------------------------------------------------- the sources
def novels(d: DictConfig) -> dict[str, SplitSource]:
    """pd-english-novels: train/valid by book as shipped; test = NOVELS_TEST_BOOKS taken out of train."""
    root = data_root(d, required=True)
    base = root / "pd-english-novels"
    for sub in ("train", "valid"):
        if not (base / sub).is_dir():
            raise DataError(
                f"novels: {base / sub} not found under the data root {root} (data.data_dir / $PHA_DATA_DIR); "
                f"see ../shared/data/pd-english-novels/SOURCE.md to rebuild it"
            )
    test = [base / "train" / name for name in NOVELS_TEST_BOOKS]
    lost = [str(p) for p in test if not p.is_file()]
    if lost:
        raise DataError(f"novels: test books missing from {base / 'train'}: {', '.join(lost)}")
    train = [p for p in sorted((base / "train").glob("*.txt")) if p.name not in NOVELS_TEST_BOOKS]
    files = {"train": train, "valid": sorted((base / "valid").glob("*.txt")), "test": test}
    return {s: SplitSource("novels", s, tuple(files[s]), "file", data_dir=root) for s in SPLITS}


def text(d: DictConfig) -> dict[str, SplitSource]:
    """Any local files or folders. Splits given as data.{valid,test}_files, else carved from data.train_files by
    document with data.split_seed: whole files in `file` mode (before reading), documents in `blank_line` mode."""
    root = data_root(d)
    if not d.train_files:
        raise DataError("data.source=text needs data.train_files (files or folders of *.txt)")
    given = {s: _expand(list(d[f"{s}_files"]), f"data.{s}_files", root) for s in SPLITS}
    seen: dict[Path, str] = {}
    for s, paths in given.items():
        for p in paths:
            if p in seen:
                raise DataError(f"{p} is listed in both data.{seen[p]}_files and data.{s}_files")
            seen[p] = s
    fv = 0.0 if given["valid"] else _fraction(d, "valid")
    ft = 0.0 if given["test"] else _fraction(d, "test")
    carved: dict[str, SplitSource] = {}
    if d.documents == "file":
        idx = seeded_split(len(given["train"]), fv, ft, d.split_seed, "data.train_files")
        for s in SPLITS:
            if s == "train" or not given[s]:
                carved[s] = SplitSource("text", s, tuple(given["train"][i] for i in idx[s]), "file", data_dir=root)
    else:
        for s in SPLITS:
            if s == "train" or not given[s]:
                src = tuple(given["train"])
                carved[s] = SplitSource("text", s, src, d.documents, carve=(d.split_seed, fv, ft), data_dir=root)
    out = {}
    for s in SPLITS:
        if given[s] and s != "train":
            out[s] = SplitSource("text", s, tuple(given[s]), d.documents, data_dir=root)
        elif s == "train" or (fv if s == "valid" else ft) > 0:
            out[s] = carved[s]
    return out


def _wikitext(d: DictConfig, size: str) -> dict[str, SplitSource]:
    """WikiText (raw or tokenized variant): local `wiki.{split}.{raw,tokens}` files, else the hub."""
    raw = d.wikitext_variant == "raw"
    config = f"wikitext-{size}-raw-v1" if raw else f"wikitext-{size}-v1"
    ext = "raw" if raw else "tokens"
    root = data_root(d) if _local_allowed(d) else None
    out = {}
    for split, hub_split in (("train", "train"), ("valid", "validation"), ("test", "test")):
        dirs = [root / "wikitext" / config] if root else []
        if root and raw and split != "train":  # valid/test raw text is identical for WikiText-2 and -103
            dirs.append(root / "wikitext" / "wikitext-raw-v1")
        local = [p / f"wiki.{split}.{ext}" for p in dirs]
        found = next((p for p in local if p.is_file()), None)
        missing = None
        if found is None and not _hub_allowed(d):
            missing = (
                f"{config} {split}: no local file (looked at: {', '.join(map(str, local)) or 'no data root'}) and "
                f"data.hub=never; put wiki.{split}.{ext} there (data.data_dir / $PHA_DATA_DIR) or set data.hub=auto"
            )
        files = (found,) if found else ()
        out[split] = SplitSource(
            config,
            split,
            files,
            "wikitext",
            (WIKITEXT_REPO, config, hub_split),
            d.hub_revision,
            missing=missing,
            data_dir=root,
        )
    return out


def wikitext103(d: DictConfig) -> dict[str, SplitSource]:
    return _wikitext(d, "103")


def wikitext2(d: DictConfig) -> dict[str, SplitSource]:
    return _wikitext(d, "2")


def openwebtext(d: DictConfig) -> dict[str, SplitSource]:
    """OpenWebText: local *.txt (blank-line separated documents) under openwebtext/ or the 100-document
    openwebtext-sample/ (named so in the protocol), else the hub; valid/test are seeded 0.05% carves of train."""
    root = data_root(d) if _local_allowed(d) else None
    carve = (d.split_seed, _fraction(d, "valid"), _fraction(d, "test"))
    for name in ("openwebtext", "openwebtext-sample"):
        folder = root / name if root else None
        if folder and folder.is_dir() and any(folder.glob("*.txt")):
            files = tuple(sorted(folder.glob("*.txt")))
            return {s: SplitSource(name, s, files, "blank_line", carve=carve, data_dir=root) for s in SPLITS}
    missing = None
    if not _hub_allowed(d):
        missing = (
            f"openwebtext: no local openwebtext/ or openwebtext-sample/ folder of *.txt under the data root "
            f"({root}; data.data_dir / $PHA_DATA_DIR) and data.hub=never"
        )
    hub = (OPENWEBTEXT_REPO, None, "train")
    return {
        s: SplitSource("openwebtext", s, (), "file", hub, d.hub_revision, carve=carve, missing=missing) for s in SPLITS
    }


def mqar(d: DictConfig) -> dict[str, Any]:
    """Synthetic multi-query associative recall: generated from the seed, no files (see pha_lab.data.mqar)."""
    q = d.mqar
    n = {"train": q.num_train_examples, "valid": q.num_test_examples, "test": q.num_test_examples}
    return {s: MQARSplit(s, n[s]) for s in SPLITS}


SOURCES: dict[str, Callable[[Any], dict[str, Any]]] = {
    "novels": novels,
    "wikitext103": wikitext103,
    "wikitext2": wikitext2,
    "openwebtext": openwebtext,
    "text": text,
    "mqar": mqar,
}


def splits(d: DictConfig) -> dict[str, Any]:
    """The configured source's splits (only those that exist: a `text` corpus may have no test split)."""
    try:
        fn = SOURCES[d.source]
    except KeyError:
        raise DataError(
            f"data.source='{d.source}' is not a registered source; choose one of: {', '.join(SOURCES)}"
        ) from None
    return fn(d)


def split_names(d: DictConfig) -> tuple[str, ...]:
    """The splits the configured source has, from the config alone (no file access)."""
    if d.source != "text":
        return SPLITS
    has = {s: bool(d[f"{s}_files"]) or _fraction(d, s) > 0 for s in ("valid", "test")}
    return ("train", *(s for s in ("valid", "test") if has[s]))


def recipe(d: DictConfig, split: str) -> dict[str, Any]:
    """What defines a split in config terms, without reading files: the fallback key for a prebuilt token cache
    used where the source files are absent (e.g. a GPU machine that received only the cache)."""
    keys = {
        "novels": (),
        "text": ("train_files", "valid_files", "test_files", "documents", "split_seed"),
        "wikitext103": ("wikitext_variant", "hub_revision"),
        "wikitext2": ("wikitext_variant", "hub_revision"),
        "openwebtext": ("split_seed", "hub_revision"),
    }[d.source]
    out: dict[str, Any] = {"source": d.source, "split": split}
    out.update({k: (list(d[k]) if k.endswith("_files") else d[k]) for k in keys})
    if d.source in ("text", "openwebtext"):
        out["fractions"] = [_fraction(d, "valid"), _fraction(d, "test")]
    if d.source == "novels":
        out["test_books"] = list(NOVELS_TEST_BOOKS)
    return out
