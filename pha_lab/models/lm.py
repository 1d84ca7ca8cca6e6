"""The language model: token embedding -> N blocks -> final norm -> (tied) LM head; decoding in decoding.py."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from omegaconf import DictConfig
from torch import nn

from pha_lab.config import layer_specs
from pha_lab.models import decoding
from pha_lab.models.blocks import Block, ParallelBlock, SerialBlock, make_norm
from pha_lab.models.flops import flops_per_token
from pha_lab.models.memory import cache_bytes_by_branch, training_bytes


class LanguageModel(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.specs = layer_specs(cfg)
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wte.weight.no_weight_decay = True  # also the tied LM head's; an untied head is decayed
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(
            ParallelBlock(s["branches"], s["mixer"], cfg, s["sections"])
            if s["layout"] == "parallel"
            else SerialBlock(s["branches"], cfg, s["sections"])
            for s in self.specs
        )
        self.norm_f = make_norm(cfg.norm, cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self._init_weights()

    def n_residual_additions(self) -> int:
        """How many times the network adds to its residual stream: one per branch in a serial block, one per
        parallel block (its mixer adds the branches' mixture once)."""
        return sum(1 if blk.layout == "parallel" else len(blk.names) for blk in self.blocks)

    def _init_weights(self) -> None:
        """GPT-2 init: N(0, init_std), with the output projections that write to the residual stream scaled so
        that the stream's variance at init does not grow with depth or depend on the layout.

        GPT-2 scales them by 1/sqrt(number of residual additions) (2 per layer for attention + MLP); we count the
        real additions (n_residual_additions: k per serial block of k branches, 1 per parallel block), so each
        addition carries ~1/N_res of one branch's variance and all N_res of them about one branch's variance.
        A parallel block's mixer starts as a uniform average of its k branches (every mixer: sum of squared
        weights 1/k), which shrinks its one addition by 1/sqrt(k); its branches get sqrt(k) back, so a
        parallel and a serial stack of the same branches start with the same residual growth. The channel
        mixer RMS-normalises each branch, so no projection scale reaches the stream: it scales its weights
        instead (ChannelMixer.residual_init). tests/test_models.py::test_initial_residual_growth measures it."""
        std = self.cfg.init_std
        for module in self.modules():
            if isinstance(module, nn.Linear) and not getattr(module.weight, "no_init", False):
                nn.init.normal_(module.weight, 0.0, std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.normal_(self.wte.weight, 0.0, std)
        n_res = self.n_residual_additions()
        for blk in self.blocks:
            k = len(blk.names) if blk.layout == "parallel" else 1
            out_std = std * math.sqrt(k / n_res)
            for module in blk.branches.modules():
                if getattr(module, "is_residual_out", False):
                    nn.init.normal_(module.weight, 0.0, out_std)
            if blk.layout == "parallel":
                blk.mixer.residual_init(out_std)

    def forward(self, idx: torch.Tensor, return_hidden: bool = False) -> torch.Tensor:
        """idx [B, T] -> logits [B, T, vocab], or with return_hidden the final norm's output [B, T, D] that the
        head would multiply (the training loss owns the head matmul: pha_lab.training.loss)."""
        return self.forward_embeddings(self.wte(idx), return_hidden)

    def forward_embeddings(self, x: torch.Tensor, return_hidden: bool = False) -> torch.Tensor:
        """Token embeddings [B, T, D] -> logits (or hidden states); separate so tests can differentiate w.r.t. them."""
        x = self.drop(x)
        for block in self.blocks:
            x = block(x)
        h = self.norm_f(x)
        return h if return_hidden else self.lm_head(h)

    # ---------------------------------------------------------------- decoding (the contract: models/decoding.py)
    def init_state(self, batch: int, max_len: int, device=None, dtype=None) -> decoding.DecodeState:
        """An empty decoding state for `batch` sequences of up to `max_len` tokens (default: the embedding's device
        and dtype, or the autocast dtype when called inside autocast: the KV cache holds what attention computes)."""
        return decoding.init_state(self, batch, max_len, device, dtype)

    def prefill(self, ids: torch.Tensor, state: decoding.DecodeState, last_only: bool = False):
        """ids [B, T] -> (logits [B, T, V], or [B, V] of the last token with last_only; state advanced by T)."""
        return decoding.prefill(self, ids, state, last_only)

    def step(self, ids: torch.Tensor, state: decoding.DecodeState):
        """ids [B] or [B, 1] -> (logits [B, V], state advanced by one)."""
        return decoding.step(self, ids, state)

    def generate(
        self,
        ids: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        eos_id: int | None = None,
    ) -> torch.Tensor:
        """ids [B, T] followed by up to max_new_tokens sampled tokens, [B, T + n] (temperature 0: greedy)."""
        return decoding.generate(self, ids, max_new_tokens, temperature, top_k, top_p, seed, eos_id)

    # ---------------------------------------------------------------- introspection
    def n_params(self, non_embedding: bool = False) -> int:
        """GPT-2 counting: a tied embedding is counted once. non_embedding drops the token embedding
        (and an untied output head)."""
        total = sum(p.numel() for p in self.parameters())
        if non_embedding:
            total -= self.wte.weight.numel()
            if not self.cfg.tie_embeddings:
                total -= self.lm_head.weight.numel()
        return total

    def flops_per_token(self, seq_len: int, training: bool = True) -> Counter[str]:
        """Analytic FLOPs per token by part ("matmul", "attention", "fft", ..., "total"; x3 for forward +
        backward), by the one rule of pha_lab.models.flops."""
        return flops_per_token(self, seq_len, training)

    def cache_bytes(self, batch: int, seq_len: int, dtype_bytes: int) -> int:
        """Bytes of the inference cache (KV cache + recurrent state) for `batch` sequences at context `seq_len`,
        `dtype_bytes` per cached number: the sum of every branch module's own `cache_bytes` (pha_lab.models.memory)."""
        return sum(self.cache_bytes_by_branch(batch, seq_len, dtype_bytes).values())

    def cache_bytes_by_branch(self, batch: int, seq_len: int, dtype_bytes: int) -> Counter[str]:
        """`cache_bytes` by branch name (attn: the KV cache, gss: the state, ...), summed over the layers."""
        return cache_bytes_by_branch(self.blocks, batch, seq_len, dtype_bytes)

    def training_bytes(self) -> dict[str, int]:
        """fp32 weights, fp32 gradients and AdamW's moments in bytes, and their "total" (pha_lab.models.memory)."""
        return training_bytes(self.n_params())

    def mixer_weights(self) -> list[dict[str, float]]:
        """One dict per layer: branch -> current mixer weight (empty for serial layers)."""
        rows = []
        for blk in self.blocks:
            w = blk.mixer_weights()
            rows.append({} if w is None else dict(zip(blk.names, w.tolist())))
        return rows

    @contextmanager
    def knockout(self, branch: str, layers: list[int] | None = None) -> Iterator[None]:
        """Zero one branch's output (in the given layers, default all that have it) inside the block."""
        chosen = [b for i, b in enumerate(self.blocks) if (layers is None or i in layers) and branch in b.branches]
        if not chosen:
            raise ValueError(f"no layer has a '{branch}' branch to knock out (layers={layers})")
        for b in chosen:
            b.knockout.add(branch)
        try:
            yield
        finally:
            for b in chosen:
                b.knockout.discard(branch)

    @contextmanager
    def recording_stats(self) -> Iterator[list[dict[str, float]]]:
        """Record each branch's output RMS per layer during the forwards run inside the block."""
        stats = [blk.branch_rms for blk in self.blocks]
        for blk in self.blocks:
            blk.branch_rms.clear()
            blk.record_stats = True
        try:
            yield stats
        finally:
            for blk in self.blocks:
                blk.record_stats = False


def build_model(model_cfg: DictConfig) -> LanguageModel:
    """model_cfg: the `model` section of a config (validated by pha_lab.config)."""
    return LanguageModel(model_cfg)


__all__ = ["Block", "LanguageModel", "build_model"]
