"""Long-context evaluation: perplexity by position in the window and in the book, and against the evaluation context.

`pha-lab eval RUN_ID --by-position [--contexts 1024,2048,...]`; the protocol is in docs/data.md (section 9):

- Every document (a book) of the split is scored on its own, as the stream `<|endoftext|> book`, cut into the data
  layer's evaluation windows (`eval_windows`, context C, stride S): each text token of the book is scored exactly
  once, no window crosses a book boundary, and with S < C a token scored after a book's first window sees at least
  C - S + 1 tokens. A book of at most C tokens is one window, so each of its tokens sees its whole prefix: a context
  longer than a book changes nothing for that book (the tags count such books). The `<|endoftext|>` between books is
  not scored (the training-time protocol scores it): only book text, whose bytes bits per byte divides by.
- Each scored token lands in one bucket of each kind: `window` (its position in the window, 0-based: it sees that
  many tokens plus one, in buckets of `window_bucket`), `position` (its position in the book, log-spaced buckets
  [0, b), [b, 2b), [2b, 4b), ... with b = `book_bucket`) and `book`. Per bucket: tokens, bytes, NLL sum, loss, PPL and
  bits per byte over the UTF-8 bytes of its tokens (`Tokenizer.token_bytes`); each kind partitions the scored tokens.

Results go to the run's MLflow record: metrics `longctx/{split}/C{C}/{ppl,bpb,loss,tokens}` and
`longctx/{split}/C{C}/{window,position}/{lo}-{hi}/{ppl,bpb}`, one CSV artifact per context with every bucket
(`longctx/{split}-C{C}.csv`), and the protocol as tags `longctx.{split}.C{C}.*`.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from omegaconf import DictConfig

from pha_lab import tracking
from pha_lab.config import ConfigError
from pha_lab.data.batch import IGNORE_INDEX
from pha_lab.data.tokens import Documents, TokenSplit, eval_windows, lm_metrics
from pha_lab.training.evaluate import load_module, locate

KINDS = ("all", "window", "position", "book")
MAX_TAG = 5000  # characters of a tag value kept (MLflow's limit is 8000)


@dataclass
class LongContextSpec:
    """What the long-context evaluation measures: `pha-lab eval --by-position` flags, and a sweep's
    `post_eval.long_context` section (pha_lab.sweep.spec)."""

    contexts: list[int] = field(default_factory=list)  # evaluation contexts C; empty: the run's training context
    stride: int | None = None  # S <= every C; None: S = C (non-overlapping windows)
    split: str = "test"  # valid | test
    window_bucket: int = 256  # tokens per position-in-window bucket
    book_bucket: int = 1024  # first position-in-book bucket [0, b); then [b, 2b), [2b, 4b), ...
    max_book_tokens: int | None = None  # score only each book's first N tokens (positions stay exact); None: whole
    batch_tokens: int = 32768  # window tokens per forward pass (batch = max(1, batch_tokens // C))
    ckpt: str = "last"  # last | best

    def check(self, where: str = "--") -> None:
        """Refuse bad values, naming the key (`where`: the flag prefix or the sweep section)."""
        sep = "" if where == "--" else "."
        key = lambda k: f"{where}{sep}{k.replace('_', '-') if where == '--' else k}"  # noqa: E731
        if any(not isinstance(c, int) or c < 1 for c in self.contexts):
            raise ConfigError(f"{key('contexts')}={list(self.contexts)}: contexts must be positive integers")
        for name in ("window_bucket", "book_bucket", "batch_tokens", "stride", "max_book_tokens"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigError(f"{key(name)}={value} must be a positive integer")
        if self.stride is not None and self.contexts and self.stride > min(self.contexts):
            raise ConfigError(
                f"{key('stride')}={self.stride} exceeds the shortest context {min(self.contexts)}: "
                f"a stride must be <= every context"
            )
        if self.split not in ("valid", "test"):
            raise ConfigError(f"{key('split')}={self.split}: use valid or test")
        if self.ckpt not in ("last", "best"):
            raise ConfigError(f"{key('ckpt')}={self.ckpt}: use last or best")

    def contexts_for(self, cfg: DictConfig) -> list[int]:
        """The contexts to score `cfg`'s run at (the training context by default), checked against it."""
        if cfg.data.source == "mqar":
            raise ConfigError("the long-context evaluation scores books: an MQAR run (data.source=mqar) has none")
        contexts = list(self.contexts) or [int(cfg.data.seq_len)]
        if self.stride is not None and self.stride > min(contexts):
            raise ConfigError(
                f"stride {self.stride} exceeds the context {min(contexts)} (the training context when no "
                f"contexts are given): a stride must be <= every context"
            )
        return contexts


# --------------------------------------------------------------------------- scoring
def book_windows(lengths: np.ndarray, context: int, stride: int) -> np.ndarray:
    """Rows (book, begin, end, scored_from) of every window of every book, in the book's own stream coordinates
    (position 0 is its `<|endoftext|>`, targets 1..length): the data layer's `eval_windows` per book."""
    rows = [
        np.column_stack([np.full(len(w), k), w])
        for k, n in enumerate(lengths)
        if n > 0
        for w in [eval_windows(int(n), context, stride)]
    ]
    return np.concatenate(rows).astype(np.int64) if rows else np.zeros((0, 4), np.int64)


def score_books(
    model,
    split: TokenSplit,
    docs: Documents,
    context: int,
    stride: int,
    batch_tokens: int = 32768,
    max_book_tokens: int | None = None,
    bf16: bool = False,
) -> pd.DataFrame:
    """One row per scored token: `book`, `position` (in the book, 0-based), `window` (in its window, 0-based),
    `target` (the token id) and `nll` (float64 nats). `model`: a LanguageModel in eval mode, on its own device,
    scored by the training loss's own path (pha_lab.training.loss.token_nll: the LM head in chunks, fp32 or wider, no
    [B, T, V] logits); windows are batched `batch_tokens // context` at a time, short ones right-padded (the model is
    causal, so padding after a window never reaches it); `bf16`: under bf16 autocast (a CUDA device)."""
    import torch  # start-up time: importing this module loads no torch (LongContextSpec checks, post_eval specs)

    from pha_lab.training.loss import token_nll  # (imports torch)

    if not 1 <= stride <= context:
        raise ConfigError(f"stride {stride} must be in 1..context ({context})")
    lengths = docs.lengths if max_book_tokens is None else np.minimum(docs.lengths, max_book_tokens)
    rows = book_windows(lengths, context, stride)
    device = next(model.parameters()).device
    eot, stream = int(split.meta["eot_id"]), split.tokens
    per_batch = max(1, batch_tokens // context)
    pieces = []
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    with torch.inference_mode(), amp:
        for first in range(0, len(rows), per_batch):
            chunk = rows[first : first + per_batch]
            width = int((chunk[:, 2] - chunk[:, 1]).max())
            inputs = np.full((len(chunk), width), eot, dtype=np.int64)
            targets = np.full((len(chunk), width), IGNORE_INDEX, dtype=np.int64)
            for r, (book, begin, end, scored_from) in enumerate(chunk):
                window = np.asarray(stream[docs.starts[book] + begin : docs.starts[book] + end + 1], dtype=np.int64)
                inputs[r, : end - begin] = window[:-1]
                targets[r, scored_from - begin : end - begin] = window[scored_from - begin + 1 :]
            hidden = model(torch.from_numpy(inputs).to(device), return_hidden=True)
            nll = token_nll(hidden, model.lm_head.weight, torch.from_numpy(targets).to(device)).double().cpu().numpy()
            r, j = np.nonzero(targets != IGNORE_INDEX)
            pieces.append(
                pd.DataFrame(
                    {
                        "book": chunk[r, 0],
                        "position": chunk[r, 1] + j,
                        "window": j,
                        "target": targets[r, j],
                        "nll": nll[r, j],
                    }
                )
            )
    return (
        pd.concat(pieces, ignore_index=True)
        if pieces
        else pd.DataFrame(columns=["book", "position", "window", "target", "nll"])
    )


def position_edges(book_bucket: int, longest: int) -> np.ndarray:
    """[0, b, 2b, 4b, ...], up to the first edge past `longest` (the log-spaced position-in-book buckets)."""
    edges = [0, book_bucket]
    while edges[-1] < longest:
        edges.append(edges[-1] * 2)
    return np.array(edges, dtype=np.int64)


def buckets(
    scored: pd.DataFrame,
    token_bytes: np.ndarray,
    context: int,
    stride: int,
    window_bucket: int,
    book_bucket: int,
    names: tuple[str, ...] | None = None,
) -> pd.DataFrame:
    """Every bucket of the scored tokens: rows (context, stride, kind, bucket, lo, hi, tokens, bytes, nll_sum, loss,
    ppl, bpb); kind `all` (one row), `window` ([lo, hi) in the window), `position` ([lo, hi) in the book), `book`
    ([lo, hi) = its scored positions; bucket = the book's name)."""
    frame = scored.assign(bytes=token_bytes[scored["target"].to_numpy(dtype=np.int64)])
    longest = int(frame["position"].max()) + 1 if len(frame) else 1
    win_lo = frame["window"] // window_bucket * window_bucket
    edges = position_edges(book_bucket, longest)
    pos_idx = np.searchsorted(edges, frame["position"].to_numpy(), side="right") - 1
    keys = {
        "all": pd.DataFrame({"lo": 0, "hi": longest}, index=frame.index),
        "window": pd.DataFrame({"lo": win_lo, "hi": np.minimum(win_lo + window_bucket, context)}),
        "position": pd.DataFrame({"lo": edges[pos_idx], "hi": edges[pos_idx + 1]}, index=frame.index),
        "book": pd.DataFrame(
            {"book": frame["book"], "lo": 0, "hi": frame.groupby("book")["position"].transform("max") + 1}
        ),
    }
    rows = []
    for kind, key in keys.items():
        grouped = frame[["nll", "bytes"]].join(key).groupby(list(key.columns), sort=True)
        for group, g in grouped:
            values = dict(zip(key.columns, group if isinstance(group, tuple) else (group,)))
            label = (
                (names[values["book"]] if names else f"document {values['book']}")
                if kind == "book"
                else "all"
                if kind == "all"
                else f"{values['lo']}-{values['hi']}"
            )
            nll, n, n_bytes = float(g["nll"].sum()), len(g), int(g["bytes"].sum())
            rows.append(
                {
                    "context": context,
                    "stride": stride,
                    "kind": kind,
                    "bucket": label,
                    "lo": int(values["lo"]),
                    "hi": int(values["hi"]),
                    "tokens": n,
                    "bytes": n_bytes,
                    "nll_sum": nll,
                    **lm_metrics(nll, n, n_bytes),
                }
            )
    return pd.DataFrame(
        rows,
        columns=["context", "stride", "kind", "bucket", "lo", "hi", "tokens", "bytes", "nll_sum", "loss", "ppl", "bpb"],
    )


# --------------------------------------------------------------------------- a run
def evaluate_long_context(
    target: str, overrides: list[str] = (), spec: LongContextSpec | None = None, log=print
) -> pd.DataFrame:
    """Score the books of `spec.split` at each context for a run id or a .ckpt path; every bucket of every context
    as one frame (`buckets` rows). With a run id, each context's results are logged to the run as they finish."""
    import torch

    from pha_lab.data import build_datamodule

    spec = spec or LongContextSpec()
    spec.check()
    ckpt, cfg, run_id = locate(target, list(overrides), spec.ckpt)
    contexts = spec.contexts_for(cfg)
    cfg.trainer.compile = False  # every context and partial window is a new shape: eager
    on_gpu = torch.cuda.is_available()
    model = load_module(ckpt, cfg).model.eval().to("cuda" if on_gpu else "cpu")
    datamodule = build_datamodule(cfg)
    split, tok = datamodule.token_split(spec.split), datamodule.tokenizer
    docs = split.documents()
    frames = []
    for context in contexts:
        stride = spec.stride or context
        start = time.perf_counter()
        scored = score_books(model, split, docs, context, stride, spec.batch_tokens, spec.max_book_tokens, bf16=on_gpu)
        table = buckets(scored, tok.token_bytes, context, stride, spec.window_bucket, spec.book_bucket, docs.names)
        whole = table.iloc[0]
        log(
            f"[long context] {spec.split} C={context} stride={stride}: {int(whole.tokens):,} tokens of "
            f"{len(docs.starts)} books, PPL {whole.ppl:.3f}, {whole.bpb:.4f} bits/byte "
            f"({time.perf_counter() - start:.1f} s)"
        )
        if run_id is not None:
            precision = "bf16-mixed" if on_gpu else "32-true"
            protocol = _protocol(spec, cfg, split, docs, tok, ckpt, context, stride, precision)
            _log(cfg, run_id, spec.split, table, protocol)
        frames.append(table)
    return pd.concat(frames, ignore_index=True)


def _protocol(
    spec: LongContextSpec,
    cfg: DictConfig,
    split: TokenSplit,
    docs: Documents,
    tok,
    ckpt,
    context: int,
    stride: int,
    precision: str,
) -> dict[str, Any]:
    scored = docs.lengths if spec.max_book_tokens is None else np.minimum(docs.lengths, spec.max_book_tokens)
    books = "; ".join(docs.name(k) for k in range(len(docs.starts)))
    return {
        "dataset": split.meta["dataset"],
        "split": spec.split,
        "source": split.meta["source"],
        "books": books if len(books) <= MAX_TAG else books[:MAX_TAG] + f" ... ({len(docs.starts)} books)",
        "n_books": len(docs.starts),
        "books_within_context": int((scored <= context).sum()),
        "context": context,
        "stride": stride,
        "train_context": int(cfg.data.seq_len),
        "window_bucket": spec.window_bucket,
        "book_bucket": spec.book_bucket,
        "max_book_tokens": spec.max_book_tokens,
        "tokenizer": tok.name,
        "tokenizer_sha256": tok.fingerprint[:16],
        "bytes_exact": tok.byte_level,
        "eot_scored": False,
        "ckpt": str(ckpt),
        "precision": precision,
        "code_git_sha": tracking.git_info()["git_sha"],
    }


def _log(cfg: DictConfig, run_id: str, split: str, table: pd.DataFrame, protocol: dict[str, Any]) -> None:
    """Metrics, the CSV artifact and the protocol tags of one context, on the run."""
    from mlflow.entities import Metric, RunTag

    from pha_lab.training.run import checkpoint_dir

    client = tracking.client(tracking.tracking_uri(cfg.tracking))
    prefix = f"longctx/{split}/C{protocol['context']}"
    now = int(time.time() * 1000)
    whole = table[table["kind"] == "all"].iloc[0]
    metrics = [Metric(f"{prefix}/{m}", float(whole[m]), now, 0) for m in ("ppl", "bpb", "loss", "tokens")]
    for row in table[table["kind"].isin(["window", "position"])].itertuples():
        metrics += [
            Metric(f"{prefix}/{row.kind}/{row.lo}-{row.hi}/{m}", float(getattr(row, m)), now, 0) for m in ("ppl", "bpb")
        ]
    for i in range(0, len(metrics), 1000):  # MLflow takes at most 1000 metrics per batch
        client.log_batch(run_id, metrics=metrics[i : i + 1000])
    tags = [RunTag(f"longctx.{split}.C{protocol['context']}.{k}", str(v)) for k, v in protocol.items()]
    for i in range(0, len(tags), 100):  # and 100 tags
        client.log_batch(run_id, tags=tags[i : i + 100])
    out = checkpoint_dir(cfg, run_id) / "longctx" / f"{split}-C{protocol['context']}.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    described = table.assign(**{k: protocol[k] for k in ("split", "window_bucket", "book_bucket", "tokenizer")})
    described.to_csv(out, index=False)
    client.log_artifact(run_id, str(out), "longctx")
