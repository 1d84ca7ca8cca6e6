"""What a step could cost at best: the card's matmul peak and copy bandwidth, and each cell's analytic floor.

`floor_ms` is the larger of FLOPs / peak and the minimum bytes / bandwidth (docs/perf-notes.md explains
each term); MFU is achieved FLOP/s over the measured (or configured) matmul peak and over the datasheet.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from omegaconf import DictConfig

from pha_lab.bench.spec import DTYPES
from pha_lab.bench.timing import percentiles, time_steps
from pha_lab.bench.workloads import Workload

Rate = tuple[float, str]  # (value per second, where it comes from)


def measure_peak(device: torch.device) -> tuple[float, float]:
    """(FLOP/s of a bf16 8192^3 matmul, B/s of a 1 GiB device copy counting read + write); on CPU a
    512^3 fp32 matmul and a 64 MiB copy. Random data: zeros run faster than real data."""
    cuda = device.type == "cuda"
    n, dtype, copy_bytes = (8192, torch.bfloat16, 2**30) if cuda else (512, torch.float32, 2**26)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    out = torch.empty(n, n, device=device, dtype=dtype)
    mm = percentiles(time_steps(lambda: torch.mm(a, b, out=out), 3, 20, device))[1]
    src = torch.randn(copy_bytes // 4, device=device)
    dst = torch.empty_like(src)
    cp = percentiles(time_steps(lambda: dst.copy_(src), 3, 20, device))[1]
    return 2 * n**3 / (mm / 1e3), 2 * copy_bytes / (cp / 1e3)


def device_peaks(device: torch.device, spec: DictConfig, measure: bool) -> tuple[Rate, Rate]:
    """(matmul peak FLOP/s, copy bandwidth B/s), each with its source: measured now, or the spec's values
    (a CPU has no configured peak: NaN, so no MFU or floor without --measure-peak)."""
    if measure:
        flops, bw = measure_peak(device)
        source = "measured (8192^3 bf16 matmul)" if device.type == "cuda" else "measured (cpu)"
        return (flops, source), (bw, "measured (device copy)")
    if device.type == "cuda":
        return (spec.peak_tflops * 1e12, "config"), (spec.bandwidth_tbs * 1e12, "config")
    return (float("nan"), "none (cpu; use --measure-peak)"), (spec.bandwidth_tbs * 1e12, "config")


def datasheet_flops(device: torch.device, spec: DictConfig) -> float:
    """The card's dense FLOP/s at the spec's dtype from Lightning's table, else `datasheet_tflops`; NaN on a CPU."""
    if device.type != "cuda":
        return float("nan")
    try:
        # only on a GPU: `import lightning` takes seconds, and `pha-lab bench --plan` must stay light
        from lightning.fabric.utilities.throughput import get_available_flops

        flops = get_available_flops(device, DTYPES[spec.dtype])
    except Exception:
        flops = None
    return float(flops or spec.datasheet_tflops * 1e12)


def floors(
    sizes: dict[str, int],
    flops_per_token: float,
    seq_len: int,
    batch: int,
    training: bool,
    peak_flops: float,
    bandwidth: float,
) -> dict[str, Any]:
    """The analytic floor of one step (docs/perf-notes.md explains each term).

    min bytes (HBM traffic no implementation avoids, assuming elementwise ops fused into the matmuls):
      weights    train 42 B/param: fp32 read + bf16 write of the autocast copy (6), bf16 reads in the
                 forward and in both backward matmuls (6), fp32 grad write (4), fused AdamW reads
                 p, g, m, v and writes p, m, v (28); prefill 6 B/param (the autocast copy)
      matmul I/O 2 B x (in + out) per Linear per token, x3 in training (backward reads both, writes dX)
      logits     prefill 2V (bf16 write); train 16V (bf16 write + read, fp32 copy write + read, fp32 grad)
      GSS FFTs   fp32 rfft/product/irfft over [H, 2L]: ~48 B per channel per token, x3 in training
      DSS alone  (the dss part) its bf16 input and output, x3 in training: the function's own floor
    memory floor (capacity): train 16 B/param (fp32 weights, grads, Adam m and v) + the bf16 inputs of
      every Linear saved for backward + fp32 and bf16 logits (6V); prefill 4 B/param + bf16 logits."""
    tokens = seq_len * batch
    k = 3 if training else 1
    per_token = (
        k * 2 * sizes["linear_io"]
        + (16 if training else 2) * sizes["vocab"]
        + k * 48 * sizes["gss_h"]
        + k * sizes.get("io_bytes", 0)
    )
    min_bytes = tokens * per_token + sizes["n_params"] * (42 if training else 6)
    mem = sizes["n_params"] * (16 if training else 4) + tokens * (
        (2 * sizes["linear_in"] + 6 * sizes["vocab"]) if training else 2 * sizes["vocab"]
    )
    flops = flops_per_token * tokens
    t_flops, t_bytes = flops / peak_flops, min_bytes / bandwidth
    return {
        "flops_per_step": flops,
        "min_bytes_gb": min_bytes / 1e9,
        "mem_floor_gb": mem / 1e9,
        "floor_ms": 1e3 * max(t_flops, t_bytes),
        "floor_bound": "compute" if t_flops >= t_bytes else "memory",
    }


def workload_floors(
    workload: Workload, seq_len: int, batch: int, training: bool, peak_flops: float, bandwidth: float
) -> dict[str, Any]:
    """`floors` of one step of `workload`; without a known peak (NaN) no floor time or bound."""
    known = math.isfinite(peak_flops)
    out = floors(
        workload.sizes(),
        workload.flops_per_token(seq_len, training),
        seq_len,
        batch,
        training,
        peak_flops if known else 1.0,
        bandwidth,
    )
    if not known:
        out.update(floor_ms=float("nan"), floor_bound="")
    return out


def utilisation(flops_per_step: float, step_ms: float, peak_flops: float, datasheet: float) -> dict[str, float]:
    """Achieved TFLOP/s and MFU against the measured (or configured) peak and the datasheet."""
    achieved = flops_per_step / (step_ms / 1e3)
    return {
        "tflops": achieved / 1e12,
        "mfu_measured_peak": achieved / peak_flops,
        "mfu_datasheet": achieved / datasheet,
    }


def decode_floors(
    workload: Workload,
    context: int,
    batch: int,
    prompt: int,
    cache_dtype_bytes: int,
    peak_flops: float,
    bandwidth: float,
) -> dict[str, Any]:
    """The floor of one decode step of a preset (one token for each of `batch` sequences at `context`), and of the
    prefill of its `prompt` tokens before it (`prefill_floor_ms`).

    decode bytes: the weights once at `cache_dtype_bytes` per parameter (bf16 on a GPU: the decode part runs its
      steps in one autocast region, whose weight cache casts them once), the inference cache once (analytic,
      pha_lab.models.memory: every KV cache at `context`, every window, every GSS state), the logits; FLOPs:
      `batch` x the forward FLOPs per token at `context` (attention against the context or the window: what one
      new token does), without GSS's FFT part (a step runs the recurrence).
    prefill: `floors` of a forward over batch x prompt tokens with the LM head on the last token only (prefill's
      last_only), so neither the per-token logits' bytes nor their FLOPs count."""
    known = math.isfinite(peak_flops)
    peak = peak_flops if known else 1.0
    model, sizes = workload.module, workload.sizes()
    head = 2.0 * model.lm_head.weight.numel()
    parts = model.flops_per_token(context, training=False)
    flops = batch * (parts["total"] - parts["fft"])
    cache = model.cache_bytes(batch, context, cache_dtype_bytes)
    moved = cache_dtype_bytes * (sizes["n_params"] + batch * sizes["vocab"]) + cache
    t_flops, t_bytes = flops / peak, moved / bandwidth
    pre = floors(
        {**sizes, "vocab": 0},
        model.flops_per_token(prompt, training=False)["total"] - head,
        prompt,
        batch,
        False,
        peak,
        bandwidth,
    )
    pre_ms = pre["floor_ms"] + 1e3 * batch * head / peak
    out = {
        "flops_per_step": flops,
        "min_bytes_gb": moved / 1e9,
        "mem_floor_gb": (4 * sizes["n_params"] + cache) / 1e9,
        "floor_ms": 1e3 * max(t_flops, t_bytes),
        "floor_bound": "compute" if t_flops >= t_bytes else "memory",
        "prefill_floor_ms": pre_ms,
    }
    if not known:
        out.update(floor_ms=float("nan"), floor_bound="", prefill_floor_ms=float("nan"))
    return out
