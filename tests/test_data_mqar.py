"""MQAR: reproducible, answers only at queries, each answer the value paired with its key, constraints checked."""

import doctest

import numpy as np
import pytest

from pha_lab.config import ConfigError, load_config
from pha_lab.data import IGNORE_INDEX, DataError, mqar
from pha_lab.data.mqar import MQARDataset, multiquery_ar


def gen(seed=0, n=256, vocab=512, seq_len=128, kv=16, **kw):
    return multiquery_ar(vocab, seq_len, kv, n, np.random.default_rng(seed), **kw)


def test_docstring_example():
    assert doctest.testmod(mqar, raise_on_error=True).attempted >= 3


def test_seeded_batches_are_reproducible():
    a, b, c = gen(1), gen(1), gen(2)
    assert (a[0] == b[0]).all() and (a[1] == b[1]).all()
    assert not (a[0] == c[0]).all()


@pytest.mark.parametrize("random_non_queries", [True, False])
def test_labels_only_at_answers_each_the_paired_value(random_non_queries):
    vocab, seq_len, kv = 512, 128, 16
    x, y = gen(3, vocab=vocab, seq_len=seq_len, kv=kv, random_non_queries=random_non_queries)
    assert x.shape == y.shape == (256, seq_len) and x.dtype == y.dtype == np.int64
    for inputs, labels in zip(x, y):
        keys, values = inputs[0 : 2 * kv : 2], inputs[1 : 2 * kv : 2]
        assert len(set(keys.tolist())) == kv and (keys >= 1).all() and (keys < vocab // 2).all()
        assert len(set(values.tolist())) == kv and (values >= vocab // 2).all() and (values < vocab).all()
        answers = np.flatnonzero(labels != IGNORE_INDEX)
        assert len(answers) == kv  # one query per key
        assert (answers >= 2 * kv).all() and ((answers - 2 * kv) % 2 == 0).all()
        pair = dict(zip(keys.tolist(), values.tolist()))
        assert sorted(inputs[answers].tolist()) == sorted(keys.tolist())  # each key is queried once
        for p in answers:
            assert labels[p] == pair[int(inputs[p])]  # the answer is the value paired with that key earlier
        filler = np.ones(seq_len, bool)
        filler[: 2 * kv] = False
        filler[answers] = False
        if not random_non_queries:
            assert (inputs[filler] == 0).all()
    if random_non_queries:
        assert len(np.unique(x[:, 2 * kv :])) > vocab // 2  # filler drawn from the whole vocabulary


def test_power_law_puts_queries_early():
    def mean_gap(a):
        x, y = gen(4, n=2000, power_a=a, random_non_queries=False)
        return np.flatnonzero(y.reshape(-1) != IGNORE_INDEX).__mod__(128).mean()

    assert mean_gap(0.01) < mean_gap(1.0) - 10  # uniform gaps (a=1) sit much later on average


def test_argument_constraints():
    with pytest.raises(DataError, match=r"num_kv_pairs=40 needs data\.seq_len >= 4\*num_kv_pairs = 160"):
        gen(kv=40)
    with pytest.raises(DataError, match=r"data\.mqar\.vocab_size=16 is too small for num_kv_pairs=16"):
        gen(vocab=16)
    with pytest.raises(DataError, match=r"data\.mqar\.power_a=0"):
        gen(power_a=0)
    with pytest.raises(ConfigError, match=r"data\.mqar\.num_kv_pairs=40 needs data\.seq_len"):
        load_config("tiny_mqar", ["data.mqar.num_kv_pairs=40"])
    with pytest.raises(ConfigError, match=r"data\.mqar\.vocab_size=4096 exceeds model\.vocab_size=512"):
        load_config("tiny_mqar", ["data.mqar.vocab_size=4096"])


def test_dataset_is_a_function_of_the_index():
    d = load_config("tiny_mqar").data
    ds, again = MQARDataset(d, "train", 7, 2000), MQARDataset(d, "train", 7, 2000)
    for i in (1999, 0, 513, 2000 + 5):  # across chunks, and wrapping into the next epoch
        assert (ds[i]["input_ids"] == again[i]["input_ids"]).all()
    assert (ds[5]["input_ids"] == ds[2005]["input_ids"]).all()
    valid = MQARDataset(d, "valid", 7, 100)
    assert not (valid[0]["input_ids"] == ds[0]["input_ids"]).all()  # splits use different streams
    assert ds[0]["input_ids"].shape == (d.seq_len,)
