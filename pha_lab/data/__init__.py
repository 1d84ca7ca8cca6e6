"""Data layer: tokenizers, corpora (one source registry), token caches, MQAR and the LightningDataModules.

`build_tokenizer(cfg.data)` works without Lightning; `build_datamodule(cfg)` imports Lightning (about 5 s) only
when called, so light commands and a GPU run over a prebuilt cache stay fast. `datasets` is imported only where a
token cache or tokenizer is built. The protocol is written down in docs/data.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pha_lab.data.batch import IGNORE_INDEX
from pha_lab.data.corpora import SOURCES, data_root, splits
from pha_lab.data.tokenizer import Tokenizer, build_tokenizer
from pha_lab.data.tokens import TokenSplit, eval_windows, lm_metrics, token_split
from pha_lab.errors import DataError

if TYPE_CHECKING:
    from omegaconf import DictConfig

__all__ = [
    "IGNORE_INDEX",
    "SOURCES",
    "DataError",
    "Tokenizer",
    "TokenSplit",
    "build_datamodule",
    "build_tokenizer",
    "data_root",
    "eval_windows",
    "lm_metrics",
    "splits",
    "token_split",
    "LMDataModule",
    "MQARDataModule",
]


def build_datamodule(cfg: DictConfig):
    """The LightningDataModule for the full config `cfg` (MQAR or language modelling)."""
    from pha_lab.data.module import build_datamodule as build  # start-up time: imports Lightning (~5 s)

    return build(cfg)


def __getattr__(name: str) -> Any:  # LMDataModule / MQARDataModule without importing Lightning up front
    if name in ("LMDataModule", "MQARDataModule"):
        from pha_lab.data import module  # start-up time, as build_datamodule

        return getattr(module, name)
    raise AttributeError(f"module 'pha_lab.data' has no attribute {name!r}")
