"""Does the suite's training loop cost throughput? The same LMModule, batch and optimiser, trained by

  loop_plain      a hand-written loop: autocast forward + loss, backward, the module's
                  on_before_optimizer_step, grad clipping, optimizer and LR-scheduler step, no host
                  synchronisation (the best a loop can do)
  loop_lightning  `lightning.Trainer.fit` as `pha_lab.training.run` configures it: the suite's per-step
                  callbacks (ThroughputMonitor, PeakMemory, LearningRateMonitor, progress bar, interruption
                  handler), an MLflow logger, gradient clipping, bf16-mixed precision

The two loops alternate for `rounds` rounds on one module (compiled once), over the same random-token
DataLoader. Each step is the interval between consecutive batch starts (timing.Clock, ticked from inside
the loop), so whatever a loop does between steps (data transfer, callbacks, logging, host syncs) is
counted. Checkpointing and validation are off: they run every few hundred steps in real training and are
not per-step overhead. This module imports Lightning: pha_lab.bench.efficiency loads it only for this part.
"""

from __future__ import annotations

import functools
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset

from pha_lab.bench.spec import OVERHEAD_LOOPS, Cell, OverheadSpec, overhead_cells
from pha_lab.bench.timing import Clock, autocast, free_memory, measure
from pha_lab.config import load_config
from pha_lab.training.module import LMModule
from pha_lab.training.optim import build_optimizer, build_schedule
from pha_lab.training.run import per_step_callbacks


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


def plain_loop(
    module: LMModule, loader: DataLoader, device: torch.device, amp, precision: str, clock: Clock, first: int
) -> None:
    """What Lightning does per step with LMModule, written out by hand (the optimizer and LR schedule that
    LMModule.configure_optimizers uses, from training/optim.py, without needing a Trainer). Ticks `clock` at the
    start of every step from `first` on, and once after the last."""
    module.to(device).train()
    cfg = module.cfg
    opt = build_optimizer(module.model, cfg.optim, device, precision)
    sched = build_schedule(opt, cfg.optim, cfg.trainer.max_steps)
    for n, batch in enumerate(loader):
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        if n >= first:
            clock.tick()
        with amp:
            _, nll, count = module._losses(batch)
            loss = nll / count.clamp_min(1)
        loss.backward()
        module.on_before_optimizer_step(opt)  # the module's own per-step work: gradient clipping
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    clock.tick()


class _Tick(L.Callback):
    """Ticks the clock at each batch start from step `first` on, and after the last batch."""

    def __init__(self, clock: Clock, first: int, n_batches: int):
        self.clock, self.first, self.n_batches = clock, first, n_batches

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx >= self.first:
            self.clock.tick()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == self.n_batches - 1:
            self.clock.tick()


def lightning_loop(
    module: LMModule, loader: DataLoader, device: torch.device, precision: str, clock: Clock, first: int, workdir: Path
) -> None:
    """Trainer.fit with the callbacks `train` attaches to every step (checkpointing and validation-time
    introspection left out: they do not run per step)."""
    cfg = module.cfg
    try:
        # here, not at the top: mlflow may be missing on a GPU image; the loop is then timed without a logger
        from lightning.pytorch.loggers import MLFlowLogger

        logger = MLFlowLogger(experiment_name="bench-overhead", tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
        _ = logger.run_id  # create the run now, as run.py does before fit, not inside the timed steps
    except ImportError:
        logger = False
    trainer = L.Trainer(
        max_steps=len(loader),
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=1,
        precision=precision,
        logger=logger,
        callbacks=[*per_step_callbacks(cfg, workdir), _Tick(clock, first, len(loader))],
        log_every_n_steps=cfg.trainer.log_every_n_steps,
        enable_checkpointing=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        enable_model_summary=False,
        default_root_dir=workdir,
    )
    trainer.fit(module, train_dataloaders=loader)


def timed_loop(
    mode: str,
    module: LMModule,
    data: Dataset,
    o: OverheadSpec | DictConfig,
    device: torch.device,
    amp,
    precision: str,
    workdir: Path,
) -> Callable[[], list[float]]:
    """timing.measure's `timed` for one loop: runs it over a fresh DataLoader and returns its step intervals."""
    loader = DataLoader(data, batch_size=o.batch_size, shuffle=False, pin_memory=device.type == "cuda")
    clock = Clock(device)

    def timed() -> list[float]:
        if mode == "loop_plain":
            plain_loop(module, loader, device, amp, precision, clock, o.warmup)
        else:
            lightning_loop(module, loader, device, precision, clock, o.warmup, workdir)
        return clock.intervals_ms()

    return timed


def measure_loops(
    o: OverheadSpec | DictConfig, device: torch.device, dtype: torch.dtype, part: str = "overhead"
) -> Iterator[tuple[Cell, dict]]:
    """Yield (Cell, result) for each loop of each round (spec.overhead_cells); results as timing.measure's."""
    total = o.warmup + o.steps
    cfg = load_config(
        o.model,
        [
            f"data.seq_len={o.seq_len}",
            f"data.batch_size={o.batch_size}",
            f"trainer.compile={o.compile}",
            f"trainer.max_steps={total}",
        ],
    )
    torch.manual_seed(0)
    module = LMModule(cfg)  # compiled once (trainer.compile), shared by every round of both loops
    data = RandomTokens(total * o.batch_size, o.seq_len, cfg.model.vocab_size)
    amp = autocast(device, dtype)
    precision = {torch.bfloat16: "bf16-mixed", torch.float16: "16-mixed"}.get(dtype, "32-true")
    if device.type != "cuda":
        precision = "32-true"
    tokens = o.seq_len * o.batch_size
    with tempfile.TemporaryDirectory(prefix="pha-bench-") as tmp:
        for i, cell in enumerate(overhead_cells(o, part)):
            r = i // len(OVERHEAD_LOOPS)
            prepare = functools.partial(
                timed_loop, cell.mode, module, data, o, device, amp, precision, Path(tmp) / f"r{r}"
            )
            result = measure(prepare, tokens, device)
            if result["status"] == "ok":
                result["note"] = f"round {r + 1}/{o.rounds}; mean {tokens / (result['step_ms_mean'] / 1e3):,.0f} tok/s"
            module.zero_grad(set_to_none=True)
            free_memory(device)
            yield cell, result
    del module
    free_memory(device)
