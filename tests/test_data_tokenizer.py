"""Tokenizers: GPT-2 from local files, the loading order, clear errors, exact piece-wise encoding, trained BPE."""

import csv
import shutil
from pathlib import Path

import pytest

from pha_lab.config import load_config
from pha_lab.data import DataError, build_tokenizer, tokenizer as tokmod


def gpt2(**overrides: str):
    return build_tokenizer(load_config(None, [f"data.{k}={v}" for k, v in overrides.items()]).data)


def test_gpt2_local_matches_reference_ids(shared_data):
    tok = gpt2()
    assert tok.name == "gpt2" and tok.vocab_size == 50257 and tok.eot_id == 50256
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.encode("The quick brown fox jumps over the lazy dog.") == [
        464,
        2068,
        7586,
        21831,
        18045,
        625,
        262,
        16931,
        3290,
        13,
    ]
    text = "naïve café — 東京 🙂\n\n  x"
    assert tok.decode(tok.encode(text)) == text


def test_path_env_and_vocab_merges_give_the_same_ids(tmp_path, monkeypatch, shared_data):
    src = shared_data / "gpt2-tokenizer"
    only_bpe = tmp_path / "bpe"
    only_bpe.mkdir()
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(src / name, only_bpe / name)
    text = "It was the best of times,\nit was the worst of times. <|endoftext|> Don't stop!"
    want = gpt2().encode(text)
    assert gpt2(**{"tokenizer.path": str(only_bpe)}).encode(text) == want
    monkeypatch.setenv("PHA_TOKENIZER_DIR", str(only_bpe))
    from_env = gpt2()
    assert from_env.encode(text) == want and "merges.txt" in from_env.origin
    assert from_env.fingerprint != gpt2(**{"tokenizer.path": str(src)}).fingerprint  # different pipelines


def test_missing_tokenizer_path_names_the_key(tmp_path):
    with pytest.raises(DataError, match=r"data\.tokenizer\.path=.*nope.*does not exist"):
        gpt2(**{"tokenizer.path": str(tmp_path / "nope")})
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="neither tokenizer.json nor vocab.json"):
        gpt2(**{"tokenizer.path": str(tmp_path / "empty")})


def test_hub_tokenizer_offline_fails_fast_with_the_fix(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError) as err:
        gpt2(**{"tokenizer.name": "EleutherAI/gpt-neox-20b"})
    msg = str(err.value)
    assert "data.tokenizer.name" in msg and "data.tokenizer.path" in msg and "PHA_TOKENIZER_DIR" in msg
    assert "HF_HUB_OFFLINE" in msg


HARD_TEXT = (
    "AUTHOR'S INTRODUCTION\n\n\n\nMy dog.  \n  Indented line\n = Heading = \n\n = = Sub = = \n'tis 'Twas\n"
    'numbers 12345 67\n\t tab\nend!!\n\n\n \n\nnaïve 東京 🙂\n-- dash\n"quote"\n'
)


def test_pieces_encode_exactly_like_whole_documents(monkeypatch, shared_data):
    root = shared_data
    tok = gpt2()
    book = (root / "pd-english-novels/valid/1895_Wells_H.G._TheTimeMachine_Novel.txt").read_text()
    whole_book = tok.encode(book)
    with open(root / "pd-english-novels/MANIFEST.tsv") as f:
        row = next(r for r in csv.DictReader(f, delimiter="\t") if r["file"].endswith("TheTimeMachine_Novel.txt"))
    assert len(whole_book) == int(row["gpt2_tokens"])
    monkeypatch.setattr(tokmod, "PIECE_CHARS", 7)  # cut as often as the safe points allow
    docs = [book[:20000], HARD_TEXT * 5, "", "x"]
    assert len(tok.pieces(HARD_TEXT * 5)) > 10
    for doc, ids in zip(docs, tok.encode_docs(docs)):
        assert ids.tolist() == tok.encode(doc)


def tiny_corpus(folder: Path, root: Path, n_files: int = 3, chars: int = 30000) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    book = (root / "pd-english-novels/valid/1877_Sewell_Anna_BlackBeauty_Novel.txt").read_text()
    for i in range(n_files):
        (folder / f"doc{i}.txt").write_text(book[i * chars : (i + 1) * chars])
    return folder


def test_trained_bpe_is_cached_keyed_and_deterministic(tmp_path, monkeypatch, shared_data):
    root = shared_data
    corpus = tiny_corpus(tmp_path / "corpus", root)
    args = [
        "data.source=text",
        f"data.train_files=[{corpus}]",
        "data.tokenizer.train_vocab_size=300",
        "model.vocab_size=512",
        "data.valid_fraction=0",
        "data.test_fraction=0",
    ]
    cfg = load_config(None, args + [f"data.cache_dir={tmp_path / 'c1'}"])
    tok = build_tokenizer(cfg.data)
    assert tok.vocab_size == 300 and tok.name == "bpe300" and tok.hf.id_to_token(tok.eot_id) == "<|endoftext|>"
    saved = list((tmp_path / "c1/text").glob("tokenizer-bpe300-*.json"))
    assert len(saved) == 1
    text = "The horse ran.\n\nIt stopped."
    assert tok.decode(tok.encode(text)) == text

    monkeypatch.setattr(tokmod.trainers, "BpeTrainer", None)  # a second build must load, not train
    assert build_tokenizer(cfg.data).fingerprint == tok.fingerprint
    monkeypatch.undo()

    again = build_tokenizer(load_config(None, args + [f"data.cache_dir={tmp_path / 'c2'}"]).data)
    assert again.fingerprint == tok.fingerprint  # same data, fresh cache: the same tokenizer

    (corpus / "doc0.txt").write_text((corpus / "doc0.txt").read_text()[:-500])
    changed = build_tokenizer(cfg.data)
    assert len(list((tmp_path / "c1/text").glob("tokenizer-bpe300-*.json"))) == 2
    assert changed.origin != tok.origin
