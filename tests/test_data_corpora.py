"""Corpora: hub-identical WikiText rows, the 287,644-token check, splits by book/document, and bad input."""

import csv
import hashlib
import os
import time
from pathlib import Path

import numpy as np
import pytest

from pha_lab.config import ConfigError, load_config
from pha_lab.data import DataError, build_tokenizer, splits, token_split
from pha_lab.data.corpora import NOVELS_TEST_BOOKS, seeded_split


def data_cfg(tmp_path: Path, *overrides: str):
    return load_config(None, [f"data.cache_dir={tmp_path / 'cache'}", *overrides]).data


def hub_rows(path: Path) -> list[str]:
    """SOURCE.md's recipe for rows exactly like load_dataset("wikitext", ...)[split]["text"]."""
    return [line if line.strip() else "" for line in open(path, encoding="utf-8").readlines()]


def test_wikitext_raw_test_rows_and_287644_gpt2_tokens(tmp_path, shared_data):
    root = shared_data
    d = data_cfg(tmp_path, "data.source=wikitext2")
    src = splits(d)["test"]
    assert src.files == (root / "wikitext/wikitext-raw-v1/wiki.test.raw",)
    docs = src.load(tmp_path / "hf")
    expected = "\n\n".join(hub_rows(src.files[0]))  # HF perplexity guide: "\n\n".join(test["text"])
    assert len(docs) == 1 and docs[0]["text"] == expected
    ts = token_split(src, build_tokenizer(d), d)
    assert ts.n_tokens == 1 + 287_644  # a leading <|endoftext|>, then the guide's 287,644 tokens
    assert ts.tokens[0] == 50256 and ts.meta["n_bytes"] == len(expected.encode("utf-8"))
    # wikitext103 shares the raw test file but is its own dataset (and cache)
    assert splits(data_cfg(tmp_path, "data.source=wikitext103"))["test"].dataset == "wikitext-103-raw-v1"


def test_wikitext_tokens_variant_and_missing_splits(tmp_path, monkeypatch, shared_data):
    root = shared_data
    d = data_cfg(tmp_path, "data.source=wikitext103", "data.wikitext_variant=tokens", "data.hub=never")
    sp = splits(d)
    assert sp["valid"].files == (root / "wikitext/wikitext-103-v1/wiki.valid.tokens",)
    rows = hub_rows(sp["valid"].files[0])
    assert len(rows) == 3760 and sp["valid"].load(tmp_path / "hf")[0]["text"] == "\n\n".join(rows)
    with pytest.raises(DataError, match=r"wiki\.train\.tokens.*data\.hub=never"):
        sp["train"].fingerprint(tmp_path)
    # the train split is not offline: with the hub allowed but unreachable, say how to use local files
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    train = splits(data_cfg(tmp_path, "data.source=wikitext103"))["train"]
    start = time.time()
    with pytest.raises(DataError) as err:
        train.load(tmp_path / "hf")
    assert time.time() - start < 10
    msg = str(err.value)
    assert "Salesforce/wikitext" in msg and "HF_HUB_OFFLINE" in msg and "data.data_dir" in msg and "PHA_DATA_DIR" in msg


def manifest(root: Path) -> list[dict]:
    with open(root / "pd-english-novels/MANIFEST.tsv") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def test_novels_split_by_book_without_overlap(tmp_path, shared_data):
    root = shared_data
    sp = splits(data_cfg(tmp_path))  # the default source
    names = {s: [p.name for p in sp[s].files] for s in ("train", "valid", "test")}
    assert len(names["valid"]) == 7 and len(names["test"]) == 5 and len(names["train"]) == 268
    sets = {s: set(v) for s, v in names.items()}
    assert not (sets["train"] & sets["valid"] or sets["train"] & sets["test"] or sets["valid"] & sets["test"])
    rows = manifest(root)
    assert sets["train"] | sets["valid"] | sets["test"] == {Path(r["file"]).name for r in rows}
    assert tuple(names["test"]) == NOVELS_TEST_BOOKS
    # the test books follow the rule that made the valid split: books ordered by sha256 of the source filename,
    # taken from train until they reach 3,000,000 bytes
    order = sorted(
        (r for r in rows if r["split"] == "train"),
        key=lambda r: hashlib.sha256(os.path.basename(r["source_path"]).encode()).hexdigest(),
    )
    taken, total = [], 0
    for r in order:
        taken.append(Path(r["file"]).name)
        total += int(r["bytes"])
        if total >= 3_000_000:
            break
    assert tuple(taken) == NOVELS_TEST_BOOKS


def write_docs(folder: Path, n: int, text: str = "Some words here.\n") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = folder / f"d{i:02d}.txt"
        p.write_text(f"Document {i}.\n" + text * (i + 1))
        paths.append(p)
    return paths


def test_text_source_splits_files_by_seed(tmp_path):
    write_docs(tmp_path / "c", 20)
    (tmp_path / "c" / "README.md").write_text("not a document")

    def sp(seed, *extra):
        return splits(
            data_cfg(
                tmp_path,
                "data.source=text",
                f"data.train_files=[{tmp_path / 'c'}]",
                f"data.split_seed={seed}",
                "data.valid_fraction=0.1",
                "data.test_fraction=0.1",
                *extra,
            )
        )

    a, b, c = sp(1), sp(1), sp(2)
    assert [len(a[s].files) for s in ("train", "valid", "test")] == [16, 2, 2]
    assert all(a[s].files == b[s].files for s in a)
    assert a["valid"].files != c["valid"].files
    assert not set(a["train"].files) & (set(a["valid"].files) | set(a["test"].files))
    assert all(p.suffix == ".txt" for s in a for p in a[s].files)
    given = sp(
        1,
        f"data.valid_files=[{tmp_path / 'c' / 'd00.txt'}]",
        f"data.train_files=[{tmp_path / 'c' / 'd01.txt'},{tmp_path / 'c' / 'd02.txt'},{tmp_path / 'c' / 'd03.txt'}]",
        "data.test_fraction=0",
    )
    assert [p.name for p in given["valid"].files] == ["d00.txt"] and "test" not in given
    assert len(given["train"].files) == 3


def test_text_source_blank_line_documents(tmp_path):
    f = tmp_path / "many.txt"
    f.write_text("\n\n".join(f"Doc {i} line one.\nline two." for i in range(40)) + "\n")
    d = data_cfg(
        tmp_path,
        "data.source=text",
        f"data.train_files=[{f}]",
        "data.documents=blank_line",
        "data.valid_fraction=0.1",
        "data.test_fraction=0.05",
    )
    loaded = {s: src.load(tmp_path / "hf")["text"] for s, src in splits(d).items()}
    assert [len(loaded[s]) for s in ("train", "valid", "test")] == [34, 4, 2]
    every = sorted(t.strip() for v in loaded.values() for t in v)
    assert every == sorted(f"Doc {i} line one.\nline two." for i in range(40))


def test_openwebtext_local_sample(tmp_path, shared_data):
    sp = splits(data_cfg(tmp_path, "data.source=openwebtext"))
    assert all(src.dataset == "openwebtext-sample" for src in sp.values())
    docs = {s: src.load(tmp_path / "hf")["text"] for s, src in sp.items()}
    assert len(docs["valid"]) >= 1 and len(docs["test"]) >= 1 and len(docs["train"]) > 100
    assert not set(docs["valid"]) & set(docs["test"])
    assert docs["train"][0].startswith("Port-au-Prince, Haiti (CNN)")


def test_hub_only_source_offline_says_how_to_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    src = splits(data_cfg(tmp_path, "data.source=openwebtext", "data.hub=always"))["valid"]
    with pytest.raises(DataError, match=r"Skylion007/openwebtext.*HF_HUB_OFFLINE.*data\.data_dir"):
        src.load(tmp_path / "hf")


def test_bad_paths_name_the_key(tmp_path):
    with pytest.raises(DataError, match=r"data\.train_files entry '.*missing\.txt' does not exist"):
        splits(data_cfg(tmp_path, "data.source=text", f"data.train_files=[{tmp_path / 'missing.txt'}]"))
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(DataError, match=r"data\.train_files entry .* folder without \*\.txt"):
        splits(data_cfg(tmp_path, "data.source=text", f"data.train_files=[{tmp_path / 'empty_dir'}]"))
    with pytest.raises(DataError, match=r"data\.data_dir=.* is not a directory"):
        splits(data_cfg(tmp_path, f"data.data_dir={tmp_path / 'nowhere'}"))
    with pytest.raises(DataError, match=r"novels: .*pd-english-novels/train not found.*data\.data_dir"):
        splits(data_cfg(tmp_path, f"data.data_dir={tmp_path}"))
    paths = write_docs(tmp_path / "two", 2)
    with pytest.raises(DataError, match=r"both data\.train_files and data\.valid_files"):
        splits(
            data_cfg(
                tmp_path, "data.source=text", f"data.train_files=[{tmp_path / 'two'}]", f"data.valid_files=[{paths[0]}]"
            )
        )
    with pytest.raises(DataError, match=r"has 2 document\(s\): too few .*\(data\.valid_fraction\)"):
        splits(
            data_cfg(
                tmp_path,
                "data.source=text",
                f"data.train_files=[{tmp_path / 'two'}]",
                "data.valid_fraction=0.3",
                "data.test_fraction=0.3",
            )
        )


def test_empty_corpus_is_an_error(tmp_path, shared_data):
    (tmp_path / "e").mkdir()
    for i in range(3):
        (tmp_path / "e" / f"{i}.txt").write_text("")
    d = data_cfg(
        tmp_path,
        "data.source=text",
        f"data.train_files=[{tmp_path / 'e'}]",
        "data.valid_fraction=0",
        "data.test_fraction=0",
    )
    with pytest.raises(DataError, match=r"split 'train' (is empty|holds no text)"):
        token_split(splits(d)["train"], build_tokenizer(d), d)


def test_config_validation_of_data_keys():
    for override, pattern in [
        ("data.documents=lines", r"'lines'.*data\.documents.*file, blank_line"),
        ("data.hub=sometimes", r"'sometimes'.*data\.hub.*auto, never, always"),
        ("data.valid_fraction=1.5", r"data\.valid_fraction=1\.5"),
        ("data.train_files=[x.txt]", r"read only by data\.source=text"),
        ("data.max_eval_tokens=0", r"data\.max_eval_tokens=0 must be >= 1"),
        ("data.tokenizer.train_vocab_size=100", r"train_vocab_size=100 must be >= 258"),
        ("data.tokenizer.train_vocab_size=60000", r"train_vocab_size=60000 exceeds model\.vocab_size=50304"),
    ]:
        with pytest.raises(ConfigError, match=pattern):
            load_config(None, [override])
    with pytest.raises(ConfigError, match=r"data\.source=text needs data\.train_files"):
        load_config(None, ["data.source=text"])


def test_seeded_split_counts():
    parts = seeded_split(7, 0.05, 0.05, seed=3, what="x")
    assert [len(parts[s]) for s in ("train", "valid", "test")] == [5, 1, 1]
    assert sorted(np.concatenate(list(parts.values())).tolist()) == list(range(7))
    assert len(seeded_split(100, 0.0, 0.1, seed=3, what="x")["valid"]) == 0


def test_non_utf8_file_is_a_clear_error(tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1") * 10)
    d = data_cfg(
        tmp_path, "data.source=text", f"data.train_files=[{folder}]", "data.valid_fraction=0", "data.test_fraction=0"
    )
    with pytest.raises(DataError, match=r"cannot read the text train files .*latin1\.txt.*UTF-8"):
        splits(d)["train"].load(tmp_path / "hf")
