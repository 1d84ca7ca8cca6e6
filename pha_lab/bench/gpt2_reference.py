"""A plain-PyTorch GPT-2 training loop (nanoGPT style): the yardstick for the suite's speed.

The speed targets compare `transformer_125m` with this model (GPT-2-124M, `gpt2_reference`) re-measured in the
same run, and mini_transformer with its 8 x 384 twin (`gpt2_mini`), so it is kept
deliberately ordinary: learned position embeddings, LayerNorm, GELU MLP, multi-head attention through
flash SDPA, LM head tied to the token embedding, fused AdamW, bf16 autocast, optional torch.compile.
`python -m pha_lab.bench.gpt2_reference --seq-len 1024 --batch-size 12 --compile` times it alone.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pha_lab.bench.timing import autocast, percentiles, time_steps, train_step


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304  # GPT-2's 50257 padded to a multiple of 64
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768


CONFIGS = {
    "gpt2_reference": GPTConfig(),
    "gpt2_mini": GPTConfig(n_layer=8, n_head=6, n_embd=384),  # mini_transformer's shape (8 x 384, 4x MLP): 33.5M
    "gpt2_tiny": GPTConfig(vocab_size=2048, n_layer=2, n_head=4, n_embd=64),  # CPU tests
}


class CausalSelfAttention(nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.n_head = c.n_head
        self.c_attn = nn.Linear(c.n_embd, 3 * c.n_embd)
        self.c_proj = nn.Linear(c.n_embd, c.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (z.view(b, t, self.n_head, d // self.n_head).transpose(1, 2) for z in self.c_attn(x).split(d, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(b, t, d))

    def flops_per_token(self, seq_len: int) -> float:
        """QK^T and AV over the full T x T square (the suite's and torch's FLOP-counter convention)."""
        return 4.0 * seq_len * self.c_proj.in_features


class Block(nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.ln_1, self.attn = nn.LayerNorm(c.n_embd), CausalSelfAttention(c)
        self.ln_2 = nn.LayerNorm(c.n_embd)
        self.mlp = nn.Sequential(
            nn.Linear(c.n_embd, 4 * c.n_embd), nn.GELU(approximate="tanh"), nn.Linear(4 * c.n_embd, c.n_embd)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.config = c
        self.wte, self.wpe = nn.Embedding(c.vocab_size, c.n_embd), nn.Embedding(c.block_size, c.n_embd)
        self.h = nn.ModuleList(Block(c) for _ in range(c.n_layer))
        self.ln_f = nn.LayerNorm(c.n_embd)
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        self.wte.weight = self.lm_head.weight  # weight tying
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = (
                    0.02 / math.sqrt(2 * c.n_layer)
                    if name.endswith("c_proj.weight") or name.endswith("mlp.2.weight")
                    else 0.02
                )
                nn.init.normal_(p, 0.0, std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        """Logits [B, T, V], or the mean cross-entropy when targets are given (nanoGPT's interface)."""
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        if targets is None:
            return logits
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))

    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def configure_optimizer(model: GPT, lr: float = 6e-4, weight_decay: float = 0.1) -> torch.optim.AdamW:
    """nanoGPT's: decay 2-D weights only; fused AdamW on CUDA. Deliberately not training/optim.py's: this is an
    independent reference loop (the yardstick), so it must not change when the suite's optimizer does."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    fused = next(model.parameters()).device.type == "cuda"
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=fused or None)


def build(name: str = "gpt2_reference", block_size: int = 1024, device: str | torch.device = "cpu") -> GPT:
    c = CONFIGS[name]
    with torch.device(device):
        return GPT(
            GPTConfig(
                block_size=block_size, vocab_size=c.vocab_size, n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd
            )
        )


def train(
    name: str = "gpt2_reference",
    seq_len: int = 1024,
    batch_size: int = 12,
    steps: int = 20,
    warmup: int = 5,
    compile: bool = False,
    device: str | None = None,
) -> dict:
    """The whole reference loop: random tokens, `steps` timed steps after `warmup`, median tokens/s.

    Returns {"tokens_per_s", "step_ms", "losses"}; the bench times the same model through its own
    harness (pha_lab.bench.workloads), this is the standalone version on the same timing loop."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(0)
    model = build(name, seq_len, device)
    opt = configure_optimizer(model)
    fwd = torch.compile(model) if compile else model
    data = torch.randint(1, model.config.vocab_size, (2, batch_size, seq_len + 1), device=device)
    step = train_step(lambda batch: fwd(batch[:, :-1], batch[:, 1:]), data, opt, autocast(device, torch.bfloat16))
    losses: list[torch.Tensor] = []
    median = percentiles(time_steps(lambda: losses.append(step()), warmup, steps, device))[1]
    return {
        "tokens_per_s": batch_size * seq_len / (median / 1e3),
        "step_ms": median,
        "losses": [v.item() for v in losses],
    }


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--name", default="gpt2_reference", choices=sorted(CONFIGS))
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=12)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--compile", action="store_true")
    a = ap.parse_args()
    r = train(a.name, a.seq_len, a.batch_size, a.steps, a.warmup, a.compile)
    print(
        f"{a.name} T={a.seq_len} B={a.batch_size} compile={a.compile}: {r['tokens_per_s']:,.0f} tokens/s, "
        f"{r['step_ms']:.1f} ms/step (median of {a.steps})"
    )
