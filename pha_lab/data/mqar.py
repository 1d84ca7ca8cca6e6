"""Multi-query associative recall (MQAR), zoology's `multiquery_ar` definition, generated on the fly from a seed.

Examples are made in chunks of CHUNK from `np.random.default_rng([seed, split, chunk])`, so example i of a split
is a pure function of (config, seed, i): any sample index can be produced without the ones before it, which is
what makes training resumable at a step, and no dataset is held in memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np

from pha_lab.data.batch import IGNORE_INDEX
from pha_lab.errors import DataError

if TYPE_CHECKING:
    from omegaconf import DictConfig

CHUNK = 512
SPLIT_CODE = {"train": 0, "valid": 1, "test": 2}


def check_args(vocab_size: int, seq_len: int, num_kv_pairs: int, power_a: float) -> None:
    """The constraints of `multiquery_ar` (listed in its docstring), as errors naming the config keys."""
    if num_kv_pairs < 1:
        raise DataError(f"data.mqar.num_kv_pairs={num_kv_pairs} must be >= 1")
    if 4 * num_kv_pairs > seq_len:
        raise DataError(
            f"data.mqar.num_kv_pairs={num_kv_pairs} needs data.seq_len >= 4*num_kv_pairs = {4 * num_kv_pairs} "
            f"(got {seq_len}): the keys/values take 2*num_kv_pairs positions and the queries need as many slots again"
        )
    if vocab_size // 2 - 1 < num_kv_pairs:
        raise DataError(
            f"data.mqar.vocab_size={vocab_size} is too small for num_kv_pairs={num_kv_pairs}: keys come from "
            f"1..vocab_size/2-1 and values from vocab_size/2..vocab_size-1, each drawn without replacement"
        )
    if power_a <= 0:
        raise DataError(f"data.mqar.power_a={power_a} must be > 0 (1.0 gives uniform query gaps)")


def check_config(d: DictConfig, model_vocab_size: int) -> None:
    """Every rule on an MQAR data config (`data.mqar.*`, `data.seq_len`): the generator's, the dataset sizes', and
    that the model embeds every token. Config validation calls this; no other place states these rules."""
    q = d.mqar
    if q.vocab_size > model_vocab_size:
        raise DataError(
            f"data.mqar.vocab_size={q.vocab_size} exceeds model.vocab_size={model_vocab_size}; raise model.vocab_size"
        )
    check_args(q.vocab_size, d.seq_len, q.num_kv_pairs, q.power_a)
    if q.num_train_examples < 1 or q.num_test_examples < 1:
        raise DataError(
            f"data.mqar: need num_train_examples >= 1 (got {q.num_train_examples}) and num_test_examples >= 1 "
            f"(got {q.num_test_examples})"
        )


def multiquery_ar(
    vocab_size: int,
    seq_len: int,
    num_kv_pairs: int,
    num_examples: int,
    rng: np.random.Generator,
    power_a: float = 0.01,
    random_non_queries: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """MQAR examples as (inputs, labels), both int64 [num_examples, seq_len]; zoology's definition (Arora et al.
    2023, "Zoology: measuring and improving recall in efficient language models").

    Each example starts with `num_kv_pairs` key-value pairs (keys drawn without replacement from 1..vocab/2-1,
    values from vocab/2..vocab-1). The rest of the sequence holds one query per key, each key once, at even
    offsets `2*gap` after the pairs; gaps are drawn without replacement with P(gap=g) proportional to
    g**(power_a-1) for g = 1..(seq_len - 2*num_kv_pairs)/2, so most queries come soon after the context (as
    repeated bigrams do in text). The label at a query position is the value paired with that key; every other
    label is IGNORE_INDEX = -100 (not scored), so loss and accuracy count answers only. With `random_non_queries`,
    the filler positions hold random tokens from the whole vocabulary instead of 0.

    Constraints (`check_args` raises them as errors naming the config keys): num_kv_pairs >= 1; seq_len >=
    4*num_kv_pairs (the pairs take 2*num_kv_pairs positions and the queries as many slots again); num_kv_pairs <=
    vocab_size/2 - 1 (keys and values are drawn without replacement, each from half the vocabulary); power_a > 0.

    Worked example (zoology style; `random_non_queries=False` keeps the filler at 0 so the structure shows)::

                  Key  Val  Key  Val Query                                     Query
        inputs:    6   10    5   13    5    0    0    0    0    0    0    0    0    0    6    0
        labels: -100 -100 -100 -100   13 -100 -100 -100 -100 -100 -100 -100 -100 -100   10 -100

    Key 5 was paired with value 13, so at the query 5 the model must predict 13; key 6 comes back ten positions
    later and must be answered with 10. As a doctest:

    >>> x, y = multiquery_ar(vocab_size=16, seq_len=16, num_kv_pairs=2, num_examples=1,
    ...                      rng=np.random.default_rng(0), random_non_queries=False)
    >>> x[0].tolist()
    [6, 10, 5, 13, 5, 0, 0, 0, 0, 0, 0, 0, 0, 0, 6, 0]
    >>> [(i, int(v)) for i, v in enumerate(y[0]) if v != IGNORE_INDEX]
    [(4, 13), (14, 10)]
    """
    check_args(vocab_size, seq_len, num_kv_pairs, power_a)
    n, k = num_examples, num_kv_pairs
    context = 2 * k
    half = vocab_size // 2

    def draw_without_replacement(scores: np.ndarray) -> np.ndarray:
        # Gumbel-top-k: the k largest perturbed scores, in descending order, are distributed exactly like k
        # sequential draws without replacement (np.random.choice(replace=False, p=...)).
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1)
        return np.take_along_axis(top, order, axis=1)

    keys = 1 + draw_without_replacement(rng.random((n, half - 1)))
    values = half + draw_without_replacement(rng.random((n, vocab_size - half)))
    space = (seq_len - context) // 2
    log_p = (power_a - 1) * np.log(np.arange(1, space + 1))  # + log(power_a) - log(sum): constant, irrelevant
    gaps = draw_without_replacement(log_p + rng.gumbel(size=(n, space)))

    inputs = np.zeros((n, seq_len), dtype=np.int64)
    inputs[:, 0:context:2] = keys
    inputs[:, 1:context:2] = values
    query_pos = context + 2 * gaps
    np.put_along_axis(inputs, query_pos, keys, axis=1)
    labels = np.full((n, seq_len), IGNORE_INDEX, dtype=np.int64)
    np.put_along_axis(labels, query_pos, values, axis=1)
    if random_non_queries:
        filler = inputs == 0
        inputs[filler] = rng.integers(0, vocab_size, size=int(filler.sum()))
    return inputs, labels


@dataclass(frozen=True)
class MQARSplit:
    """One MQAR split: `num_examples` examples generated from (seed, split)."""

    split: str
    num_examples: int

    def describe(self) -> str:
        return f"synthetic: {self.num_examples} examples"


class MQARDataset:
    """Map-style dataset of MQAR examples. For train, index = global sample index (example index mod the set size,
    i.e. epochs over a fixed training set as in zoology); for eval, index = example index."""

    def __init__(self, d: DictConfig, split: str, seed: int, num_examples: int) -> None:
        q = d.mqar
        self.args = dict(
            vocab_size=int(q.vocab_size),
            seq_len=int(d.seq_len),
            num_kv_pairs=int(q.num_kv_pairs),
            power_a=float(q.power_a),
            random_non_queries=bool(q.random_non_queries),
        )
        check_args(self.args["vocab_size"], self.args["seq_len"], self.args["num_kv_pairs"], self.args["power_a"])
        self.seed, self.code, self.num_examples = int(seed), SPLIT_CODE[split], int(num_examples)

    def __len__(self) -> int:
        return self.num_examples

    @lru_cache(maxsize=4)  # noqa: B019 (it keeps <= 4 chunks and their splits alive; a run keeps its splits anyway)
    def _chunk(self, c: int) -> tuple[np.ndarray, np.ndarray]:
        n = min(CHUNK, self.num_examples - c * CHUNK)
        return multiquery_ar(num_examples=n, rng=np.random.default_rng([self.seed, self.code, c]), **self.args)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        i = int(i) % self.num_examples
        inputs, labels = self._chunk(i // CHUNK)
        return {"input_ids": inputs[i % CHUNK], "labels": labels[i % CHUNK]}
