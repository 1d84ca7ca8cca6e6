"""LightningDataModules: batch contract, eval protocol, vocab check, start position, and resume = uninterrupted."""

import warnings
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint

from pha_lab.config import experiment_names, load_config
from pha_lab.data import IGNORE_INDEX, DataError, build_datamodule
from pha_lab.data.module import GlobalIndexSampler, LMDataModule, MQARDataModule, RankSlice

pytestmark = pytest.mark.usefixtures("shared_data")  # conftest.py: fails naming the path when it is missing


def test_tiny_preset_batches_and_protocol():
    cfg = load_config("tiny_pha")
    dm = build_datamodule(cfg)
    assert isinstance(dm, LMDataModule) and dm.vocab_size == 2048
    dm.prepare_data()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    x, y = batch["input_ids"], batch["labels"]
    assert x.shape == y.shape == (8, 128) and x.dtype == y.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])  # labels are the inputs shifted by one
    assert int(x.max()) < 2048

    proto = dm.eval_protocol("val")
    assert proto["split"] == "valid" and proto["metric"] == "ppl" and proto["tokenizer"] == "bpe2048"
    assert proto["context"] == 128 and proto["stride"] == 128 and proto["n_tokens"] == 16384
    assert proto["n_tokens_split"] > 16384 and proto["dataset"] == "text"
    ts = dm.token_split("valid")
    assert proto["n_bytes"] == len(dm.tokenizer.decode(ts.tokens[1 : 16384 + 1]).encode())
    scored = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in dm.val_dataloader())
    assert scored == proto["n_tokens"]
    assert dm.eval_protocol("test")["split"] == "test"


def test_tokenizer_larger_than_model_vocab_fails_in_setup():
    cfg = load_config("tiny_pha", ["data.tokenizer.train_vocab_size=null"])  # GPT-2: 50257 tokens
    dm = build_datamodule(cfg)
    with pytest.raises(DataError, match=r"data\.tokenizer\.name=gpt2.*50257 tokens.*model\.vocab_size=2048"):
        dm.setup("fit")


def test_train_loader_starts_at_the_step_position():
    cfg = load_config("tiny_pha", ["data.seq_len=16", "data.batch_size=4"])
    dm = build_datamodule(cfg)
    dm.setup("fit")
    ds = dm.train_dataset()
    dm.trainer = SimpleNamespace(
        global_step=5, accumulate_grad_batches=3, world_size=1, global_rank=0, max_steps=10, accelerator=None
    )
    loader = dm.train_dataloader()
    assert len(loader) == 10 * 3  # micro-batches of the whole run; Lightning stops at max_steps
    first = next(iter(loader))["input_ids"]
    want = np.stack([ds[i]["input_ids"] for i in range(5 * 4 * 3, 5 * 4 * 3 + 4)])
    assert torch.equal(first, torch.from_numpy(want))
    assert loader.state_dict()["batch_size"] == 4 and loader.state_dict()["accumulate"] == 3


def test_samplers_split_ranks_without_overlap():
    ranks = [list(GlobalIndexSampler(40, 12, 3, rank=r, world=2)) for r in range(2)]
    assert sorted(ranks[0] + ranks[1]) == list(range(40, 64))
    assert ranks[0][:3] == [40, 41, 42] and ranks[1][:3] == [43, 44, 45]
    slices = [list(RankSlice(11, r, 3)) for r in range(3)]
    assert sorted(sum(slices, [])) == list(range(11))


def test_mqar_module():
    cfg = load_config("tiny_mqar")
    dm = build_datamodule(cfg)
    assert isinstance(dm, MQARDataModule) and dm.vocab_size == 512
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (32, 64) and batch["labels"].dtype == torch.long
    assert int((batch["labels"] != IGNORE_INDEX).sum()) == 32 * 4
    proto = dm.eval_protocol("valid")
    assert proto["metric"] == "accuracy" and proto["n_tokens"] == 256 * 4 and proto["context"] == 64
    scored = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in dm.val_dataloader())
    assert scored == proto["n_tokens"]


@pytest.mark.parametrize("name", [n for n in experiment_names() if n.startswith("tiny_")])
def test_every_tiny_preset_gives_batches(name):
    cfg = load_config(name)
    dm = build_datamodule(cfg)
    dm.setup("fit")
    assert dm.vocab_size <= cfg.model.vocab_size
    for batch in (next(iter(dm.train_dataloader())), next(iter(dm.val_dataloader()))):
        assert batch["input_ids"].shape[1] == cfg.data.seq_len and int(batch["input_ids"].max()) < dm.vocab_size


class Recorder(L.LightningModule):
    """The smallest LM: records every training batch it sees."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.emb, self.head = torch.nn.Embedding(vocab, 8), torch.nn.Linear(8, vocab)
        self.seen: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        self.seen.append(batch["input_ids"].clone())
        logits = self.head(self.emb(batch["input_ids"]))
        return F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE_INDEX)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_resumed_fit_sees_the_same_batches_as_an_uninterrupted_one(tmp_path: Path):
    cfg = load_config("tiny_pha", ["data.seq_len=16", "data.batch_size=2", "trainer.accumulate_grad_batches=2"])

    def fit(ckpt=None, callbacks=()):
        dm = build_datamodule(cfg)
        model = Recorder(dm.vocab_size)
        trainer = L.Trainer(
            max_steps=6,
            accumulate_grad_batches=2,
            limit_val_batches=0,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            accelerator="cpu",
            enable_checkpointing=bool(callbacks),
            callbacks=list(callbacks),
            default_root_dir=tmp_path,
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.fit(model, datamodule=dm, ckpt_path=ckpt)
        assert not [w for w in caught if "not resumable" in str(w.message)]
        assert trainer.global_step == 6
        return model.seen, dm

    every3 = ModelCheckpoint(dirpath=tmp_path, filename="{step}", every_n_train_steps=3, save_top_k=-1)
    full, dm = fit(callbacks=[every3])
    assert len(full) == 12  # 6 steps x 2 micro-batches
    ds = dm.train_dataset()
    assert torch.equal(full[0], torch.from_numpy(np.stack([ds[0]["input_ids"], ds[1]["input_ids"]])))
    resumed, _ = fit(ckpt=str(tmp_path / "step=3.ckpt"))
    assert len(resumed) == 6
    assert all(torch.equal(a, b) for a, b in zip(full[6:], resumed))
    assert not torch.equal(full[0], resumed[0])
