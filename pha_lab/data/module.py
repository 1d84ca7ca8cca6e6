"""LightningDataModules: language modelling over a token cache, and synthetic MQAR.

Both yield the batch of pha_lab/data/batch.py: `{"input_ids": LongTensor[B, T], "labels": LongTensor[B, T]}`.
Training draws sample indices from `trainer.global_step * batch_size * accumulate_grad_batches * world_size` on,
and each index maps to fixed data, so a run resumed from a checkpoint continues at the same data position.
Evaluation is deterministic and covers the whole split (or data.max_eval_tokens of it); `eval_protocol(split)`
describes what was scored, for the run's logs and tables.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import lightning as L
from torch.utils.data import DataLoader, DistributedSampler

from pha_lab.data import corpora
from pha_lab.data.mqar import MQARDataset
from pha_lab.data.tokenizer import Tokenizer, build_tokenizer
from pha_lab.data.tokens import EvalWindows, TokenSplit, TrainWindows, load_split
from pha_lab.errors import DataError

if TYPE_CHECKING:
    from omegaconf import DictConfig

log = logging.getLogger(__name__)
SPLIT_ALIASES = {"train": "train", "valid": "valid", "val": "valid", "validation": "valid", "test": "test"}
STAGE_SPLITS = {"fit": ("train", "valid"), "validate": ("valid",), "test": ("test",), "predict": ("test",)}


def _split_name(split: str) -> str:
    try:
        return SPLIT_ALIASES[split]
    except KeyError:
        raise DataError(f"unknown split '{split}'; use one of: {', '.join(SPLIT_ALIASES)}") from None


class GlobalIndexSampler(DistributedSampler):
    """Yields global sample indices `count` times from `start`. With several ranks, micro-batch j of rank r takes
    indices start + (j*world + r)*batch_size + [0, batch_size), so every index is used once across ranks.
    A DistributedSampler only so that Lightning's DDP leaves it alone instead of wrapping (and reshuffling) it."""

    def __init__(self, start: int, count: int, batch_size: int, rank: int = 0, world: int = 1) -> None:
        # no super().__init__: it wants a process group; these are the attributes Lightning/torch may read
        self.start, self.count, self.batch_size, self.rank, self.num_replicas = start, count, batch_size, rank, world
        self.epoch, self.shuffle, self.drop_last, self.seed = 0, False, True, 0

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[int]:
        for k in range(self.count):
            j, b = divmod(k, self.batch_size)
            yield self.start + (j * self.num_replicas + self.rank) * self.batch_size + b


class RankSlice(DistributedSampler):
    """Evaluation under DDP: rank r takes windows r, r+world, ... with no padding (DistributedSampler would repeat
    windows to even out ranks, scoring some tokens twice); the summed metrics stay exact."""

    def __init__(self, n: int, rank: int, world: int) -> None:
        self.n, self.rank, self.num_replicas = n, rank, world
        self.epoch, self.shuffle, self.drop_last, self.seed = 0, False, False, 0

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.num_replicas))

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.n, self.num_replicas))


class TrainLoader(DataLoader):
    """The train DataLoader. Its position is a function of the trainer's global step, so its checkpoint state only
    records the batch geometry (a resume with a different geometry maps steps to other data, which we warn about);
    being stateful also tells Lightning that a mid-epoch resume is safe."""

    geometry: dict[str, int] = {}

    def state_dict(self) -> dict[str, int]:
        return dict(self.geometry)

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state and state != self.geometry:
            warnings.warn(
                f"resuming with a different data geometry (checkpoint {state}, now {self.geometry}): the data position "
                f"after the resume is not where the checkpointed run would have continued",
                stacklevel=2,
            )


class _DataModule(L.LightningDataModule):
    """What both modules share: the train loader's start position and the eval loaders."""

    def __init__(self, cfg: DictConfig) -> None:
        super().__init__()
        self.cfg, self.d = cfg, cfg.data
        self._eval_sets: dict[str, Any] = {}

    # subclasses provide these
    def train_dataset(self) -> Any: ...
    def eval_dataset(self, split: str) -> Any: ...

    def _geometry(self) -> dict[str, int]:
        t = self.trainer
        accumulate = t.accumulate_grad_batches if t is not None else self.cfg.trainer.accumulate_grad_batches
        world = t.world_size if t is not None else 1
        return {
            "seed": int(self.cfg.seed),
            "batch_size": int(self.d.batch_size),
            "accumulate": int(accumulate),
            "world_size": int(world),
            "seq_len": int(self.d.seq_len),
        }

    def train_dataloader(self) -> DataLoader:
        ds = self.train_dataset()
        g = self._geometry()
        t = self.trainer
        step = t.global_step if t is not None else 0
        max_steps = t.max_steps if t is not None else self.cfg.trainer.max_steps
        per_step = g["batch_size"] * g["accumulate"]
        if max_steps is None or max_steps < 0:  # epoch-based trainer: one epoch = about one pass over the data
            count = max(per_step, len(ds) // g["world_size"] // per_step * per_step)
        else:
            count = max_steps * per_step  # the whole run; Lightning stops at max_steps, resumed or not
        start = step * per_step * g["world_size"]
        rank = t.global_rank if t is not None else 0
        sampler = GlobalIndexSampler(start, count, g["batch_size"], rank, g["world_size"])
        loader = TrainLoader(ds, batch_size=g["batch_size"], sampler=sampler, drop_last=True, **self._loader_kwargs())
        loader.geometry = g
        log.info("train data starts at global sample %d (step %d)", start, step)
        return loader

    def _loader_kwargs(self) -> dict[str, Any]:
        workers = int(self.d.num_workers)
        accel = getattr(self.trainer, "accelerator", None)
        pin = accel is not None and type(accel).__name__ == "CUDAAccelerator"
        return {"num_workers": workers, "persistent_workers": workers > 0, "pin_memory": pin}

    def _eval_loader(self, split: str) -> Any:
        if split not in corpora.split_names(self.d):
            warnings.warn(f"data.source={self.d.source} has no {split} split; skipping its evaluation", stacklevel=2)
            return []
        ds = self._eval_set(split)
        t = self.trainer
        sampler = RankSlice(len(ds), t.global_rank, t.world_size) if t is not None and t.world_size > 1 else None
        return DataLoader(ds, batch_size=int(self.d.eval_batch_size), sampler=sampler, **self._loader_kwargs())

    def _eval_set(self, split: str) -> Any:
        if split not in self._eval_sets:
            self._eval_sets[split] = self.eval_dataset(split)
        return self._eval_sets[split]

    def val_dataloader(self) -> Any:
        return self._eval_loader("valid")

    def test_dataloader(self) -> Any:
        return self._eval_loader("test")

    def splits(self) -> dict[str, Any]:
        if not hasattr(self, "_splits"):
            self._splits = corpora.splits(self.d)
        return self._splits

    def _stage_splits(self, stage: str | None) -> tuple[str, ...]:
        wanted = STAGE_SPLITS.get(stage or "", ("train", "valid", "test"))
        return tuple(s for s in wanted if s in corpora.split_names(self.d))


class LMDataModule(_DataModule):
    """Language modelling over a cached token stream of the configured source."""

    def __init__(self, cfg: DictConfig) -> None:
        super().__init__(cfg)
        self._tokenizer: Tokenizer | None = None
        self._tokens: dict[str, TokenSplit] = {}
        self._bytes: dict[str, int] = {}

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            self._tokenizer = build_tokenizer(self.d)
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def check_vocab(self) -> None:
        model_vocab = int(self.cfg.model.vocab_size)
        if self.vocab_size > model_vocab:
            tk = self.d.tokenizer
            which = (
                f"data.tokenizer.train_vocab_size={tk.train_vocab_size}"
                if tk.train_vocab_size
                else (f"data.tokenizer.name={tk.name}" + (f", data.tokenizer.path={tk.path}" if tk.path else ""))
            )
            raise DataError(
                f"the tokenizer ({which}: {self.tokenizer.name}, {self.vocab_size} tokens) does not fit "
                f"model.vocab_size={model_vocab}; raise model.vocab_size to >= {self.vocab_size} "
                f"(e.g. {-(-self.vocab_size // 64) * 64}) or use a smaller tokenizer"
            )

    def token_split(self, split: str) -> TokenSplit:
        split = _split_name(split)
        if split not in self._tokens:
            if split not in corpora.split_names(self.d):
                raise DataError(
                    f"data.source={self.d.source} has no {split} split (give data.{split}_files or a positive "
                    f"data.{split}_fraction)"
                )
            self._tokens[split] = load_split(self.d, split, self.tokenizer)
        return self._tokens[split]

    def prepare_data(self) -> None:
        """Build the tokenizer and the token caches this stage needs (Lightning calls this on one process)."""
        fn = getattr(getattr(self.trainer, "state", None), "fn", None)
        stage = getattr(fn, "value", None)  # fit | validate | test | predict; None without a trainer: all splits
        self.check_vocab()
        for split in self._stage_splits(stage):
            self.token_split(split)

    def setup(self, stage: str | None = None) -> None:
        self.check_vocab()
        for split in self._stage_splits(stage):
            if split == "train":
                self.train_dataset()
            else:
                self._eval_set(split)

    def train_dataset(self) -> TrainWindows:
        return TrainWindows(self.token_split("train"), self.d.seq_len, self.cfg.seed)

    def eval_dataset(self, split: str) -> EvalWindows:
        return EvalWindows(self.token_split(split), self.d.seq_len, self.d.eval_stride, self.d.max_eval_tokens, split)

    def eval_protocol(self, split: str) -> dict[str, Any]:
        """What an evaluation of `split` scores: dataset, tokenizer, context, stride, token and byte counts."""
        split = _split_name(split)
        ts = self.token_split(split)
        ds = self._eval_set(split)
        n_split = ts.n_tokens - 1
        if split not in self._bytes:  # n_bytes: UTF-8 bytes of the text whose tokens are scored (EOT: 0 bytes)
            if ds.n_targets == n_split:
                self._bytes[split] = int(ts.meta["n_bytes"])
            else:
                text = self.tokenizer.decode(ts.tokens[1 : ds.n_targets + 1])
                self._bytes[split] = len(text.encode("utf-8"))
        return {
            "dataset": ts.meta["dataset"],
            "split": split,
            "source": ts.meta["source"],
            "tokenizer": self.tokenizer.name,
            "tokenizer_vocab": self.vocab_size,
            "tokenizer_sha256": self.tokenizer.fingerprint[:16],
            "context": int(self.d.seq_len),
            "stride": ds.stride,
            "n_tokens": ds.n_targets,
            "n_tokens_split": n_split,
            "n_bytes": self._bytes[split],
            "n_docs": int(ts.meta["n_docs"]),
            "max_eval_tokens": self.d.max_eval_tokens,
            "metric": "ppl",
            "cache": str(ts.bin_path),
        }


class MQARDataModule(_DataModule):
    """Synthetic multi-query associative recall; metric: accuracy over answer positions."""

    @property
    def vocab_size(self) -> int:
        return int(self.d.mqar.vocab_size)

    def check_vocab(self) -> None:
        if self.vocab_size > int(self.cfg.model.vocab_size):
            raise DataError(
                f"data.mqar.vocab_size={self.vocab_size} exceeds model.vocab_size={self.cfg.model.vocab_size}; "
                f"raise model.vocab_size"
            )

    def setup(self, stage: str | None = None) -> None:
        self.check_vocab()
        for split in self._stage_splits(stage):
            if split != "train":
                self._eval_set(split)

    def train_dataset(self) -> MQARDataset:
        return MQARDataset(self.d, "train", self.cfg.seed, self.splits()["train"].num_examples)

    def eval_dataset(self, split: str) -> MQARDataset:
        return MQARDataset(self.d, split, self.cfg.seed, self.splits()[split].num_examples)

    def eval_protocol(self, split: str) -> dict[str, Any]:
        split = _split_name(split)
        q, n = self.d.mqar, self.splits()[split].num_examples
        return {
            "dataset": "mqar",
            "split": split,
            "source": self.splits()[split].describe(),
            "tokenizer": "none (synthetic ids)",
            "tokenizer_vocab": int(q.vocab_size),
            "context": int(self.d.seq_len),
            "stride": int(self.d.seq_len),
            "n_tokens": n * int(q.num_kv_pairs),  # answer positions scored
            "n_bytes": None,
            "n_examples": n,
            "num_kv_pairs": int(q.num_kv_pairs),
            "power_a": float(q.power_a),
            "random_non_queries": bool(q.random_non_queries),
            "metric": "accuracy",
        }


def build_datamodule(cfg: DictConfig) -> L.LightningDataModule:
    """The data module for `cfg` (the full config from `pha_lab.config.load_config`)."""
    return MQARDataModule(cfg) if cfg.data.source == "mqar" else LMDataModule(cfg)
