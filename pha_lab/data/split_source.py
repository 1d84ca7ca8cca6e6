"""A split's description (`SplitSource`): local files, or a hub dataset id and revision, plus how the files become
documents, so the token cache key is computed without reading the text or importing `datasets`;
`SplitSource.load()` reads the documents through `datasets` when a cache is built. Beside it, what a description
needs: file checksums memoised by size and mtime, the seeded split by document, and the hub fallback with its
offline check. The registry of sources that build these descriptions: pha_lab.data.corpora.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np

from pha_lab.errors import DataError


def hub_unreachable() -> str | None:
    """Why the hub cannot be used right now (offline flag or no DNS), else None; saves datasets' 25 s of retries."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "").lower() in ("1", "true", "yes", "on"):
            return f"{var} is set"
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None  # behind a proxy, local DNS says nothing about reachability
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
    except OSError as exc:
        return f"cannot resolve {host} ({exc})"
    return None


# --------------------------------------------------------------------------- file digests
def file_digests(paths: list[Path], cache: Path) -> list[str]:
    """sha256 of each file, memoised by (size, mtime) in `<cache>/file-digests.json` so warm runs skip re-reading."""
    memo_path = cache / "file-digests.json"
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    out, changed = [], False
    for p in paths:
        st = p.stat()
        stamp = [st.st_size, st.st_mtime_ns]
        hit = memo.get(str(p))
        if hit and hit[:2] == stamp:
            out.append(hit[2])
            continue
        with open(p, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        memo[str(p)] = [*stamp, digest]
        out.append(digest)
        changed = True
    if changed:
        cache.mkdir(parents=True, exist_ok=True)
        tmp = memo_path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(memo))
        os.replace(tmp, memo_path)
    return out


# --------------------------------------------------------------------------- splitting
def seeded_split(n: int, valid_fraction: float, test_fraction: float, seed: int, what: str) -> dict[str, np.ndarray]:
    """Documents 0..n-1 -> train/valid/test index arrays (sorted), by a seeded permutation.

    A positive fraction takes at least one document, so a 7-book corpus still gets a valid and a test book."""
    fractions = {"valid": valid_fraction, "test": test_fraction}
    counts = {s: (max(1, round(f * n)) if f > 0 else 0) for s, f in fractions.items()}
    if n - counts["valid"] - counts["test"] < 1:
        raise DataError(
            f"{what} has {n} document(s): too few to leave one for train after taking {counts['valid']} for valid "
            f"(data.valid_fraction) and {counts['test']} for test (data.test_fraction); add documents or lower the "
            f"fractions"
        )
    perm = np.random.default_rng(seed).permutation(n)
    nv, nt = counts["valid"], counts["test"]
    return {"valid": np.sort(perm[:nv]), "test": np.sort(perm[nv : nv + nt]), "train": np.sort(perm[nv + nt :])}


# --------------------------------------------------------------------------- a split's description
@dataclass(frozen=True)
class SplitSource:
    """Where one split's documents come from. `documents`: file (one per file), blank_line (datasets' paragraphs),
    or wikitext (rows are lines; the split is one document, "\\n\\n".join(rows), as in HF's perplexity guide)."""

    dataset: str  # the protocol name, e.g. "novels", "wikitext-103-raw-v1", "openwebtext-sample"
    split: str
    files: tuple[Path, ...] = ()
    documents: str = "file"
    hub: tuple[str, str | None, str] | None = None  # (repo, config, hub split), used when `files` is empty
    revision: str = "main"
    carve: tuple[int, float, float] | None = None  # (seed, valid_fraction, test_fraction) over loaded documents
    missing: str | None = None  # why the split cannot be loaded (raised on first use)
    data_dir: Path | None = field(default=None, compare=False)

    def check(self) -> None:
        if self.missing:
            raise DataError(self.missing)

    def describe(self) -> str:
        if self.files:
            names = [_rel(p, self.data_dir) for p in self.files]
            shown = ", ".join(names[:3]) + (f", ... ({len(names)} files)" if len(names) > 3 else "")
            return f"local: {shown}"
        repo, config, split = self.hub or ("?", None, "?")
        return f"hub: {repo}{'/' + config if config else ''} split={split} revision={self.revision}"

    def fingerprint(self, cache: Path) -> dict[str, Any]:
        """Everything that determines the split's text: file names + sha256, or the hub id + revision."""
        self.check()
        fp: dict[str, Any] = {"dataset": self.dataset, "split": self.split, "documents": self.documents}
        if self.files:
            fp["files"] = [[p.name, h] for p, h in zip(self.files, file_digests(list(self.files), cache))]
        else:
            fp["hub"] = [*self.hub, self.revision]
        if self.carve:
            fp["carve"] = list(self.carve)
        return fp

    def load(self, tmp_cache: Path):
        """The split's documents as a `datasets.Dataset` with one column, "text" (imports `datasets`)."""
        self.check()
        import datasets  # here, not at the top: importing `datasets` takes ~3 s and only a cache build needs it

        datasets.logging.set_verbosity_error()
        if self.files:
            sample_by = {"file": "document", "blank_line": "paragraph", "wikitext": "line"}[self.documents]
            try:
                ds = datasets.load_dataset(
                    "text",
                    data_files=[str(p) for p in self.files],
                    sample_by=sample_by,
                    keep_linebreaks=True,
                    split="train",
                    cache_dir=str(tmp_cache),
                )
            except Exception as exc:  # typically a file that is not UTF-8 text
                cause = exc.__cause__ or exc
                raise DataError(
                    f"cannot read the {self.dataset} {self.split} files ({self.describe()}): "
                    f"{type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}; the files must be "
                    f"UTF-8 text"
                ) from None
        else:
            ds = _load_hub(*self.hub, revision=self.revision, what=f"{self.dataset} {self.split}")
        if self.documents == "wikitext":  # rows exactly as the hub's (blank line " " -> ""), joined as HF's guide
            rows = [r if r.strip() else "" for r in ds["text"]]
            ds = datasets.Dataset.from_dict({"text": ["\n\n".join(rows)]})
        if self.carve:
            seed, fv, ft = self.carve
            ds = ds.select(seeded_split(len(ds), fv, ft, seed, f"{self.dataset} ({self.describe()})")[self.split])
        if len(ds) == 0:
            raise DataError(f"{self.dataset} split '{self.split}' is empty ({self.describe()}); check the files")
        return ds


def _rel(p: Path, root: Path | None) -> str:
    try:
        return str(p.relative_to(root)) if root else str(p)
    except ValueError:
        return str(p)


def _load_hub(repo: str, config: str | None, split: str, revision: str, what: str):
    import datasets  # start-up time: see SplitSource.load

    why = hub_unreachable()
    if why is None:
        try:
            return datasets.load_dataset(repo, config, split=split, revision=revision)
        except Exception as exc:  # network, missing revision, script-based repo ...
            why = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    raise DataError(
        f"cannot load {what} from the Hugging Face hub ({repo}{'/' + config if config else ''}, split {split}, "
        f"revision {revision}): {why}. Either go online, or put the files under the local data root "
        f"(data.data_dir or $PHA_DATA_DIR; layout in docs/data.md), or use data.source=text with data.train_files. "
        f"(A hub repo that still ships a loading script may need data.hub_revision=refs/convert/parquet.)"
    )
