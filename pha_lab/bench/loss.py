"""The LM head + cross-entropy alone, forward and backward: the plain path vs the chunked one (training/loss.py).

  plain           F.cross_entropy(F.linear(h, W).float(), y): the [N, V] logits and their fp32 copy (the suite before
                  the chunked loss; still what bench/workloads and the GPT-2 reference do, the latter inside its graph)
  plain-compiled  the same under torch.compile (what a loss inside the model's compiled graph costs)
  chunked         pha_lab.training.loss.token_nll(h, W, y, "sum"), eager chunk kernels
  chunked-compiled  its chunk kernels compiled (trainer.compile on: the GPU default)

Per row: median / p10 / p90 ms of forward + backward under bf16 autocast (GPU) and the loss's own peak memory
(tensors it allocates, on top of h, W and y): `torch.cuda.max_memory_allocated` on a GPU, `LiveTensorBytes`
on a CPU (which keeps no allocator statistics), and the bytes it saves for backward.
`python -m pha_lab.bench.loss` (GPU: transformer_125m at B=12 and the mini models at B=32; CPU: a small one, fp32
unless --bf16).
"""

from __future__ import annotations

import argparse
import weakref
from collections.abc import Callable
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from pha_lab.bench.timing import percentiles, time_steps
from pha_lab.training.loss import CHUNK_TOKENS, token_nll

GPU_SHAPES = [(12 * 1024, 768, 50304), (32 * 1024, 384, 50304)]  # transformer_125m at B=12; mini models at B=32
CPU_SHAPES = [(2048, 64, 8192)]


class LiveTensorBytes(TorchDispatchMode):
    """Bytes of the tensor storages created inside the mode that are still alive (`live`) and their maximum
    (`peak`): every op's outputs, autograd's saved tensors and the backward's included; views and in-place
    results share a storage and are counted once. A CPU stand-in for the CUDA allocator's peak statistic."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._alive: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._track(t.untyped_storage())
        return out

    def _track(self, storage) -> None:
        key, size = storage.data_ptr(), storage.nbytes()
        if size == 0 or key in self._alive:
            return
        self._alive.add(key)
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key, size)  # (a storage's Python object lives as long as it does)

    def _free(self, key: int, size: int) -> None:
        self._alive.discard(key)
        self.live -= size


def saved_bytes(fn: Callable[[], torch.Tensor]) -> int:
    """Bytes of the distinct tensors autograd saves for backward while `fn` runs."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def loss_fns(chunk: int) -> dict[str, Callable]:
    def plain(h, w, y):
        return F.cross_entropy(F.linear(h, w).float(), y, reduction="sum")

    return {
        "plain": plain,
        "plain-compiled": torch.compile(plain),
        "chunked": lambda h, w, y: token_nll(h, w, y, "sum", chunk),
        "chunked-compiled": lambda h, w, y: token_nll(h, w, y, "sum", chunk, compiled=True),
    }


def inputs(n: int, d: int, v: int, device: torch.device, seed: int = 0):
    """h [N, D] (fp32, as the final norm's output), the head weight [V, D] (fp32 master), labels [N]; h and W
    require grad."""
    g = torch.Generator(device=device).manual_seed(seed)
    h = torch.randn(n, d, device=device, generator=g).requires_grad_()
    w = (0.02 * torch.randn(v, d, device=device, generator=g)).requires_grad_()
    return h, w, torch.randint(0, v, (n,), device=device, generator=g)


def peak_bytes(step: Callable[[], None], device: torch.device) -> int:
    """The loss's own peak memory over one forward + backward (after warm-up)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    with LiveTensorBytes() as live:
        step()
    return live.peak


def measure(name: str, fn: Callable, shape: tuple[int, int, int], device: torch.device, amp, steps: int) -> dict:
    h, w, y = inputs(*shape, device)

    def forward():
        with amp:
            return fn(h, w, y)

    def step():
        forward().backward()
        h.grad = w.grad = None

    times = time_steps(step, 3, steps, device)
    p10, p50, p90 = percentiles(times)
    return {
        "variant": name,
        "tokens": shape[0],
        "d": shape[1],
        "vocab": shape[2],
        "ms": p50,
        "p10": p10,
        "p90": p90,
        "peak_gb": peak_bytes(step, device) / 1e9,
        "saved_gb": saved_bytes(forward) / 1e9,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chunk", type=int, default=CHUNK_TOKENS)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast on the CPU too (always on a GPU)")
    ap.add_argument("--variants", nargs="*", default=None)
    a = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if device.type == "cuda" or a.bf16 else nullcontext()
    print(
        f"# pha_lab.bench.loss  torch {torch.__version__}  device "
        f"{torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}  chunk {a.chunk}  "
        f"autocast {'bf16' if device.type == 'cuda' or a.bf16 else 'off'}"
    )
    print(
        f"{'variant':<17} {'tokens':>6} {'d':>4} {'vocab':>6} {'ms':>8} {'p10-p90':>15} {'peak GB':>8} {'saved GB':>9}"
    )
    for shape in GPU_SHAPES if device.type == "cuda" else CPU_SHAPES:
        for name, fn in loss_fns(a.chunk).items():
            if a.variants and name not in a.variants:
                continue
            r = measure(name, fn, shape, device, amp, a.steps)
            print(
                f"{r['variant']:<17} {r['tokens']:>6} {r['d']:>4} {r['vocab']:>6} {r['ms']:>8.2f} "
                f"{r['p10']:>7.2f}-{r['p90']:<7.2f} {r['peak_gb']:>8.3f} {r['saved_gb']:>9.3f}"
            )


if __name__ == "__main__":
    main()
