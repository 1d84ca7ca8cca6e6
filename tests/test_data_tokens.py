"""Token cache (hit, invalidation, corruption) and the windows: every eval token scored exactly once."""

import json
import logging
import math
import os
from pathlib import Path

import numpy as np
import pytest

from pha_lab.config import load_config
from pha_lab.data import IGNORE_INDEX, DataError, build_tokenizer, splits, token_split, tokens as tokmod
from pha_lab.data.tokens import EvalWindows, TokenSplit, TrainWindows, eval_windows, lm_metrics


def fake_split(tmp_path: Path, n: int, dtype=np.uint32) -> TokenSplit:
    """A stream whose token at position p is p (so a label names its position); EOT id = n + 1 for padding."""
    path = tmp_path / f"stream{n}.bin"
    np.arange(n, dtype=dtype).tofile(path)
    return TokenSplit(path, {"n_tokens": n, "dtype": np.dtype(dtype).name, "eot_id": n + 1})


@pytest.mark.parametrize(
    "n_tokens, seq_len, stride, cap",
    [
        (1001, 128, 128, None),  # non-overlapping, final partial window of 1000 % 128 = 104 targets
        (1001, 128, 64, None),  # half overlap
        (1001, 128, 100, None),  # stride not dividing anything
        (1001, 128, 1, None),  # sliding window
        (1001, 128, 128, 300),  # capped at data.max_eval_tokens
        (50, 128, 32, None),  # a split shorter than one window
        (257, 128, 128, None),  # exactly two full windows, no partial one
    ],
)
def test_every_eval_token_scored_exactly_once(tmp_path, n_tokens, seq_len, stride, cap):
    ds = EvalWindows(fake_split(tmp_path, n_tokens), seq_len, stride, cap, "valid")
    n_targets = min(n_tokens - 1, cap or n_tokens)
    assert ds.n_targets == n_targets
    scored = []
    for k in range(len(ds)):
        item = ds[k]
        x, y = item["input_ids"], item["labels"]
        assert x.shape == y.shape == (seq_len,) and x.dtype == y.dtype == np.int64
        begin = int(ds.rows[k][0])
        real = x != n_tokens + 1  # not padding
        n_real = int(real.sum())
        assert real[:n_real].all() and (x[:n_real] == np.arange(begin, begin + n_real)).all()  # contiguous stream
        for j in np.flatnonzero(y != IGNORE_INDEX):
            assert y[j] == begin + j + 1  # label = next token
            assert j < n_real
            if begin > 0:  # after the first window, a scored token has >= seq_len - stride + 1 tokens of context
                assert j >= seq_len - stride
            scored.append(int(y[j]))
    assert sorted(scored) == list(range(1, n_targets + 1))  # each target once, nothing else


def test_eval_windows_rows_and_bad_stride():
    rows = eval_windows(300, 128, 128)
    assert rows.tolist() == [[0, 128, 0], [128, 256, 128], [256, 300, 256]]
    with pytest.raises(DataError, match="data.eval_stride=0"):
        eval_windows(300, 128, 0)


def test_train_windows_are_a_function_of_seed_and_index(tmp_path):
    split = fake_split(tmp_path, 5000)
    a, b, c = TrainWindows(split, 64, seed=1), TrainWindows(split, 64, seed=1), TrainWindows(split, 64, seed=2)
    order = [7, 3, 7, 100000, 0]
    got = [a[i] for i in order]
    again = [b[i] for i in reversed(order)][::-1]  # access order does not matter
    for x, y in zip(got, again):
        assert (x["input_ids"] == y["input_ids"]).all()
    for item in got:
        x, y = item["input_ids"], item["labels"]
        assert x.shape == y.shape == (64,) and (y == x + 1).all() and 0 <= x[0] and y[-1] < 5000
    offsets = {a.offset(i) for i in range(200)}
    assert len(offsets) > 150 and max(offsets) <= 5000 - 65
    assert [a.offset(i) for i in range(20)] != [c.offset(i) for i in range(20)]
    with pytest.raises(DataError, match=r"fewer than one training window of data\.seq_len\+1 = 5001"):
        TrainWindows(split, 5000, seed=1)


def corpus(folder: Path, root: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    book = (root / "pd-english-novels/valid/1895_Wells_H.G._TheTimeMachine_Novel.txt").read_text()
    for i in range(4):
        (folder / f"part{i}.txt").write_text(book[i * 8000 : (i + 1) * 8000])
    return folder


def text_cfg(tmp_path: Path, folder: Path, *extra: str):
    return load_config(
        None,
        [
            "data.source=text",
            f"data.train_files=[{folder}]",
            "data.valid_fraction=0",
            "data.test_fraction=0",
            f"data.cache_dir={tmp_path / 'cache'}",
            *extra,
        ],
    ).data


def test_a_parallel_cache_build_leaves_the_process_environment_in_place(tmp_path, monkeypatch, shared_data):
    """datasets' map(num_proc=2) swaps os.environ for a copy; the build puts the real one back, so a variable
    set before it is still removed by monkeypatch (it used to leak $PHA_TOKENIZER_DIR into later tests)."""
    environ = os.environ
    monkeypatch.setenv("PHA_TEST_MARKER", "1")
    d = text_cfg(tmp_path, corpus(tmp_path / "c", shared_data), "data.num_proc=2")
    token_split(splits(d)["train"], build_tokenizer(d), d)
    assert os.environ is environ and "TOKENIZERS_PARALLELISM" not in os.environ
    monkeypatch.undo()
    assert "PHA_TEST_MARKER" not in os.environ


def test_cache_hit_invalidation_and_rebuild(tmp_path, monkeypatch, caplog, shared_data):
    root = shared_data
    folder = corpus(tmp_path / "c", root)
    d = text_cfg(tmp_path, folder)
    tok = build_tokenizer(d)
    first = token_split(splits(d)["train"], tok, d)
    # contents: EOT + document, per file, in order; uint16 for GPT-2; bytes = the files' UTF-8 bytes
    texts = [p.read_text() for p in sorted(folder.glob("*.txt"))]
    want = np.concatenate([[tok.eot_id, *tok.encode(t)] for t in texts])
    assert first.tokens.dtype == np.uint16 and (np.asarray(first.tokens) == want).all()
    assert first.meta["n_bytes"] == sum(len(t.encode()) for t in texts) and first.meta["n_docs"] == 4

    built = []
    real_build = tokmod._build
    monkeypatch.setattr(tokmod, "_build", lambda *a: built.append(a) or real_build(*a))
    hit = token_split(splits(d)["train"], tok, d)
    assert not built and hit.bin_path == first.bin_path  # a hit: nothing rebuilt

    # a corrupted byte is detected by the sha256 and rebuilt; so is a truncated file and a broken .json
    data = bytearray(first.bin_path.read_bytes())
    data[100] ^= 0xFF
    first.bin_path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="pha_lab.data.tokens"):
        fixed = token_split(splits(d)["train"], tok, d)
    assert len(built) == 1 and "corrupted" in caplog.text and (np.asarray(fixed.tokens) == want).all()
    with open(first.bin_path, "r+b") as f:
        f.truncate(1000)
    token_split(splits(d)["train"], tok, d)
    assert len(built) == 2 and "truncated" in caplog.text
    first.bin_path.with_suffix(".json").write_text("{not json")
    token_split(splits(d)["train"], tok, d)
    assert len(built) == 3 and "unreadable" in caplog.text
    assert json.loads(first.bin_path.with_suffix(".json").read_text())["n_tokens"] == len(want)

    # a changed input file, or another tokenizer, gives a new cache entry
    (folder / "part2.txt").write_text(texts[2] + " and more.")
    changed = token_split(splits(d)["train"], tok, d)
    assert len(built) == 4 and changed.bin_path != first.bin_path and changed.n_tokens > first.n_tokens
    d2 = text_cfg(tmp_path, folder, "data.tokenizer.train_vocab_size=300", "model.vocab_size=512")
    other = token_split(splits(d2)["train"], build_tokenizer(d2), d2)
    assert len(built) == 5 and other.bin_path.parent == first.bin_path.parent and other.bin_path != changed.bin_path
    assert other.meta["tokenizer"] == "bpe300" and int(np.asarray(other.tokens).max()) < 300
    assert len(list(first.bin_path.parent.glob("*.bin"))) == 3


def test_capped_eval_bytes_match_the_decoded_text(tmp_path, shared_data):
    root = shared_data
    d = text_cfg(tmp_path, corpus(tmp_path / "c", root))
    tok = build_tokenizer(d)
    ts = token_split(splits(d)["train"], tok, d)
    full = "".join(p.read_text() for p in sorted((tmp_path / "c").glob("*.txt")))
    assert tok.decode(ts.tokens[1:]) == full  # EOT decodes to nothing: bytes of the scored text == file bytes
    assert ts.meta["n_bytes"] == len(full.encode())


def test_lm_metrics():
    m = lm_metrics(sum_nll=2.0 * 1000, n_tokens=1000, n_bytes=4000)
    assert m["loss"] == pytest.approx(2.0) and m["ppl"] == pytest.approx(math.exp(2.0))
    assert m["bpb"] == pytest.approx(2000 / (4000 * math.log(2)))


def test_prebuilt_cache_is_used_where_the_sources_are_absent(tmp_path, monkeypatch, caplog, shared_data):
    """A machine that received only the cache folder (no text, no tokenizer files, no hub) still gets its data."""
    root = shared_data
    corpus(tmp_path / "data" / "books", root)
    monkeypatch.setenv("PHA_TOKENIZER_DIR", str(root / "gpt2-tokenizer"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    base = [
        "data.source=text",
        "data.train_files=[books]",
        f"data.data_dir={tmp_path / 'data'}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "data.valid_fraction=0.25",
        "data.test_fraction=0",
    ]
    bpe = ["data.tokenizer.train_vocab_size=300", "model.vocab_size=512"]
    built = {}
    for name, extra in (("gpt2", []), ("bpe", bpe)):
        d = load_config(None, base + extra).data
        tok = build_tokenizer(d)
        arrays = {s: np.asarray(tokmod.load_split(d, s, tok).tokens) for s in ("train", "valid")}
        built[name] = (tok.fingerprint, arrays)

    (tmp_path / "data" / "books").rename(tmp_path / "elsewhere")  # the sources are gone ...
    monkeypatch.delenv("PHA_TOKENIZER_DIR")  # ... and so is the GPT-2 tokenizer
    with caplog.at_level(logging.WARNING):
        for name, extra in (("gpt2", []), ("bpe", bpe)):
            d = load_config(None, base + extra).data
            tok = build_tokenizer(d)
            assert tok.fingerprint == built[name][0]
            for s in ("train", "valid"):
                assert (np.asarray(tokmod.load_split(d, s, tok).tokens) == built[name][1][s]).all()
    assert "using the prebuilt token cache" in caplog.text and "using the cached copy" in caplog.text
    assert "using the trained tokenizer" in caplog.text
    d = load_config(None, base + bpe + ["data.split_seed=99"]).data  # another recipe: nothing prebuilt matches
    with pytest.raises(DataError, match=r"does not exist.*holds no tokenizer-bpe300 trained with this recipe"):
        build_tokenizer(d)
    d = load_config(None, base + ["data.split_seed=99"]).data
    with pytest.raises(DataError, match=r"does not exist.*holds no prebuilt token cache of this train split"):
        tokmod.load_split(d, "train", build_tokenizer(d))


def test_windows_pickle_without_their_tokens(tmp_path):
    """DataLoader workers (spawn) get the path, not a copy of the array: each reopens the memmap."""
    import pickle

    split = fake_split(tmp_path, 100_000)
    train = TrainWindows(split, 64, seed=1)
    _ = train[0]  # opens the memmap
    blob = pickle.dumps(train)
    assert len(blob) < 10_000
    clone = pickle.loads(blob)
    assert (clone[3]["input_ids"] == train[3]["input_ids"]).all()
