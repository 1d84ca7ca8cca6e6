"""Tokenizers (HF `tokenizers`): GPT-2 BPE from local files or the hub, or a byte-level BPE trained on the train split.

`build_tokenizer(cfg.data)` returns a `Tokenizer`: the `tokenizers.Tokenizer` plus what the data layer needs (a
name for the protocol, the end-of-text id that joins documents, a content hash for cache keys) and `encode_docs`,
which cuts book-length documents into pieces at pre-tokenizer boundaries so `encode_batch_fast` can use all cores
while giving exactly the ids of encoding each document whole (tested).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from pha_lab.data.corpora import cache_root, data_root, recipe, splits
from pha_lab.data.split_source import hub_unreachable
from pha_lab.errors import DataError

if TYPE_CHECKING:
    from omegaconf import DictConfig

log = logging.getLogger(__name__)
EOT = "<|endoftext|>"
BPE_TRAINER_VERSION = 1  # bump when the trained tokenizer's recipe changes (it is part of the cache key)
PIECE_CHARS = 1 << 16
# Safe cut points for the GPT-2 pre-tokenizer regex: before a newline that follows a printable ASCII character, or
# between a newline and " X" (X printable). No regex match can span them and no lookahead sees past them, so the
# pieces encode to exactly the ids of the whole text.
_SAFE_CUT = re.compile(r"(?<=[!-~])(?=\n)|(?<=\n)(?= [!-~])")


def cut_pieces(text: str) -> list[str]:
    """`text` cut at _SAFE_CUT points into pieces of about PIECE_CHARS (valid for the GPT-2 pre-tokenizer only)."""
    out, start = [], 0
    while len(text) - start > PIECE_CHARS:
        m = _SAFE_CUT.search(text, start + PIECE_CHARS)
        if m is None:
            break
        out.append(text[start : m.start()])
        start = m.start()
    out.append(text[start:])
    return out


@dataclass
class Tokenizer:
    """A `tokenizers.Tokenizer` with its protocol name and origin."""

    hf: tokenizers.Tokenizer
    name: str  # protocol name: "gpt2", "bpe2048", or the hub id
    origin: str  # where it came from (file path, hub id, training split)
    eot_id: int = field(init=False)

    def __post_init__(self) -> None:
        eot = self.hf.token_to_id(EOT)
        if eot is None:
            raise DataError(
                f"tokenizer {self.name} ({self.origin}) has no '{EOT}' token, which the data layer uses to join "
                f"documents; add it as a special token or use another tokenizer (data.tokenizer.*)"
            )
        self.eot_id = eot

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    @cached_property
    def fingerprint(self) -> str:
        """sha256 of the serialised tokenizer: any change to vocab, merges or pipeline changes the cache key."""
        return hashlib.sha256(self.hf.to_str().encode()).hexdigest()

    @cached_property
    def _cuttable(self) -> bool:
        spec = json.loads(self.hf.to_str())
        pre = spec.get("pre_tokenizer") or {}
        return pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not spec.get("normalizer")

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Any) -> str:
        return self.hf.decode([int(i) for i in ids])

    @cached_property
    def token_bytes(self) -> np.ndarray:
        """UTF-8 bytes of the text each id stands for (special tokens such as `<|endoftext|>`: 0), so the bytes of
        any set of scored tokens is a sum (bits per byte of a position bucket). Exact for a byte-level BPE (the
        suite's: GPT-2's and the trained ones), where each character of a token's string stands for one byte;
        otherwise the bytes of the id decoded alone, which miscounts tokens that hold part of a character."""
        added, byte_level = self.hf.get_added_tokens_decoder(), self.byte_level
        out = np.zeros(self.vocab_size, dtype=np.int64)
        for i in range(self.vocab_size):
            if i in added:
                out[i] = 0 if added[i].special else len(added[i].content.encode("utf-8"))
            elif byte_level:
                out[i] = len(self.hf.id_to_token(i))
            else:
                out[i] = len(self.hf.decode([i]).encode("utf-8"))
        return out

    @cached_property
    def byte_level(self) -> bool:
        """A byte-level BPE (its decoder maps each character of a token back to one byte): `token_bytes` is exact."""
        return (json.loads(self.hf.to_str()).get("decoder") or {}).get("type") == "ByteLevel"

    def pieces(self, text: str) -> list[str]:
        return cut_pieces(text) if self._cuttable else [text]

    def encode_docs(self, texts: list[str]) -> list[np.ndarray]:
        """Each document's ids (int32), identical to encoding it whole."""
        pieces, owner = [], []
        for i, t in enumerate(texts):
            ps = self.pieces(t)
            pieces.extend(ps)
            owner.extend([i] * len(ps))
        encode = getattr(self.hf, "encode_batch_fast", self.hf.encode_batch)
        encs = encode(pieces, add_special_tokens=False)
        out: list[list[np.ndarray]] = [[] for _ in texts]
        for i, e in zip(owner, encs):
            out[i].append(np.asarray(e.ids, dtype=np.int32))
        return [np.concatenate(parts) if parts else np.zeros(0, np.int32) for parts in out]


# --------------------------------------------------------------------------- loading
def _from_dir(path: Path, name: str) -> Tokenizer:
    """tokenizer.json, or GPT-2's vocab.json + merges.txt (byte-level BPE pipeline), in `path` (or `path` itself)."""
    if path.is_file():
        return Tokenizer(tokenizers.Tokenizer.from_file(str(path)), name, str(path))
    if (path / "tokenizer.json").is_file():
        file = path / "tokenizer.json"
        return Tokenizer(tokenizers.Tokenizer.from_file(str(file)), name, str(file))
    if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
        hf = tokenizers.Tokenizer(models.BPE.from_file(str(path / "vocab.json"), str(path / "merges.txt")))
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        if hf.token_to_id(EOT) is not None:
            hf.add_special_tokens([EOT])
        return Tokenizer(hf, name, f"{path}/vocab.json+merges.txt")
    raise DataError(f"{path} holds neither tokenizer.json nor vocab.json + merges.txt")


def load_tokenizer(d: DictConfig) -> Tokenizer:
    """data.tokenizer.path, else $PHA_TOKENIZER_DIR, else <data root>/gpt2-tokenizer for "gpt2", else the hub."""
    t = d.tokenizer
    for value, key in ((t.path, "data.tokenizer.path"), (os.environ.get("PHA_TOKENIZER_DIR"), "$PHA_TOKENIZER_DIR")):
        if value:
            path = Path(value).expanduser()
            if not path.exists():
                raise DataError(
                    f"{key}={value} does not exist; point it at a folder with tokenizer.json "
                    f"(or vocab.json + merges.txt), or unset it"
                )
            try:
                return _from_dir(path, t.name if path.is_file() else path.name)
            except DataError as exc:
                raise DataError(f"{key}={value}: {exc}") from None
    root = data_root(d)
    local = root / f"{t.name}-tokenizer" if root else None
    if local is not None and local.is_dir():
        return _from_dir(local, t.name)
    why = hub_unreachable()
    if why is None:
        try:
            return Tokenizer(tokenizers.Tokenizer.from_pretrained(t.name), t.name, f"hub:{t.name}")
        except Exception as exc:
            why = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    saved = sorted(_copies_dir(d).glob(f"{_safe(t.name)}-*.json"), key=lambda p: p.stat().st_mtime, reverse=True)
    if saved:  # the copy a token cache build left beside the cache (a machine that received only the cache)
        log.warning("tokenizer '%s': no local files and no hub (%s); using the cached copy %s", t.name, why, saved[0])
        return _from_dir(saved[0], t.name)
    raise DataError(
        f"tokenizer '{t.name}' (data.tokenizer.name): no local copy ({local or 'no data root'}) and the Hugging Face "
        f"hub failed ({why}). Set data.tokenizer.path or $PHA_TOKENIZER_DIR to a folder with tokenizer.json "
        f"(or vocab.json + merges.txt), e.g. ../shared/data/gpt2-tokenizer, or go online"
    )


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


def _copies_dir(d: DictConfig) -> Path:
    return cache_root(d) / "tokenizers"


def save_tokenizer_copy(tok: Tokenizer, cache: Path) -> None:
    """Keep a copy of a loaded tokenizer beside the token caches, so a shipped cache folder is self-contained."""
    if str(cache) in tok.origin:  # a trained BPE already lives there
        return
    path = cache / "tokenizers" / f"{_safe(tok.name)}-{tok.fingerprint[:16]}.json"
    if not path.is_file():
        _atomic_write(path, tok.hf.to_str())


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def trained_bpe(d: DictConfig) -> Tokenizer:
    """A byte-level BPE of data.tokenizer.train_vocab_size tokens trained on the train split, saved in the cache
    directory under a key of (train split files/hub id, vocab size, recipe version); loaded from there when present."""
    vocab = int(d.tokenizer.train_vocab_size)
    cache = cache_root(d)
    folder = cache / d.source
    recipe_id = hashlib.sha256(
        json.dumps({"v": BPE_TRAINER_VERSION, "vocab": vocab, "recipe": recipe(d, "train")}, sort_keys=True).encode()
    ).hexdigest()[:16]
    try:
        train = splits(d)["train"]
        material = {"v": BPE_TRAINER_VERSION, "vocab": vocab, "train": train.fingerprint(cache)}
    except DataError as exc:  # no train files here: a tokenizer trained elsewhere with the same recipe will do
        sidecars = sorted(folder.glob(f"tokenizer-bpe{vocab}-*.recipe"), key=lambda p: p.stat().st_mtime, reverse=True)
        for sidecar in sidecars:
            saved = sidecar.with_suffix(".json")
            if sidecar.read_text().strip() == recipe_id and saved.is_file():
                log.warning("%s; using the trained tokenizer %s", exc, saved)
                hf = tokenizers.Tokenizer.from_file(str(saved))
                return Tokenizer(hf, f"bpe{vocab}", f"trained on {d.source} train (prebuilt); {saved}")
        raise DataError(f"{exc} (and {folder} holds no tokenizer-bpe{vocab} trained with this recipe)") from None
    key = hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:16]
    path = folder / f"tokenizer-bpe{vocab}-{key}.json"
    origin = f"trained on {d.source} train ({train.describe()}); {path}"
    if path.is_file():
        try:
            return Tokenizer(tokenizers.Tokenizer.from_file(str(path)), f"bpe{vocab}", origin)
        except Exception:  # a corrupt file: train again below
            pass
    hf = tokenizers.Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=[EOT], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=True
    )
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".tmp-bpe-") as tmp:
        docs = train.load(Path(tmp))

        def batches() -> Iterator[list[str]]:
            for start in range(0, len(docs), 64):
                for text in docs[start : start + 64]["text"]:
                    yield cut_pieces(text)  # same pre-tokens as the whole text

        hf.train_from_iterator(batches(), trainer=trainer, length=len(docs))
    if hf.get_vocab_size() != vocab:
        raise DataError(
            f"data.tokenizer.train_vocab_size={vocab}: the train split only supports {hf.get_vocab_size()} tokens "
            f"({train.describe()}); lower it or add text"
        )
    _atomic_write(path, hf.to_str())
    _atomic_write(path.with_suffix(".recipe"), recipe_id)
    return Tokenizer(hf, f"bpe{vocab}", origin)


def build_tokenizer(d: DictConfig) -> Tokenizer | None:
    """The tokenizer `cfg.data` asks for; None for MQAR, whose tokens are synthetic ids."""
    if d.source == "mqar":
        return None
    if d.tokenizer.train_vocab_size:
        return trained_bpe(d)
    return load_tokenizer(d)
