"""How the bench times anything: the one timing loop and what every measurement shares.

A measurement is marks at step boundaries (`Clock`): back-to-back CUDA events on a GPU, so the host may run
ahead and each interval is device time including any idle gap (a host-bound loop shows up); the wall clock
on a CPU. `time_steps` drives a step function through that clock; the overhead part ticks the same clock
from inside the loop it measures (a plain loop, Lightning's callbacks). `measure` turns the intervals into a
result row (median, p10/p90, tokens/s, warm-up seconds, peak memory since a reset), and an out-of-memory or
any other failure into a status, so one broken cell never costs the whole GPU call.

This module imports nothing from pha_lab: every other bench module builds on it.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any

import numpy as np
import torch


class Clock:
    """Marks at step boundaries (CUDA events on a GPU, `perf_counter` on a CPU); `intervals_ms` between them."""

    def __init__(self, device: torch.device):
        self.device, self.marks = device, []

    def tick(self) -> None:
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def intervals_ms(self) -> list[float]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return [a.elapsed_time(b) for a, b in zip(self.marks, self.marks[1:])]
        return [1e3 * (b - a) for a, b in zip(self.marks, self.marks[1:])]


def time_steps(step: Callable[[], Any], warmup: int, steps: int, device: torch.device) -> list[float]:
    """Milliseconds of each of `steps` calls after `warmup` untimed ones (see the module docstring)."""
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    clock = Clock(device)
    clock.tick()
    for _ in range(steps):
        step()
        clock.tick()
    return clock.intervals_ms()


def percentiles(times_ms: Sequence[float]) -> tuple[float, float, float]:
    """(p10, median, p90) of step times."""
    p10, p50, p90 = np.percentile(np.asarray(times_ms, dtype=float), [10, 50, 90])
    return float(p10), float(p50), float(p90)


def autocast(device: torch.device, dtype: torch.dtype) -> AbstractContextManager:
    """Autocast to `dtype` on a GPU; fp32 (no autocast) on a CPU or for dtype fp32."""
    if device.type == "cuda" and dtype != torch.float32:
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


def train_step(
    loss_of: Callable[[Any], torch.Tensor],
    batches: Sequence,
    optimizer: torch.optim.Optimizer,
    amp: AbstractContextManager,
) -> Callable[[], torch.Tensor]:
    """A function doing one training step per call on the next of `batches` (in turn): forward and loss
    under `amp`, backward, optimizer step, gradients set to None. It returns the (detached) loss."""
    batch_iter = itertools.cycle(batches)

    def step() -> torch.Tensor:
        with amp:
            loss = loss_of(next(batch_iter))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def prefill_step(forward: Callable[[Any], Any], batches: Sequence, amp: AbstractContextManager) -> Callable[[], None]:
    """A function running the inference forward of the next of `batches` per call (every position, as
    perplexity evaluation runs it) under inference_mode and `amp`."""
    batch_iter = itertools.cycle(batches)

    def step() -> None:
        with torch.inference_mode(), amp:
            forward(next(batch_iter))

    return step


def free_memory(device: torch.device) -> None:
    """Return cached blocks (and cyclic garbage holding tensors) so each cell's peak starts from the same
    floor; a GPU-only concern (gc.collect alone takes ~0.5 s on a CPU with MLflow and Lightning loaded)."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def measure(prepare: Callable[[], Callable[[], list[float]]], tokens_per_step: int, device: torch.device) -> dict:
    """One measurement as a result row. `prepare()` builds what is timed (inputs, compiled module,
    optimizer, data loader) and returns `timed`, which runs the warm-up and timed steps and returns the
    timed steps' milliseconds. Peak memory counts from after `prepare` (the cache of earlier cells freed);
    `warmup_s` is the time `timed` spent outside its timed steps (warm-up, compilation, start-up).

    Returns status "ok" with step_ms_median/p10/p90/mean, tokens_per_s, warmup_s and (GPU) peak_mem_gb, or
    status "OOM" / "error" with the message in `note` (the traceback of an error goes to stderr). After a
    failure the caller drops its own references to the cell's tensors and calls `free_memory`."""
    try:
        timed = prepare()
        free_memory(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        times = timed()
        elapsed = time.perf_counter() - t0
    except torch.cuda.OutOfMemoryError as exc:
        return {"status": "OOM", "note": _first_line(exc) or "out of memory"}
    except Exception as exc:  # record and go on: one broken cell must not cost the whole GPU call
        traceback.print_exc(file=sys.stderr)
        return {"status": "error", "note": f"{type(exc).__name__}: {_first_line(exc)}"}
    p10, p50, p90 = percentiles(times)
    result = {
        "status": "ok",
        "note": "",
        "step_ms_median": p50,
        "step_ms_p10": p10,
        "step_ms_p90": p90,
        "step_ms_mean": sum(times) / len(times),
        "tokens_per_s": tokens_per_step / (p50 / 1e3),
        "warmup_s": elapsed - sum(times) / 1e3,
    }
    if device.type == "cuda":
        result["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    return result


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0][:300] if str(exc) else ""
