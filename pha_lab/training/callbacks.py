"""Callbacks: mixer/branch introspection, peak memory, throughput, and clean interruption (SIGINT/SIGTERM).

Throughput and MFU come from Lightning's own `ThroughputMonitor`, synchronised with the device at logging steps
only (`ThroughputAtLogSteps`, configured in run.py); the LR from `LearningRateMonitor`. Nothing here waits for
the device between logging steps.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ThroughputMonitor, TQDMProgressBar
from lightning.pytorch.trainer.states import RunningStage, TrainerFn
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException

from pha_lab.branches import BRANCH_REGISTRY
from pha_lab.data.batch import IGNORE_INDEX


class RunInterrupted(Exception):
    """SIGINT/SIGTERM arrived: stop after the next optimizer step, checkpoint, mark the run KILLED.

    `run_id` and `ckpt_path` (None while raised inside the fit) name the run to resume and its checkpoint."""

    def __init__(self, message: str, run_id: str | None = None, ckpt_path: Path | None = None):
        super().__init__(message)
        self.run_id, self.ckpt_path = run_id, ckpt_path


def is_interruption(exc: BaseException) -> bool:
    return isinstance(exc, (RunInterrupted, SIGTERMException, KeyboardInterrupt))


_stop_request: str | None = None


def request_stop(reason: str | None) -> None:
    """Make the running fit (or the next one in this process) stop as on SIGTERM; None withdraws it.
    For a launcher's own warning signal: submitit's SIGUSR2 ahead of a SLURM time limit (sweep/slurm.py)."""
    global _stop_request
    _stop_request = reason


class Interruption(L.Callback):
    """Turns SIGINT/SIGTERM (or `request_stop`) into a checkpoint (`last.ckpt`) and a clean stop right after an
    optimizer step.

    The handlers only set a flag; the exception is raised at the end of a batch that completes an optimizer step
    (never inside a gradient accumulation), so the checkpoint holds a consistent (weights, optimizer, step, data
    position) to resume from exactly. While training, they replace Lightning's own SIGTERM handler, which would
    stop after the current micro-batch.

    One process: it stops after the first optimizer step that ends after the signal. Under DDP the signal may
    reach the ranks at different steps, and a rank that stopped alone would leave the others blocked in the next
    all-reduce, so the ranks decide together (any rank's flag stops all of them: `reduce_boolean_decision`, an
    all-reduce of one integer and a host read) only at the logging steps (every `trainer.log_every_n_steps`-th
    optimizer step, where the step path touches the host anyway) and at the last step. The price is latency: up
    to log_every_n_steps - 1 more optimizer steps after the signal (a SLURM warning signal must leave time for
    them and the checkpoint), and a signal after the last decision before an EarlyStopping stop is not honoured
    (the run ends as it would have without it)."""

    def __init__(self, ckpt_path: Path):
        self.ckpt_path = Path(ckpt_path)
        self.requested: str | None = None
        self._previous: dict[int, object] = {}
        self._step = 0

    def _handler(self, signum, frame) -> None:
        self.requested = signal.Signals(signum).name

    def on_train_start(self, trainer, pl_module) -> None:
        self._step = trainer.global_step
        for sig in (signal.SIGINT, signal.SIGTERM):  # after Lightning installed its handlers for this fit
            try:
                self._previous[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread: leave signals to the caller
                pass

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        stepped, self._step = trainer.global_step != self._step, trainer.global_step
        if not stepped:  # inside a gradient accumulation
            return
        self.requested = self.requested or _stop_request
        if trainer.world_size == 1:
            stop = self.requested is not None
        elif trainer.global_step % trainer.log_every_n_steps == 0 or trainer.global_step >= trainer.max_steps:
            stop = trainer.strategy.reduce_boolean_decision(self.requested is not None, all=False)
        else:
            return  # (every rank is at the same step: they all take or skip the decision together)
        if stop:
            raise RunInterrupted(
                f"{self.requested or 'a signal to another rank'} received; stopped after step {trainer.global_step}"
            )

    def on_exception(self, trainer, pl_module, exception) -> None:
        if is_interruption(exception):
            trainer.save_checkpoint(self.ckpt_path)
        self._restore()

    def on_train_end(self, trainer, pl_module) -> None:
        self._restore()  # before Lightning's teardown puts back the handlers it found

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


class TokensProgressBar(TQDMProgressBar):
    """Lightning's TQDM bar, showing the training loss and tokens/s (from the bar's own rate). Give it
    refresh_rate = log_every_n_steps x accumulation: the loss is read from the device only when the bar refreshes."""

    def get_metrics(self, trainer, pl_module) -> dict:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        loss = trainer.callback_metrics.get("train/loss")
        if loss is not None:
            items["train/loss"] = f"{float(loss):.3f}"
        bar = self._train_progress_bar
        fmt = bar.format_dict if bar is not None else {}
        rate = fmt.get("rate") or (fmt["n"] / fmt["elapsed"] if fmt.get("elapsed") and fmt.get("n") else None)
        if rate:
            d = pl_module.cfg.data  # the bar counts micro-batches, whatever the accumulation
            items["tok/s"] = f"{rate * d.batch_size * d.seq_len:,.0f}"
        return items


class ThroughputAtLogSteps(ThroughputMonitor):
    """Lightning's ThroughputMonitor (tokens/s, FLOP/s, MFU), timing training at its logging steps only.

    The stock monitor calls `torch.cuda.synchronize()` after every batch so that its clock sees the device's
    time; this one counts every batch's samples, tokens and FLOPs on the host and synchronises only where it
    records a time point: at logging steps (where the loggers read the device anyway) and before a validation
    (so that the validation time it takes out of training's clock starts at a synchronised point). Its window
    (`window_size`) therefore counts time points, each `log_every_n_steps` steps apart. Validation and test are
    timed per batch as by the stock monitor (their loop reads every batch's loss anyway)."""

    def on_train_start(self, trainer, *args) -> None:
        super().on_train_start(trainer, *args)
        self._pending = [0, 0, 0, 0.0]  # batches, samples, tokens, FLOPs since the last time point

    @rank_zero_only
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, *args) -> None:
        p = self._pending
        p[0] += 1
        p[1] += self.batch_size_fn(batch)
        p[2] += self.length_fn(batch) if self.length_fn is not None else 0
        p[3] += pl_module.flops_per_batch
        if not trainer.fit_loop._should_accumulate() and trainer._logger_connector.should_update_logs:
            self._time_point(trainer)
            self._compute(trainer)

    def on_validation_start(self, trainer, *args) -> None:
        if trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking and trainer.is_global_zero:
            self._time_point(trainer)
        super().on_validation_start(trainer, *args)

    def _time_point(self, trainer) -> None:
        """One synchronised training measurement covering the batches since the previous one."""
        batches, samples, tokens, flops = self._pending
        if not batches:
            return
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()  # the clock must see the device's time
        stage = RunningStage.TRAINING
        self._batches[stage] += batches
        self._samples[stage] += samples
        self._lengths[stage] += tokens
        self._throughputs[stage].update(
            time=time.perf_counter() - self._t0s[stage],
            batches=self._batches[stage],
            samples=self._samples[stage],
            lengths=self._lengths[stage] if self.length_fn is not None else None,
            flops=flops,
        )
        self._pending = [0, 0, 0, 0.0]


class CudaMemory:
    """The device's peak-allocation counter (None off CUDA): what PeakMemory reads and resets."""

    @staticmethod
    def reset(device: torch.device) -> None:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

    @staticmethod
    def peak_gb(device: torch.device) -> float | None:
        return torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None


class PeakMemory(L.Callback):
    """Peak allocated device memory (GB) per stage: `train/peak_mem_gb` (the running peak of this fit's
    training), `val/peak_mem_gb` and `test/peak_mem_gb` (each evaluation's peak).

    The counter is reset when each stage starts, so nothing carries over from an earlier run in the same
    process (a sweep worker) or from validation into training."""

    def __init__(self, memory=None):
        self.memory = memory or CudaMemory()
        self.train_peak = 0.0

    def on_train_start(self, trainer, pl_module) -> None:
        self.train_peak = 0.0
        self.memory.reset(pl_module.device)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % trainer.log_every_n_steps:
            return  # logged at the logging steps only (a logged float becomes a device tensor)
        peak = self.memory.peak_gb(pl_module.device)
        if peak is not None:
            pl_module.log("train/peak_mem_gb", max(self.train_peak, peak), on_step=True, on_epoch=False)

    def on_validation_start(self, trainer, pl_module) -> None:
        peak = self.memory.peak_gb(pl_module.device)
        if peak is not None and trainer.state.fn == TrainerFn.FITTING:  # keep training's peak so far
            self.train_peak = max(self.train_peak, peak)
        self.memory.reset(pl_module.device)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        self._log_eval("val", pl_module)

    def on_validation_end(self, trainer, pl_module) -> None:
        self.memory.reset(pl_module.device)  # training goes on from here; its earlier peak is in train_peak

    def on_test_start(self, trainer, pl_module) -> None:
        self.memory.reset(pl_module.device)

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self._log_eval("test", pl_module)

    def _log_eval(self, stage: str, pl_module) -> None:
        peak = self.memory.peak_gb(pl_module.device)
        if peak is not None:
            pl_module.log(f"{stage}/peak_mem_gb", peak, sync_dist=True, reduce_fx="max")


class MixerIntrospection(L.Callback):
    """At every validation: each layer's mixer weights and each branch's output RMS (on the first
    validation batch) as metrics `mixer/L{i}/{branch}` and `rms/L{i}/{branch}`. An input-dependent mixer
    (gate) reports its mean weights over the validation set's scored tokens (labels != IGNORE_INDEX: padding
    excluded), token-weighted over all batches and ranks. At the end of fit: the last validation's
    per-layer x per-branch table (`mixer_weights.csv`) and heatmap (`mixer_weights.png`), the paper's
    "sandwich" figure for one run, as MLflow artifacts."""

    def __init__(self, out_dir: Path):
        self.out_dir = Path(out_dir)
        self.rms: list[dict[str, float]] = []
        self.weights: list[dict[str, float]] = []  # as logged at the last validation
        self._gate_sums: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # layer -> (sum of gates, tokens)

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._gate_sums = {}

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if batch_idx == 0 and not trainer.sanity_checking:
            self._recorder = pl_module.model.recording_stats()
            self.rms = self._recorder.__enter__()

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if trainer.sanity_checking:
            return
        if batch_idx == 0:
            self._recorder.__exit__(None, None, None)
            self.rms = [dict(layer) for layer in self.rms]
        scored = (batch["labels"] != IGNORE_INDEX).unsqueeze(-1)
        for i, blk in enumerate(pl_module.model.blocks):
            gates = blk.mixer.token_weights() if hasattr(blk, "mixer") else None
            if gates is not None:  # summed on the device: no sync per batch
                total, count = self._gate_sums.get(i, (0.0, 0.0))
                self._gate_sums[i] = (total + (gates.double() * scored).sum(dim=(0, 1)), count + scored.sum())

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        self.weights = pl_module.model.mixer_weights()
        for i, (total, count) in self._gate_sums.items():
            total = trainer.strategy.reduce(total, reduce_op="sum")
            count = trainer.strategy.reduce(count.double(), reduce_op="sum")
            self.weights[i] = dict(zip(pl_module.model.blocks[i].names, (total / count.clamp_min(1)).tolist()))
        metrics = {}
        for i, (weights, rms) in enumerate(zip(self.weights, self.rms)):
            metrics.update({f"mixer/L{i}/{b}": w for b, w in weights.items()})
            metrics.update({f"rms/L{i}/{b}": r for b, r in rms.items()})
        pl_module.log_dict(metrics)

    def table(self, pl_module):
        import pandas as pd

        weights = self.weights or pl_module.model.mixer_weights()
        rows = []
        for i, (w, rms) in enumerate(zip(weights, self.rms or [{}] * len(pl_module.model.blocks))):
            for b in pl_module.model.blocks[i].names:
                rows.append(
                    {"layer": i, "branch": b, "weight": w.get(b, float("nan")), "rms": rms.get(b, float("nan"))}
                )
        return pd.DataFrame(rows)

    def on_fit_end(self, trainer, pl_module) -> None:
        if trainer.global_rank != 0:
            return
        from pha_lab.analysis.figures import mixer_heatmap

        self.out_dir.mkdir(parents=True, exist_ok=True)
        long = self.table(pl_module)
        wide = long.pivot(index="layer", columns="branch", values="weight").reindex(
            columns=[b for b in BRANCH_REGISTRY if b in set(long.branch)]
        )
        csv, png = self.out_dir / "mixer_weights.csv", self.out_dir / "mixer_weights.png"
        long.to_csv(csv, index=False)
        mixer_heatmap(wide, png, title=f"mixer weights ({pl_module.cfg.model.mixer})")
        for logger in trainer.loggers:
            if isinstance(logger, L.pytorch.loggers.MLFlowLogger):
                logger.experiment.log_artifact(logger.run_id, str(csv))
                logger.experiment.log_artifact(logger.run_id, str(png))
