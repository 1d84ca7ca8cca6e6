"""The `decode` part of `pha-lab bench`: per preset x context x batch, the prefill of a prompt, then tokens one at a
time from the model's decoding state (pha_lab.models.decoding), and the bytes that state holds.

A cell (spec.DecodeSpec): a prompt of P = context - warmup - steps random tokens; `prefill_ms` is the median of
`prefill_repeats` timed prefills (after `prefill_warmup` untimed ones), each from a fresh state made for
max_len = context (init_state + prefill with last_only, so no [B, T, V] logits). The last prefill's state is
decoded from: `warmup` untimed then `steps` timed steps of one token per sequence (random tokens fed in, not
sampled: sampling is not the model's speed), so the last token sits at position context - 1 and the state is full
when the cell ends. Both loops are timing.time_steps (CUDA events), the cell one timing.measure.

Columns: decode_tok_s = batch / median step (all sequences together; also `tokens_per_s`), decode_tok_s_per_seq =
1 / median step; cache_bytes_analytic = LanguageModel.cache_bytes(batch, context, bytes of the cache dtype),
cache_bytes_measured = the bytes of the state's tensors after the cell (DecodeState.nbytes); on a GPU peak_mem_gb
is the whole cell's peak (the prefill's activations included) and decode_peak_mem_gb the peak while decoding
(weights, cache, one step's temporaries). On a GPU the model runs under bf16 autocast with fp32 weights, as every
other part, each loop inside one autocast region (whose weight cache makes the bf16 copies once, so a step reads
bf16 weights), and keeps its KV caches in bf16 (GSS's state is complex64 whatever the dtype); on a CPU, fp32.

A cell whose analytic cache plus weights exceed `max_cache_gb` (default: the GPU's memory) is a skipped row naming
both; an out-of-memory cell or any error is a row with its status, and the run goes on. Eager PyTorch only: no CUDA
graphs, so at batch 1 a step's time is mostly its kernel launches (docs/perf-notes.md).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from omegaconf import DictConfig

from pha_lab.bench.spec import Cell
from pha_lab.bench.timing import free_memory, measure, time_steps
from pha_lab.bench.workloads import make_workload
from pha_lab.models.memory import weight_bytes


def prompt_len(cell: Cell) -> int:
    """The prompt a decode cell prefills: its context less the tokens it decodes."""
    return cell.seq_len - cell.warmup - cell.steps


def cache_limit_gb(d: DictConfig, device: torch.device) -> float:
    if d.max_cache_gb is not None:
        return float(d.max_cache_gb)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory / 1e9
    return float("inf")


def run_decode(
    spec: DictConfig,
    cells: list[Cell],
    device: torch.device,
    dtype: torch.dtype,
    amp,
    add: Callable[[Cell, dict], None],
    skip: Callable[[list[Cell]], None],
    deadline: float,
) -> None:
    """The decode cells, model by model (each built once on the device); `add` records a row, `skip` the cells past
    the time budget."""
    limit = cache_limit_gb(spec.decode, device)
    for name in dict.fromkeys(c.model for c in cells):
        group = [c for c in cells if c.model == name]
        if time.monotonic() > deadline:
            skip(group)
            continue
        torch.manual_seed(spec.seed)
        try:
            model = make_workload(name, device).module.eval()
        except torch.cuda.OutOfMemoryError as exc:
            for cell in group:
                add(cell, {"status": "OOM", "note": f"building the model: {str(exc).splitlines()[0][:200]}"})
            free_memory(device)
            continue
        for cell in group:
            if time.monotonic() > deadline:
                skip([cell])
            else:
                add(cell, decode_cell(cell, model, spec.decode, device, dtype, amp, limit))
        model = None
        free_memory(device)


def decode_cell(
    cell: Cell, model, d: DictConfig, device: torch.device, dtype: torch.dtype, amp, limit_gb: float
) -> dict:
    """One cell's result row (see the module docstring)."""
    batch, context, prompt = cell.batch_size, cell.seq_len, prompt_len(cell)
    analytic = model.cache_bytes(batch, context, dtype.itemsize)
    need_gb = (analytic + weight_bytes(model)) / 1e9
    if need_gb > limit_gb:
        return {
            "status": "skipped",
            "cache_bytes_analytic": analytic,
            "note": f"cache {analytic / 1e9:.3g} GB + weights = {need_gb:.3g} GB > {limit_gb:.3g} GB "
            f"(decode.max_cache_gb, default the GPU's memory)",
        }
    cuda = device.type == "cuda"
    info: dict = {}

    def prepare():
        gen = torch.Generator(device=device).manual_seed(context * 7919 + batch)
        ids = torch.randint(1, model.cfg.vocab_size, (batch, context), device=device, generator=gen)
        held: dict = {}

        def prefill() -> None:
            held.pop("state", None)  # the previous state is freed before the next one is made
            state = model.init_state(batch, context, device=device, dtype=dtype)
            model.prefill(ids[:, :prompt], state, last_only=True)
            held["state"] = state

        def timed() -> list[float]:
            # each loop inside one autocast region: its weight cache casts the fp32 weights to bf16 once (in the
            # warm-up), so a step reads bf16 weights, as a model served in bf16 does
            with amp:
                info["prefill_ms"] = time_steps(prefill, d.prefill_warmup, d.prefill_repeats, device)
            if cuda:
                info["prefill_peak_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
                torch.cuda.reset_peak_memory_stats(device)
            state = held["state"]
            tokens = iter(ids[:, prompt:].unbind(1))
            with amp:
                times = time_steps(lambda: model.step(next(tokens), state), cell.warmup, cell.steps, device)
            info["measured"], info["pos"] = state.nbytes(), state.pos
            return times

        return timed

    result = measure(prepare, batch, device)
    result["cache_bytes_analytic"] = analytic
    if result["status"] != "ok":
        free_memory(device)
        return result
    prefill_ms = statistics.median(info["prefill_ms"])
    result.update(
        prefill_ms=prefill_ms,
        prefill_tok_s=batch * prompt / (prefill_ms / 1e3),
        decode_tok_s=result["tokens_per_s"],
        decode_tok_s_per_seq=1e3 / result["step_ms_median"],
        cache_bytes_measured=info["measured"],
    )
    if info["pos"] != context:  # by construction it is; a row that says otherwise would mislead
        result.update(status="error", note=f"decoded up to position {info['pos']}, not the context {context}")
    if cuda:
        result["decode_peak_mem_gb"] = result["peak_mem_gb"]
        result["peak_mem_gb"] = max(result["peak_mem_gb"], info["prefill_peak_gb"])
    return result
