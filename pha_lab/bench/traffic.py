"""Eager memory traffic of one step, counted op by op on the meta device (no memory, no compute): what each ATen
op reads and writes (the extent of its tensors; views are free), plus what torch's cuFFT wrapper adds inside an
FFT op (a c2r transform clones its input; a normalisation is a separate multiply; a batch whose dimensions cannot
be collapsed into one stride is copied first; pha_lab/models/gss.py cites the code). Summing the per-op roofline
time max(FLOPs / peak, bytes / bandwidth) over the ops (eager runs one kernel at a time) predicts an eager
step before a GPU measures it (docs/perf-notes.md). Not modelled: autocast (meta tensors have none: run the
module in the dtype autocast would give its activations), cuFFT's extra passes at large sizes, strided-access
waste, launch gaps.

    python -m pha_lab.bench.traffic pha_180m:dss-fft_autograd pha_180m:dss-fft --seq-len 8192 --batch 4
"""

from __future__ import annotations

import argparse
import math
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import flop_registry

from pha_lab.bench.workloads import make_workload
from pha_lab.models.gss import DSS

FREE = {
    "view",
    "_unsafe_view",
    "transpose",
    "t",
    "permute",
    "slice",
    "select",
    "expand",
    "as_strided",
    "unsqueeze",
    "squeeze",
    "alias",
    "detach",
    "narrow",
    "real",
    "imag",
    "view_as_real",
    "view_as_complex",
    "conj",
    "_conj",
    "split",
    "split_with_sizes",
    "unbind",
    "diagonal",
    "lift_fresh",
    "empty",
    "new_empty",
    "empty_like",
    "empty_strided",
    "_reshape_alias",
    "resolve_conj",
    "_neg_view",
    "resolve_neg",
    "clone_",
    "flip_view",
}
FFT_OPS = {"_fft_r2c", "_fft_c2r", "_fft_c2c"}


def extent(t: torch.Tensor) -> int:
    """Bytes of the distinct elements a tensor (or view) spans: broadcast (stride-0) dimensions count once."""
    return math.prod(s for s, st in zip(t.shape, t.stride()) if st != 0) * t.element_size() if t.numel() else 0


def _collapsible(t: torch.Tensor, dims: list[int]) -> bool:
    """Whether the non-transformed dimensions of `t` merge into one strided batch (else torch copies the input)."""
    batch = sorted((d for d in range(t.dim()) if d not in dims and t.shape[d] > 1), key=lambda d: -t.stride(d))
    return all(t.stride(a) == t.shape[b] * t.stride(b) for a, b in zip(batch, batch[1:]))


class Traffic(TorchDispatchMode):
    """Counts bytes, FLOPs and the per-op roofline time of every op run under it, by op name."""

    def __init__(self, peak_flops: float, bandwidth: float):
        super().__init__()
        self.peak, self.bw = peak_flops, bandwidth
        self.bytes, self.flops, self.seconds, self.calls = Counter(), Counter(), Counter(), Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if name in FREE:
            return out
        ins = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        outs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        if name in ("zero_", "fill_"):
            moved = sum(map(extent, outs))
        elif name == "copy_":
            moved = extent(args[0]) + extent(args[1])
        else:
            moved = sum(map(extent, ins)) + sum(map(extent, outs))
        flops = 0.0
        if func.overloadpacket in flop_registry:
            flops = flop_registry[func.overloadpacket](*args, **kwargs, out_val=out)
        if name in FFT_OPS:
            src, dims, norm = args[0], list(args[1]), args[2]
            n = math.prod(max(src.shape[d], outs[0].shape[d]) for d in dims)
            flops = 2.5 * n * math.log2(max(n, 2)) * src.numel() / math.prod(src.shape[d] for d in dims)
            if name == "_fft_c2r":
                moved += 2 * extent(src)  # "Complex to real FFTs may overwrite the input buffer, so must always clone"
            if norm:
                moved += 2 * extent(outs[0])  # the scale is a separate mul_ over the output
            if not _collapsible(src, dims):
                moved += 2 * extent(src)
        self.bytes[name] += moved
        self.flops[name] += flops
        self.seconds[name] += max(flops / self.peak, moved / self.bw)
        self.calls[name] += 1
        return out


def count_step(
    name: str,
    seq_len: int,
    batch: int,
    training: bool = True,
    dtype: torch.dtype = torch.bfloat16,
    peak_flops: float = 788e12,
    bandwidth: float = 4.3e12,
) -> Traffic:
    """One step of workload `name` (forward, and backward in training; no optimizer) on the meta device, its
    parameters and float inputs in `dtype` (what autocast makes of the activations; a DSS keeps its fp32 inside).
    Defaults: the bf16 matmul peak and copy bandwidth measured on an H200 by the device provider (2026-10-28; this
    suite's own H200 run: 790-815 TFLOP/s, 4.2 TB/s, docs/benchmarks.md)."""
    wl = make_workload(name, "meta", seq_len)
    wl.module.to(dtype)
    for m in wl.module.modules():  # autocast keeps parameters fp32; the DSS layers compute with them in fp32
        if isinstance(m, DSS):
            m.float()
    inputs = [
        t.to(dtype).detach().requires_grad_(training) if t.is_floating_point() else t
        for t in wl.batch(batch, seq_len, torch.device("meta"), None)
    ]
    traffic = Traffic(peak_flops, bandwidth)
    with traffic:
        if training:
            out = wl.forward(wl.module, inputs) if wl.kind in ("branch", "dss") else wl.loss(wl.module, inputs)
            (out.float().square().mean() if out.dim() else out).backward()
        else:
            with torch.no_grad():
                wl.forward(wl.module, inputs)
    return traffic


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="+", help="bench workload names, e.g. pha_180m:gss pha_180m:dss-fft")
    ap.add_argument("--seq-len", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--prefill", action="store_true", help="forward only (default: forward + backward)")
    ap.add_argument("--peak-tflops", type=float, default=788.0)
    ap.add_argument("--bandwidth-tbs", type=float, default=4.3)
    a = ap.parse_args(argv)
    tokens = a.seq_len * a.batch
    for name in a.names:
        t = count_step(
            name, a.seq_len, a.batch, not a.prefill, peak_flops=a.peak_tflops * 1e12, bandwidth=a.bandwidth_tbs * 1e12
        )
        wl = make_workload(name, "meta", a.seq_len)
        h = wl.d_model if wl.kind == "dss" else wl.sizes()["gss_h"] or 1
        print(
            f"\n{name}  T={a.seq_len} B={a.batch} {'prefill' if a.prefill else 'train (fwd+bwd)'}: "
            f"{sum(t.bytes.values()) / 1e9:.2f} GB, {sum(t.calls.values())} ops, "
            f"{1e3 * sum(t.seconds.values()):.2f} ms at {a.peak_tflops:g} TFLOP/s and {a.bandwidth_tbs:g} TB/s; "
            f"{sum(t.bytes.values()) / tokens / h:.0f} B per GSS channel per token"
        )
        for op, b in t.bytes.most_common():
            print(f"  {op:<28} {t.calls[op]:>4} x  {b / 1e9:8.3f} GB  {1e3 * t.seconds[op]:7.3f} ms")


if __name__ == "__main__":
    main()
