"""Median pruning of sweep trials: report the objective to Optuna at the optimizer step.

optuna-integration's PyTorchLightningPruningCallback reports at `trainer.current_epoch`. A run here
is one long epoch with a validation every `trainer.val_every_n_steps` steps, so all its reports land
on step 0, Optuna keeps the first, and a pruner with `n_warmup_steps > 0` never prunes anything.
"""

from __future__ import annotations

import lightning as L
import optuna
from lightning.pytorch.loggers import MLFlowLogger


class PruneAtStep(L.Callback):
    """After each validation: `trial.report(monitor, step=global_step)`, and stop the run with
    optuna.TrialPruned when the pruner says so, tagging its MLflow run `pruned_at_step` (MLflow has
    no PRUNED status: the run ends KILLED, see run.train). Single-process runs only: the sweep
    refuses pruning with gpus_per_trial > 1, where every rank would have to agree to stop."""

    def __init__(self, trial: optuna.Trial, monitor: str):
        self.trial, self.monitor = trial, monitor

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            raise RuntimeError(
                f"pruning: the validation logged no '{self.monitor}' (the sweep's objective.metric); "
                f"it logged {sorted(trainer.callback_metrics)}"
            )
        step = trainer.global_step
        self.trial.report(float(value), step=step)
        if not self.trial.should_prune():
            return
        self.trial.set_user_attr("pruned_at_step", step)
        for logger in trainer.loggers:
            if isinstance(logger, MLFlowLogger):
                logger.experiment.set_tag(logger.run_id, "pruned_at_step", str(step))
        raise optuna.TrialPruned(
            f"at step {step}: {self.monitor} {float(value):.4g} is worse than the median of earlier trials at this step"
        )
