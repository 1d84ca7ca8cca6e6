"""The issue's speed target, and exact GPT-2 counts for whole novels splits (slow: minutes on 2 cores)."""

import csv
import time
from pathlib import Path

import pytest

from pha_lab.config import load_config
from pha_lab.data import build_tokenizer, splits, token_split

pytestmark = pytest.mark.slow


def manifest_tokens(root: Path, split: str, exclude: tuple[str, ...] = ()) -> tuple[int, int]:
    with open(root / "pd-english-novels/MANIFEST.tsv") as f:
        rows = [r for r in csv.DictReader(f, delimiter="\t") if r["split"] == split]
    rows = [r for r in rows if Path(r["file"]).name not in exclude]
    return sum(int(r["gpt2_tokens"]) for r in rows), len(rows)


def test_novels_train_cold_under_3_minutes_warm_under_1_second(tmp_path, shared_data):
    from pha_lab.data.corpora import NOVELS_TEST_BOOKS

    d = load_config(None, [f"data.cache_dir={tmp_path}"]).data
    start = time.time()
    tok = build_tokenizer(d)
    ts = token_split(splits(d)["train"], tok, d)
    cold = time.time() - start
    start = time.time()
    warm = token_split(splits(d)["train"], build_tokenizer(d), d)
    warm_s = time.time() - start
    tokens, books = manifest_tokens(shared_data, "train", exclude=NOVELS_TEST_BOOKS)
    assert ts.n_tokens == warm.n_tokens == tokens + books  # each book's GPT-2 tokens, plus one EOT per book
    print(f"\nnovels train: {ts.n_tokens:,} tokens; cold {cold:.1f} s, warm {warm_s:.2f} s")
    assert cold < 180 and warm_s < 1.0


def test_novels_valid_matches_manifest_gpt2_counts(tmp_path, shared_data):
    d = load_config(None, [f"data.cache_dir={tmp_path}"]).data
    ts = token_split(splits(d)["valid"], build_tokenizer(d), d)
    tokens, books = manifest_tokens(shared_data, "valid")
    assert ts.n_tokens == tokens + books and ts.meta["n_bytes"] == 4_588_944
