"""Does the suite's training loop cost throughput? The same LMModule, batch and optimiser, trained by

  loop_plain      a hand-written loop: autocast forward + loss, backward, the module's
                  on_before_optimizer_step, grad clipping, optimizer and LR-scheduler step, no host
                  synchronisation (the best a loop can do)
  loop_lightning  `lightning.Trainer.fit` as `pha_lab.training.run` configures it: the suite's per-step
                  callbacks (ThroughputMonitor, PeakMemory, LearningRateMonitor, progress bar, interruption
                  handler), an MLflow logger, gradient clipping, bf16-mixed precision

The two loops alternate for `rounds` rounds on one module (compiled once), over the same random-token
DataLoader. Each step is the interval between consecutive batch starts, so whatever a loop does between
steps (data transfer, callbacks, logging, host syncs) is counted. Checkpointing and validation are off:
they run every few hundred steps in real training and are not per-step overhead.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader, Dataset


class RandomTokens(Dataset):
    """`n` windows of random token ids in [1, vocab), deterministic per index; LMModule's batch format."""

    def __init__(self, n: int, seq_len: int, vocab: int, seed: int = 0):
        self.n, self.seq_len, self.vocab, self.seed = n, seq_len, vocab, seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        ids = torch.randint(1, self.vocab, (self.seq_len + 1,), generator=g)
        return {"input_ids": ids[:-1], "labels": ids[1:]}


class Clock:
    """Marks at step boundaries (CUDA events on a GPU, the wall clock on a CPU); intervals in ms."""

    def __init__(self, device: torch.device, first: int):
        self.device, self.first, self.marks = device, first, []

    def tick(self, step: int) -> None:
        if step < self.first:
            return
        if self.device.type == "cuda":
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.marks.append(ev)
        else:
            self.marks.append(time.perf_counter())

    def intervals_ms(self) -> list[float]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return [a.elapsed_time(b) for a, b in zip(self.marks, self.marks[1:])]
        return [1e3 * (b - a) for a, b in zip(self.marks, self.marks[1:])]


def plain_loop(module, loader: DataLoader, device: torch.device, amp, clock: Clock) -> None:
    """What Lightning does per step with LMModule, written out by hand (its optimizer and LR schedule as
    LMModule.configure_optimizers builds them, without needing a Trainer)."""
    from pha_lab.training.module import lr_lambda, param_groups

    module.to(device).train()
    o, t = module.cfg.optim, module.cfg.trainer
    opt = torch.optim.AdamW(param_groups(module.model, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                            fused=(o.fused and device.type == "cuda") or None)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_lambda(s, o.warmup_steps, t.max_steps, o.min_lr_ratio))
    n = 0
    for n, batch in enumerate(loader):
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        clock.tick(n)
        with amp:
            _, nll, count = module._losses(batch)
            loss = nll / count.clamp_min(1)
        loss.backward()
        module.on_before_optimizer_step(opt)  # the module's own per-step work: gradient clipping
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    clock.tick(n + 1)


def lightning_loop(module, loader: DataLoader, device: torch.device, precision: str, clock: Clock, workdir: Path) -> None:
    """Trainer.fit with the callbacks `train` attaches to every step (checkpointing and validation-time
    introspection left out: they do not run per step)."""
    import lightning as L

    from pha_lab.training.run import per_step_callbacks

    class Tick(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            clock.tick(batch_idx)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == len(loader) - 1:
                clock.tick(batch_idx + 1)

    cfg = module.cfg
    try:
        from lightning.pytorch.loggers import MLFlowLogger

        logger = MLFlowLogger(experiment_name="bench-overhead", tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
        _ = logger.run_id  # create the run now, as run.py does before fit, not inside the timed steps
    except ImportError:
        logger = False
    trainer = L.Trainer(
        max_steps=len(loader), accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, precision=precision,
        logger=logger, callbacks=[*per_step_callbacks(cfg, workdir), Tick()],
        log_every_n_steps=cfg.trainer.log_every_n_steps,
        enable_checkpointing=False, limit_val_batches=0, num_sanity_val_steps=0, enable_model_summary=False,
        default_root_dir=workdir,
    )
    trainer.fit(module, train_dataloaders=loader)


def measure_loops(o, device: torch.device, dtype: torch.dtype, runs_dir: str) -> Iterator[tuple[Any, dict]]:
    """Yield (Cell, result) for each loop of each round; results as efficiency.run_cell's."""
    from pha_lab.bench.efficiency import Cell, autocast, free_memory, percentiles
    from pha_lab.config import load_config
    from pha_lab.training.module import LMModule

    total = o.warmup + o.steps
    cfg = load_config(o.model, [f"data.seq_len={o.seq_len}", f"data.batch_size={o.batch_size}",
                                f"trainer.compile={o.compile}", f"trainer.max_steps={total}"])
    torch.manual_seed(0)
    module = LMModule(cfg)  # compiled once (trainer.compile), shared by every round of both loops
    data = RandomTokens(total * o.batch_size, o.seq_len, cfg.model.vocab_size)
    amp = autocast(device, dtype)
    precision = {torch.bfloat16: "bf16-mixed", torch.float16: "16-mixed"}.get(dtype, "32-true")
    if device.type != "cuda":
        precision = "32-true"
    with tempfile.TemporaryDirectory(prefix="pha-bench-", dir=None) as tmp:
        for r in range(o.rounds):
            for mode in ("loop_plain", "loop_lightning"):
                cell = Cell("overhead", o.model, mode, o.seq_len, o.batch_size, o.compile, o.warmup, o.steps)
                loader = DataLoader(data, batch_size=o.batch_size, shuffle=False, pin_memory=device.type == "cuda")
                clock = Clock(device, o.warmup)
                result: dict[str, Any] = {"status": "ok", "note": f"round {r + 1}/{o.rounds}"}
                free_memory(device)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                t0 = time.perf_counter()
                try:
                    if mode == "loop_plain":
                        plain_loop(module, loader, device, amp, clock)
                    else:
                        lightning_loop(module, loader, device, precision, clock, Path(tmp) / f"r{r}")
                    times = clock.intervals_ms()
                    p10, p50, p90 = percentiles(times)
                    result.update(step_ms_median=p50, step_ms_p10=p10, step_ms_p90=p90,
                                  tokens_per_s=o.seq_len * o.batch_size / (p50 / 1e3),
                                  warmup_s=time.perf_counter() - t0 - sum(times) / 1e3)
                    result["note"] += f"; mean {o.seq_len * o.batch_size * len(times) / (sum(times) / 1e3):,.0f} tok/s"
                    if device.type == "cuda":
                        result["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
                except torch.cuda.OutOfMemoryError as exc:
                    result.update(status="OOM", note=str(exc).splitlines()[0][:300] if str(exc) else "out of memory")
                except Exception as exc:
                    import sys
                    import traceback

                    traceback.print_exc(file=sys.stderr)
                    result.update(status="error", note=f"{type(exc).__name__}: {str(exc)[:300]}")
                module.zero_grad(set_to_none=True)
                free_memory(device)
                yield cell, result
    del module
    free_memory(device)
