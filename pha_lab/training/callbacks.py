"""Callbacks: mixer/branch introspection, peak memory, and clean interruption (SIGINT/SIGTERM).

Throughput and MFU come from Lightning's own `ThroughputMonitor` (configured in run.py); the
LR from `LearningRateMonitor`.
"""

from __future__ import annotations

import signal
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.utilities.exceptions import SIGTERMException


class RunInterrupted(Exception):
    """SIGINT/SIGTERM arrived: stop at the next batch boundary, checkpoint, mark the run KILLED."""


def is_interruption(exc: BaseException) -> bool:
    return isinstance(exc, (RunInterrupted, SIGTERMException, KeyboardInterrupt))


_stop_request: str | None = None


def request_stop(reason: str | None) -> None:
    """Make the running fit (or the next one in this process) stop as on SIGTERM; None withdraws it.
    For a launcher's own warning signal: submitit's SIGUSR2 ahead of a SLURM time limit (sweep/slurm.py)."""
    global _stop_request
    _stop_request = reason


class Interruption(L.Callback):
    """Turns SIGINT/SIGTERM (or `request_stop`) into a checkpoint at a batch boundary (`last.ckpt`) and a clean stop.

    The handlers only set a flag; the exception is raised after the optimizer step of the current
    batch, so the checkpoint holds a consistent (weights, optimizer, step) triple to resume from.
    Under DDP all ranks stop at the same step when any rank got the signal."""

    def __init__(self, ckpt_path: Path):
        self.ckpt_path = Path(ckpt_path)
        self.requested: str | None = None
        self._previous: dict[int, object] = {}

    def _handler(self, signum, frame) -> None:
        self.requested = signal.Signals(signum).name

    def on_fit_start(self, trainer, pl_module) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread: leave signals to the caller
                pass

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.requested = self.requested or _stop_request
        if trainer.strategy.reduce_boolean_decision(bool(self.requested), all=False):
            raise RunInterrupted(f"{self.requested or 'another rank'} received at step {trainer.global_step}")

    def on_exception(self, trainer, pl_module, exception) -> None:
        if is_interruption(exception):
            trainer.save_checkpoint(self.ckpt_path)
        self._restore()

    def on_fit_end(self, trainer, pl_module) -> None:
        self._restore()

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


class TokensProgressBar(TQDMProgressBar):
    """Lightning's TQDM bar, showing training tokens/s (from the bar's own rate) next to the loss."""

    def get_metrics(self, trainer, pl_module) -> dict:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        bar = self._train_progress_bar
        fmt = bar.format_dict if bar is not None else {}
        rate = fmt.get("rate") or (fmt["n"] / fmt["elapsed"] if fmt.get("elapsed") and fmt.get("n") else None)
        if rate:
            d = pl_module.cfg.data
            items["tok/s"] = f"{rate * d.batch_size * d.seq_len / trainer.accumulate_grad_batches:,.0f}"
        return items


class PeakMemory(L.Callback):
    """CUDA peak allocated memory (GB) at each logging step."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if torch.cuda.is_available() and pl_module.device.type == "cuda":
            if (trainer.global_step % trainer.log_every_n_steps) == 0:
                pl_module.log("train/peak_mem_gb", torch.cuda.max_memory_allocated(pl_module.device) / 1e9)


class MixerIntrospection(L.Callback):
    """At every validation: each layer's mixer weights and each branch's output RMS (on the first
    validation batch) as metrics `mixer/L{i}/{branch}` and `rms/L{i}/{branch}`. At the end of fit:
    a per-layer x per-branch table (`mixer_weights.csv`) and heatmap (`mixer_weights.png`),
    the paper's "sandwich" figure for one run, as MLflow artifacts."""

    def __init__(self, out_dir: Path):
        self.out_dir = Path(out_dir)
        self.rms: list[dict[str, float]] = []

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if batch_idx == 0 and not trainer.sanity_checking:
            self._recorder = pl_module.model.recording_stats()
            self.rms = self._recorder.__enter__()

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if batch_idx == 0 and not trainer.sanity_checking:
            self._recorder.__exit__(None, None, None)
            self.rms = [dict(layer) for layer in self.rms]

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        metrics = {}
        for i, (weights, rms) in enumerate(zip(pl_module.model.mixer_weights(), self.rms)):
            metrics.update({f"mixer/L{i}/{b}": w for b, w in weights.items()})
            metrics.update({f"rms/L{i}/{b}": r for b, r in rms.items()})
        pl_module.log_dict(metrics)

    def table(self, pl_module):
        import pandas as pd

        rows = []
        for i, (weights, rms) in enumerate(zip(pl_module.model.mixer_weights(), self.rms or [{}] * len(pl_module.model.blocks))):
            for b in pl_module.model.blocks[i].names:
                rows.append({"layer": i, "branch": b, "weight": weights.get(b, float("nan")), "rms": rms.get(b, float("nan"))})
        return pd.DataFrame(rows)

    def on_fit_end(self, trainer, pl_module) -> None:
        if trainer.global_rank != 0:
            return
        from pha_lab.analysis.figures import mixer_heatmap

        self.out_dir.mkdir(parents=True, exist_ok=True)
        long = self.table(pl_module)
        wide = long.pivot(index="layer", columns="branch", values="weight").reindex(
            columns=[b for b in ("gss", "attn", "ffn") if b in set(long.branch)]
        )
        csv, png = self.out_dir / "mixer_weights.csv", self.out_dir / "mixer_weights.png"
        long.to_csv(csv, index=False)
        mixer_heatmap(wide, png, title=f"mixer weights ({pl_module.cfg.model.mixer})")
        for logger in trainer.loggers:
            if isinstance(logger, L.pytorch.loggers.MLFlowLogger):
                logger.experiment.log_artifact(logger.run_id, str(csv))
                logger.experiment.log_artifact(logger.run_id, str(png))
