"""Token cache (one flat memory-mapped array per split) and the windows cut from it.

A split's token stream is `EOT doc1 EOT doc2 ... EOT docN`: every document is preceded by the end-of-text token,
so even the first text token has a context and is scored, and the model learns document boundaries. It is built
once with `datasets.map(batched=True, num_proc=data.num_proc)` and stored as `<cache>/<source>/<split>-<key>.bin`
(uint16 when the vocab fits, else uint32) plus a `.json` with counts and the sha256 of the `.bin`. The key hashes
(cache format, source, the split's files and their sha256 or hub id + revision, the tokenizer's serialisation),
so a changed input or tokenizer gets a new cache; a `.bin` whose size or sha256 disagrees with its `.json` is
rebuilt, never used. The `.json` is written last, so an interrupted build leaves nothing that looks complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm.auto import tqdm

from pha_lab.data.batch import IGNORE_INDEX
from pha_lab.data.corpora import cache_root, recipe, splits
from pha_lab.data.split_source import SplitSource
from pha_lab.data.tokenizer import Tokenizer, save_tokenizer_copy
from pha_lab.errors import DataError

if TYPE_CHECKING:
    from omegaconf import DictConfig

log = logging.getLogger(__name__)
CACHE_FORMAT = 1


@dataclass
class TokenSplit:
    """A cached split: `tokens` is a read-only memmap, opened lazily (and not pickled: workers reopen it)."""

    bin_path: Path
    meta: dict[str, Any]

    @property
    def n_tokens(self) -> int:
        return int(self.meta["n_tokens"])

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.meta["dtype"])

    @cached_property
    def tokens(self) -> np.ndarray:
        return np.memmap(self.bin_path, dtype=self.dtype, mode="r", shape=(self.n_tokens,))

    def __getstate__(self) -> dict:
        return {"bin_path": self.bin_path, "meta": self.meta}

    def documents(self) -> Documents:
        """Where each document lies in the stream, read from its `<|endoftext|>` tokens (every document is
        preceded by one), checked against the document count the cache recorded. A document whose text holds
        the literal string `<|endoftext|>` (encoded as that token) would split in two: refused, naming the counts."""
        starts = np.flatnonzero(self.tokens == int(self.meta["eot_id"]))
        n_docs = int(self.meta["n_docs"])
        if len(starts) != n_docs or (n_docs and starts[0] != 0):
            raise DataError(
                f"{self.bin_path}: the stream holds {len(starts)} end-of-text tokens but the cache recorded {n_docs} "
                f"documents, so the document boundaries cannot be read from it (a document contains the text "
                f"'<|endoftext|>'?); remove that text from the source files"
            )
        lengths = np.diff(np.append(starts, self.n_tokens)) - 1
        fp = self.meta.get("material", {}).get("split", {})
        files = fp.get("files") or []
        names = tuple(f[0] for f in files) if fp.get("documents") == "file" and len(files) == n_docs else None
        return Documents(starts.astype(np.int64), lengths.astype(np.int64), names)


@dataclass(frozen=True)
class Documents:
    """A split's documents in its stream: document k's `<|endoftext|>` is at `starts[k]` and its `lengths[k]`
    text tokens follow it. `names`: the source file of each (one document per file), else None."""

    starts: np.ndarray
    lengths: np.ndarray
    names: tuple[str, ...] | None

    def name(self, k: int) -> str:
        return self.names[k] if self.names else f"document {k}"


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def cache_key(source: SplitSource, tok: Tokenizer, d: DictConfig) -> tuple[str, dict]:
    """The content key: the split's files (sha256) or hub id + revision, and the tokenizer's serialisation."""
    material = {
        "format": CACHE_FORMAT,
        "source": d.source,
        "split": source.fingerprint(cache_root(d)),
        "tokenizer": tok.fingerprint,
    }
    return _hash(material), material


def recipe_key(d: DictConfig, split: str, tok: Tokenizer) -> str:
    """The config-level key recorded in every cache, to find a prebuilt cache when the sources are absent."""
    return _hash({"format": CACHE_FORMAT, "recipe": recipe(d, split), "tokenizer": tok.fingerprint})


def token_split(source: SplitSource, tok: Tokenizer, d: DictConfig) -> TokenSplit:
    """The split's cached tokens, building the cache if it is missing, stale or damaged."""
    key, material = cache_key(source, tok, d)
    base = cache_root(d) / d.source / f"{source.split}-{key}"
    return _open(base) or _build(source, tok, d, base, key, material, recipe_key(d, source.split, tok))


def load_split(d: DictConfig, split: str, tok: Tokenizer) -> TokenSplit:
    """`token_split` of the configured source; where its files are absent (a machine that received only the
    cache), the newest intact cache built with the same recipe and tokenizer, with a warning."""
    try:
        source = splits(d)[split]
        cache_key(source, tok, d)  # raises if the sources cannot be read
    except DataError as exc:
        folder = cache_root(d) / d.source
        rk = recipe_key(d, split, tok)
        metas = []
        for path in folder.glob(f"{split}-*.json"):
            try:
                if json.loads(path.read_text()).get("recipe") == rk:
                    metas.append(path)
            except (OSError, ValueError):
                continue
        for path in sorted(metas, key=lambda p: p.stat().st_mtime, reverse=True):
            found = _open(path.with_suffix(""))
            if found is not None:
                log.warning("%s; using the prebuilt token cache %s (%s)", exc, found.bin_path, found.meta["source"])
                return found
        raise DataError(f"{exc} (and {folder} holds no prebuilt token cache of this {split} split)") from None
    return token_split(source, tok, d)


def _open(base: Path) -> TokenSplit | None:
    meta_path, bin_path = base.with_suffix(".json"), base.with_suffix(".bin")
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        problem = None
        if meta.get("format") != CACHE_FORMAT:
            problem = f"of format {meta.get('format')}, not {CACHE_FORMAT}"
        elif not bin_path.is_file():
            problem = "missing"
        elif bin_path.stat().st_size != meta["n_tokens"] * np.dtype(meta["dtype"]).itemsize:
            problem = f"truncated ({bin_path.stat().st_size} bytes, expected {meta['n_tokens']} x {meta['dtype']})"
        else:
            with open(bin_path, "rb") as f:
                if hashlib.file_digest(f, "sha256").hexdigest() != meta["sha256"]:
                    problem = "corrupted (sha256 differs from its .json)"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        problem = f"unreadable ({exc})"
    if problem:
        log.warning("token cache %s is %s: rebuilding it", bin_path, problem)
        return None
    log.info("token cache hit: %s (%d tokens)", bin_path, meta["n_tokens"])
    return TokenSplit(bin_path, meta)


@contextmanager
def _tokenizers_parallelism(num_proc: int) -> Iterator[None]:
    """With worker processes, switch off the tokenizers' thread pool (forked children would warn and drop it
    anyway); with one process, leave it on so encode_batch_fast uses every core. Afterwards the process's own
    `os.environ` is put back: datasets' map(num_proc > 1) leaves a deep copy in its place, which later changes
    to the environment (monkeypatch's undo included) would update instead of the real one."""
    environ, before = os.environ, os.environ.get("TOKENIZERS_PARALLELISM")
    if num_proc > 1 and before is None:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        os.environ = environ  # noqa: B003 (puts the original mapping object back, as the docstring says)
        if before is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = before


def _build(
    source: SplitSource, tok: Tokenizer, d: DictConfig, base: Path, key: str, material: dict, recipe_id: str
) -> TokenSplit:
    start = time.time()
    base.parent.mkdir(parents=True, exist_ok=True)
    dtype = np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32
    eot = np.array([tok.eot_id], dtype=np.int32)
    with tempfile.TemporaryDirectory(dir=base.parent, prefix=".tmp-") as tmp:
        docs = source.load(Path(tmp))

        def tokenize(batch: dict[str, list]) -> dict[str, list]:
            ids = tok.encode_docs(batch["text"])
            return {
                "ids": [np.concatenate([eot, x]) for x in ids],
                "n_bytes": [len(t.encode("utf-8")) for t in batch["text"]],
            }

        num_proc = max(1, min(int(d.num_proc), len(docs)))
        with _tokenizers_parallelism(num_proc):
            out = docs.map(
                tokenize,
                batched=True,
                batch_size=8 if source.documents in ("file", "wikitext") else 1000,
                num_proc=num_proc if num_proc > 1 else None,
                remove_columns=docs.column_names,
                cache_file_name=str(Path(tmp) / "ids.arrow"),
                new_fingerprint=key,
                desc=f"Tokenizing {source.dataset} {source.split}",
            )
        n_bytes = int(sum(out["n_bytes"]))
        if n_bytes == 0:
            raise DataError(f"{source.dataset} split '{source.split}' holds no text ({source.describe()})")
        column = out.data.column("ids")
        n_tokens = int(sum(len(c.flatten()) for c in column.chunks))
        tmp_bin = Path(tmp) / "tokens.bin"
        arr = np.memmap(tmp_bin, dtype=dtype, mode="w+", shape=(n_tokens,))
        digest, pos = hashlib.sha256(), 0
        for chunk in tqdm(column.chunks, desc=f"Writing {base.name}.bin", unit="chunk", leave=False):
            values = chunk.flatten().to_numpy().astype(dtype)
            arr[pos : pos + len(values)] = values
            digest.update(values.tobytes())
            pos += len(values)
        arr.flush()
        del arr
        meta = {
            "format": CACHE_FORMAT,
            "key": key,
            "recipe": recipe_id,
            "material": material,
            "dataset": source.dataset,
            "split": source.split,
            "source": source.describe(),
            "tokenizer": tok.name,
            "tokenizer_origin": tok.origin,
            "vocab_size": tok.vocab_size,
            "eot_id": tok.eot_id,
            "dtype": np.dtype(dtype).name,
            "n_tokens": n_tokens,
            "n_docs": len(docs),
            "n_bytes": n_bytes,
            "sha256": digest.hexdigest(),
            "build_seconds": round(time.time() - start, 2),
        }
        save_tokenizer_copy(tok, cache_root(d))
        os.replace(tmp_bin, base.with_suffix(".bin"))
        tmp_meta = Path(tmp) / "meta.json"
        tmp_meta.write_text(json.dumps(meta, indent=1))
        os.replace(tmp_meta, base.with_suffix(".json"))
    log.info("built token cache %s: %d tokens in %.1f s", base.with_suffix(".bin"), n_tokens, time.time() - start)
    return TokenSplit(base.with_suffix(".bin"), meta)


# --------------------------------------------------------------------------- windows
class TrainWindows:
    """Map-style dataset: global sample index i -> a window of seq_len+1 tokens at an offset drawn from
    `default_rng([seed, i])`; input_ids = window[:-1], labels = window[1:]. Stateless, so the data position is a
    function of the step and resuming needs no saved loader state."""

    def __init__(self, split: TokenSplit, seq_len: int, seed: int, name: str = "train") -> None:
        if split.n_tokens < seq_len + 1:
            raise DataError(
                f"the {name} split has {split.n_tokens} tokens, fewer than one training window of data.seq_len+1 = "
                f"{seq_len + 1}; lower data.seq_len or add text"
            )
        self.split, self.seq_len, self.seed = split, int(seq_len), int(seed)
        self.n_starts = split.n_tokens - self.seq_len  # offsets 0 .. n_tokens - seq_len - 1

    def __len__(self) -> int:
        """Disjoint windows in the split: what one "epoch" means for an epoch-based trainer."""
        return self.split.n_tokens // (self.seq_len + 1)

    def offset(self, i: int) -> int:
        return int(np.random.default_rng([self.seed, int(i)]).integers(self.n_starts))

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        o = self.offset(i)
        w = np.asarray(self.split.tokens[o : o + self.seq_len + 1], dtype=np.int64)
        return {"input_ids": w[:-1], "labels": w[1:]}


def eval_windows(n_targets: int, seq_len: int, stride: int) -> np.ndarray:
    """Rows (begin, end, scored_from) covering stream targets 1..n_targets, each scored exactly once.

    Window k reads inputs stream[begin:end] (end - begin <= seq_len) and predicts stream[begin+1:end+1]; only
    targets after `scored_from` (the previous window's end) are scored, as in the HF perplexity guide. Begins
    step by `stride`; the last window stops at n_targets and may be shorter (a partial window)."""
    if not 1 <= stride <= seq_len:
        raise DataError(f"data.eval_stride={stride} must be in 1..data.seq_len ({seq_len})")
    rows, begin, prev = [], 0, 0
    while prev < n_targets:
        end = min(begin + seq_len, n_targets)
        rows.append((begin, end, prev))
        prev, begin = end, begin + stride
    return np.array(rows, dtype=np.int64).reshape(-1, 3)


class EvalWindows:
    """Map-style dataset of `eval_windows`, padded to seq_len (input: EOT, label: IGNORE_INDEX = not scored)."""

    def __init__(self, split: TokenSplit, seq_len: int, stride: int | None, max_tokens: int | None, name: str):
        available = split.n_tokens - 1
        if available < 1:
            raise DataError(f"the {name} split has no token to score")
        if available < seq_len:
            log.warning(
                "the %s split has %d tokens to score, fewer than one window (data.seq_len=%d): it is scored "
                "in one partial window",
                name,
                available,
                seq_len,
            )
        self.split, self.seq_len = split, int(seq_len)
        self.stride = int(stride or seq_len)
        self.n_targets = min(available, int(max_tokens)) if max_tokens else available
        self.rows = eval_windows(self.n_targets, self.seq_len, self.stride)
        self.pad = int(split.meta["eot_id"])

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, k: int) -> dict[str, np.ndarray]:
        begin, end, prev = (int(v) for v in self.rows[k])
        t = np.asarray(self.split.tokens[begin : end + 1], dtype=np.int64)
        inputs = np.full(self.seq_len, self.pad, dtype=np.int64)
        labels = np.full(self.seq_len, IGNORE_INDEX, dtype=np.int64)
        n = end - begin
        inputs[:n] = t[:-1]
        labels[prev - begin : n] = t[prev - begin + 1 :]
        return {"input_ids": inputs, "labels": labels}


def lm_metrics(sum_nll: float, n_tokens: int, n_bytes: int | None) -> dict[str, float]:
    """Token-level loss/PPL and bits per byte from the *summed* NLL (nats) over the scored tokens of a split.
    Sum over batches (partial windows score fewer tokens; a mean of batch means is biased)."""
    loss = sum_nll / n_tokens
    out = {"loss": loss, "ppl": math.exp(loss)}
    if n_bytes:
        out["bpb"] = sum_nll / (n_bytes * math.log(2))
    return out
