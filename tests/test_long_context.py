"""Long-context evaluation (pha_lab.training.long_context): whole books by position and by evaluation context.

Each book token is scored once, with the context the sliding-window rule gives it (checked token by token against a
naive float64 loop), contexts longer than a book leave it one window, every kind of bucket adds up to the whole, a
one-book split at the training context reproduces the run's own test loss and bits per byte, the run's MLflow
record holds the metrics, CSVs and protocol tags, and a tiny `long_context` sweep (train, then `post_eval`) runs end
to end into the notebook.
"""

from __future__ import annotations

import math

import bodies
import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from pha_lab.cli import main
from pha_lab.config import ConfigError, load_config
from pha_lab.data import DataError
from pha_lab.data.tokens import TokenSplit
from pha_lab.training.long_context import LongContextSpec, buckets, evaluate_long_context, score_books

LENGTHS = [37, 1, 16, 50]  # a one-token book, one of exactly one short window, ...

pytestmark = pytest.mark.usefixtures("one_thread")


def stream_split(tmp_path, lengths, vocab: int, eot: int = 0, seed: int = 0) -> TokenSplit:
    """A split laid out as the token cache lays it out, `EOT book EOT book ...`, of random ids 1..vocab-1."""
    rng = np.random.default_rng(seed)
    parts = [a for n in lengths for a in (np.array([eot]), rng.integers(1, vocab, n))]
    tokens = np.concatenate(parts).astype(np.uint16)
    path = tmp_path / "split.bin"
    tokens.tofile(path)
    files = [[f"book{k}.txt", "sha"] for k in range(len(lengths))]
    return TokenSplit(
        path,
        {
            "n_tokens": len(tokens),
            "dtype": "uint16",
            "eot_id": eot,
            "n_docs": len(lengths),
            "material": {"split": {"documents": "file", "files": files}},
        },
    )


def test_documents_are_read_from_the_stream(tmp_path):
    split = stream_split(tmp_path, [5, 0, 3], vocab=10)
    docs = split.documents()
    assert docs.starts.tolist() == [0, 6, 7] and docs.lengths.tolist() == [5, 0, 3]
    assert docs.names == ("book0.txt", "book1.txt", "book2.txt")
    split.meta["n_docs"] = 2  # e.g. a book holding the text "<|endoftext|>"
    with pytest.raises(DataError, match="3 end-of-text tokens but the cache recorded 2 documents"):
        split.documents()


@pytest.fixture(scope="module")
def model64():
    """A tiny PHA in float64 with large weights, so that its predictions depend strongly on the context."""
    torch.manual_seed(0)
    return bodies.model64(
        "tiny_pha", "model.vocab_size=64", "model.init_std=0.3", "data.tokenizer.train_vocab_size=null"
    )


def naive_nll(model, stream: np.ndarray, start: int, begin: int, p: int) -> float:
    """-log P(stream[start + p] | stream[start + begin : start + p]), one forward, float64."""
    with torch.no_grad():
        logits = model(torch.from_numpy(stream[start + begin : start + p].astype(np.int64))[None])[0, -1]
    return -torch.log_softmax(logits, -1)[int(stream[start + p])].item()


@pytest.mark.parametrize("context, stride", [(16, 16), (16, 6), (16, 1), (64, 64), (64, 40)])
def test_each_book_token_is_scored_once_with_the_right_context(tmp_path, model64, context, stride):
    split = stream_split(tmp_path, LENGTHS, vocab=64)
    docs = split.documents()
    scored = score_books(model64, split, docs, context, stride, batch_tokens=3 * context)  # 3 windows a batch, padded
    assert sorted(zip(scored["book"], scored["position"])) == [(k, j) for k, n in enumerate(LENGTHS) for j in range(n)]
    stream = np.asarray(split.tokens, dtype=np.int64)
    for row in scored.itertuples():
        start, p = docs.starts[row.book], row.position + 1  # the target's index in its book's stream `EOT book`
        begin = max(0, math.ceil((p - context) / stride)) * stride  # the first window that reaches p (docs/data.md §6)
        assert row.target == stream[start + p] and row.window == p - 1 - begin
        assert row.nll == pytest.approx(naive_nll(model64, stream, start, begin, p), rel=1e-10)
        if begin > 0:  # after a book's first window, at least C - S + 1 tokens of context
            assert p - begin >= context - stride + 1
    if context >= max(LENGTHS):  # a book within the context is one window: each token sees its whole prefix
        assert (scored["window"] == scored["position"]).all()
    # the check can fail: one token more or less of context changes the prediction
    late = scored[scored["window"] < scored["position"]]
    if len(late):
        row = next(late.itertuples())
        start, p = docs.starts[row.book], row.position + 1
        assert abs(naive_nll(model64, stream, start, p - 1 - row.window - 1, p) - row.nll) > 1e-6


def test_every_kind_of_bucket_adds_up_to_the_whole(tmp_path, model64):
    split = stream_split(tmp_path, LENGTHS, vocab=64)
    docs = split.documents()
    scored = score_books(model64, split, docs, 16, 16)
    token_bytes = np.arange(64) % 3  # any byte counts: a bucket's bytes are the sum over its tokens
    table = buckets(scored, token_bytes, 16, 16, window_bucket=5, book_bucket=4, names=docs.names)
    whole = table[table["kind"] == "all"].iloc[0]
    assert whole["tokens"] == sum(LENGTHS) and whole["nll_sum"] == pytest.approx(scored["nll"].sum(), rel=1e-13)
    assert whole["bytes"] == token_bytes[scored["target"]].sum()
    for kind in ("window", "position", "book"):
        part = table[table["kind"] == kind]
        assert part["tokens"].sum() == whole["tokens"] and part["bytes"].sum() == whole["bytes"]
        assert part["nll_sum"].sum() == pytest.approx(whole["nll_sum"], rel=1e-12)
    window = table[table["kind"] == "window"]
    assert window[["lo", "hi"]].values.tolist() == [[0, 5], [5, 10], [10, 15], [15, 16]]
    position = table[table["kind"] == "position"]
    assert position[["lo", "hi"]].values.tolist() == [[0, 4], [4, 8], [8, 16], [16, 32], [32, 64]]
    assert position["tokens"].tolist() == [13, 12, 24, 32, 23]  # books 37, 1, 16, 50 cut at 4, 8, 16, 32
    book = table[table["kind"] == "book"].set_index("bucket")
    assert book["tokens"].to_dict() == {f"book{k}.txt": n for k, n in enumerate(LENGTHS)}
    row = table.iloc[3]
    assert row["ppl"] == pytest.approx(math.exp(row["nll_sum"] / row["tokens"]))
    assert row["bpb"] == pytest.approx(row["nll_sum"] / (row["bytes"] * math.log(2)))
    with pytest.raises(ConfigError, match="stride 17 must be in 1..context"):
        score_books(model64, split, docs, 16, 17)


# --------------------------------------------------------------------------- a trained run
@pytest.fixture(scope="module")
def trained(tmp_path_factory, shared_data, empty_mlflow_store):
    """A tiny PHA trained 20 steps; its test split is one book (The Lost World), scored to 4,096 tokens."""
    from pha_lab.training.run import train

    root = tmp_path_factory.mktemp("lc")
    cfg = bodies.run_config(
        root,
        "tiny_pha",
        "trainer.max_steps=20",
        "trainer.val_every_n_steps=20",
        "data.max_eval_tokens=4096",
        store=empty_mlflow_store,
    )
    return train(cfg), root / "runs"


def test_by_position_on_a_trained_run_and_its_mlflow_record(trained, tmp_path):
    result, runs = trained
    where = [f"tracking.runs_dir={runs}"]
    spec = LongContextSpec(contexts=[128, 8192], window_bucket=32, book_bucket=64, max_book_tokens=4096)
    table = evaluate_long_context(result.run_id, where, spec)
    sliding = evaluate_long_context(
        result.run_id,
        where,
        LongContextSpec(contexts=[64], stride=16, window_bucket=32, book_bucket=64, max_book_tokens=4096),
    )
    for frame in (table[table["context"] == 128], table[table["context"] == 8192], sliding):
        whole = frame[frame["kind"] == "all"].iloc[0]
        assert whole["tokens"] == 4096
        for kind in ("window", "position", "book"):
            assert frame.loc[frame["kind"] == kind, "tokens"].sum() == 4096
            assert frame.loc[frame["kind"] == kind, "nll_sum"].sum() == pytest.approx(whole["nll_sum"], rel=1e-12)
    # one book at the training context and stride, first 4,096 tokens: the windows of the run's own test loop
    at_train = table[(table["context"] == 128) & (table["kind"] == "all")].iloc[0]
    assert at_train["loss"] == pytest.approx(result.metrics["test/loss"], rel=1e-5)
    assert at_train["bpb"] == pytest.approx(result.metrics["test/bpb"], rel=1e-5)
    # a context longer than the (scored) book: one window, so the window position is the book position
    long = table[(table["context"] == 8192) & (table["kind"] == "window")]
    assert len(long) == 4096 // 32 and (long["tokens"] == 32).all()
    # stride 16 < C = 64: after the first window only window positions 48..63 are scored
    win = sliding[sliding["kind"] == "window"].set_index("bucket")["tokens"].to_dict()
    assert win == {"0-32": 32, "32-64": 4096 - 32}

    client = mlflow.tracking.MlflowClient(result.tracking_uri)
    run = client.get_run(result.run_id)
    metrics, tags = run.data.metrics, run.data.tags
    for context, frame in ((128, table[table["context"] == 128]), (64, sliding)):
        whole = frame[frame["kind"] == "all"].iloc[0]
        assert metrics[f"longctx/test/C{context}/ppl"] == pytest.approx(whole["ppl"], rel=1e-12)
        assert metrics[f"longctx/test/C{context}/bpb"] == pytest.approx(whole["bpb"], rel=1e-12)
        assert metrics[f"longctx/test/C{context}/tokens"] == 4096
        for row in frame[frame["kind"].isin(["window", "position"])].itertuples():
            assert metrics[f"longctx/test/C{context}/{row.kind}/{row.lo}-{row.hi}/ppl"] == pytest.approx(row.ppl)
        csv = pd.read_csv(client.download_artifacts(result.run_id, f"longctx/test-C{context}.csv", str(tmp_path)))
        assert len(csv) == len(frame) and csv["nll_sum"].tolist() == pytest.approx(frame["nll_sum"].tolist(), rel=1e-12)
        assert set(csv["kind"]) == {"all", "window", "position", "book"} and (csv["tokenizer"] == "bpe2048").all()
    assert tags["longctx.test.C64.stride"] == "16" and tags["longctx.test.C128.stride"] == "128"
    assert tags["longctx.test.C128.books"] == "1912_the_lost_world.txt" and tags["longctx.test.C128.split"] == "test"
    assert tags["longctx.test.C128.tokenizer"] == "bpe2048" and tags["longctx.test.C128.window_bucket"] == "32"
    assert tags["longctx.test.C128.max_book_tokens"] == "4096" and tags["longctx.test.C128.bytes_exact"] == "True"
    assert tags["longctx.test.C8192.books_within_context"] == "1"  # the 4,096 scored tokens fit in 8,192
    assert tags["longctx.test.C128.books_within_context"] == "0"


def test_bad_long_context_requests_are_refused(trained, capsys):
    result, runs = trained
    base = ["eval", result.run_id, f"tracking.runs_dir={runs}"]
    assert main([*base, "--contexts", "128", "--knockout", "gss"]) == 2
    assert "separate evaluations" in capsys.readouterr().err
    assert main([*base, "--contexts", "64,128", "--stride", "100"]) == 2
    assert "--stride=100 exceeds the shortest context 64" in capsys.readouterr().err
    assert main([*base, "--by-position", "--stride", "200"]) == 2  # the training context, 128
    assert "stride 200 exceeds the context 128" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*base, "--contexts", "64,x"])
    assert "expected positive integers separated by commas" in capsys.readouterr().err


def test_token_bytes_add_up_to_the_split_bytes():
    from pha_lab.data import build_datamodule

    datamodule = build_datamodule(load_config("tiny_pha"))
    for split in ("train", "test"):
        ts = datamodule.token_split(split)
        assert datamodule.tokenizer.byte_level
        assert int(datamodule.tokenizer.token_bytes[np.asarray(ts.tokens)].sum()) == ts.meta["n_bytes"]


# --------------------------------------------------------------------------- the sweep, end to end
def test_tiny_long_context_sweep_evaluates_every_trial_and_renders(tmp_path):
    """sweeps/long_context.yaml at the tiny scale: 4 models trained 8 steps at context 64, each evaluated at 64 and
    128 by `post_eval`, then the long_context notebook over that store."""
    from pha_lab.analysis.notebooks import render_notebooks
    from pha_lab.sweep.runner import run_sweep

    spec = {
        "extends": "long_context",
        "name": "lc_tiny",
        "experiment": "tiny_pha",
        "seeds": [0],
        "overrides": {
            "data.seq_len": 64,
            "data.batch_size": 8,
            "trainer.max_steps": 8,
            "trainer.val_every_n_steps": 8,
            "trainer.ckpt_every_n_steps": 8,
            "optim.warmup_steps": 2,
            "data.max_eval_tokens": 1024,
        },
        "grid": {
            "model": {
                "pha": {},
                "transformer": {"experiment": "tiny_transformer"},
                "gss": {"experiment": "tiny_gss"},
                "pha_sparse": {
                    "model.family": "pha_sparse",
                    "model.branches": ["gss", "ffn"],
                    "model.overrides": [{"layers": [1], "branches": ["gss", "attn", "ffn"]}],
                },
            }
        },
        "post_eval": {
            "long_context": {"contexts": [64, 128], "window_bucket": 16, "book_bucket": 64, "max_book_tokens": 1024}
        },
    }
    path = tmp_path / "lc_tiny.yaml"
    path.write_text(yaml.safe_dump(spec))
    runs = tmp_path / "runs"
    summary = run_sweep(str(path), runs_dir=str(runs))
    assert len(summary) == 4 and (summary["state"] == "COMPLETE").all(), summary
    uri = f"sqlite:///{runs / 'mlflow.db'}"
    client = mlflow.tracking.MlflowClient(uri)
    for run_id in summary["mlflow_run_id"]:
        run = client.get_run(run_id)
        assert {f"longctx/test/C{c}/{m}" for c in (64, 128) for m in ("ppl", "bpb")} <= set(run.data.metrics)
        assert run.data.tags["longctx.test.C128.train_context"] == "64"
        assert {a.path for a in client.list_artifacts(run_id, "longctx")} == {
            "longctx/test-C64.csv",
            "longctx/test-C128.csv",
        }
    out = tmp_path / "out"
    assert render_notebooks(uri, out, {"long_context": ["lc_tiny"]}, ["long_context"]) == []
    table = pd.read_csv(out / "long_context-test.csv")
    assert len(table) == 8 and (table["n"] == 1).all()
    assert set(table["model"]) == {"PHA", "attention-sparse PHA", "Transformer", "GSS"}
    for row in table.itertuples():
        assert row.ppl == pytest.approx(client.get_run(row.runs).data.metrics[f"longctx/test/C{row.context}/ppl"])
    position = pd.read_csv(out / "long_context-test-position.csv")
    assert set(position["hi"]) == {64, 128, 256, 512, 1024} and len(position) == 4 * 2 * 5
    for name in ("context", "position", "window"):
        png = out / f"long_context-{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.with_suffix(".pdf").is_file()
    assert "1912_the_lost_world.txt" in (out / "long_context-test.md").read_text()


def test_bad_post_eval_sections_fail_before_any_trial(tmp_path):
    from pha_lab.sweep.spec import load_sweep

    def sweep(experiment, long_context):
        path = tmp_path / "bad.yaml"
        path.write_text(
            yaml.safe_dump(
                {
                    "name": "bad",
                    "experiment": experiment,
                    "grid": {"model": {"a": {}}},
                    "post_eval": {"long_context": long_context},
                }
            )
        )
        return str(path)

    with pytest.raises(ConfigError, match=r"post_eval.long_context.stride=200 exceeds the shortest context 128"):
        load_sweep(sweep("tiny_pha", {"contexts": [128, 256], "stride": 200}))
    with pytest.raises(ConfigError, match="post_eval.long_context.split=train: use valid or test"):
        load_sweep(sweep("tiny_pha", {"split": "train"}))
    with pytest.raises(ConfigError, match="cell model=a,seed=0: the long-context evaluation scores books: an MQAR run"):
        load_sweep(sweep("tiny_mqar", {"contexts": [64]}))
    with pytest.raises(ConfigError, match="stride 200 exceeds the context 128"):  # tiny_pha trains at 128
        load_sweep(sweep("tiny_pha", {"stride": 200}))
    shipped = load_sweep("long_context")
    assert shipped.post_eval.long_context.contexts == [512, 1024, 2048, 4096, 8192, 16384]
    assert {c["experiment"] for c in shipped.cells().values()} == {
        "mini_pha",
        "mini_pha_sparse",
        "mini_transformer",
        "mini_gss",
    }
    assert all(shipped.cell_config(c).data.seq_len == 512 for c in shipped.cells().values())
