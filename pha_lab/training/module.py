"""The LightningModule: next-token cross-entropy (or MQAR answer accuracy) around any `build_model` result.

The step path never waits for the device: the loss is chunked (pha_lab.training.loss, no [tokens, vocab] logits),
and a non-finite loss or gradient norm is recorded on the device (`_guard_step`), makes the fused AdamW skip the
update on the device (its `found_inf` input, as a GradScaler uses it), and is read back only at logging steps,
before every checkpoint and validation, and at the end of training (`raise_if_nonfinite`): the run then fails
naming the first bad step, and no checkpoint ever holds its weights."""

from __future__ import annotations

import math

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf
from torchmetrics import SumMetric
from torchmetrics.classification import MulticlassAccuracy

from pha_lab.data.batch import IGNORE_INDEX
from pha_lab.models import build_model
from pha_lab.training.device import compile_enabled
from pha_lab.training.loss import argmax_tokens, token_nll
from pha_lab.training.optim import build_optimizer, build_schedule

EVAL_SPLITS = {"val": "valid", "test": "test"}  # Lightning stage -> data split


class NonFiniteLossError(RuntimeError):
    """Raised when the training loss becomes NaN/inf; the run is marked FAILED with the step."""


class LMModule(L.LightningModule):
    def __init__(self, config: dict | DictConfig):
        super().__init__()
        cfg = config if isinstance(config, DictConfig) else OmegaConf.create(config)
        self.save_hyperparameters({"config": OmegaConf.to_container(cfg, resolve=True)}, logger=False)
        self.cfg = cfg
        self.model = build_model(cfg.model)
        self.is_mqar = cfg.data.source == "mqar"
        seq_len = cfg.data.seq_len
        self.flops_per_token = self.model.flops_per_token(seq_len)["total"]  # training: forward + backward
        self.eval_flops_per_token = self.model.flops_per_token(seq_len, training=False)["total"]  # forward only
        self._last_batch_size = cfg.data.batch_size
        self._step_losses: list[torch.Tensor] = []  # this optimizer step's micro-batch losses, checked before it
        # The first optimizer step whose loss or gradient norm was not finite (0: none yet) and those two values, on
        # the device (moved there at the first step; not buffers: DDP would overwrite them with rank 0's, and not in
        # checkpoints); read by raise_if_nonfinite.
        self._bad_step, self._bad_values = torch.zeros((), dtype=torch.long), torch.zeros(2)
        self._checked_step = -1
        # summed over scored tokens: exact token-level loss, PPL and bits per byte. NaN checks are ours
        # (_eval_step): the metrics' default would drop a NaN loss and keep its tokens.
        self.eval_nll = SumMetric(nan_strategy="disable")
        self.eval_tokens = SumMetric(nan_strategy="disable")
        if self.is_mqar:
            self.eval_acc = MulticlassAccuracy(
                num_classes=cfg.model.vocab_size, ignore_index=IGNORE_INDEX, average="micro"
            )
        self.compiled = compile_enabled(cfg)
        if self.compiled:  # the whole LanguageModel, one graph (tests/test_compile.py: no graph breaks)
            self.model.compile(mode=cfg.trainer.compile_mode)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Logits [B, T, V] (training and evaluation use the chunked loss instead)."""
        return self.model(idx)

    @property
    def flops_per_batch(self) -> float:
        """FLOPs of the batch just processed, read by Lightning's ThroughputMonitor after every batch (-> FLOP/s,
        MFU): forward + backward in training, forward only in validation and test, over that batch's rows."""
        training = self._trainer is None or self.trainer.training
        per_token = self.flops_per_token if training else self.eval_flops_per_token
        return per_token * self.cfg.data.seq_len * self._last_batch_size

    def _losses(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(final hidden states [B, T, D], summed NLL over the scored tokens, their count)."""
        hidden = self.model(batch["input_ids"], return_hidden=True)
        labels = batch["labels"]
        nll = token_nll(
            hidden, self.model.lm_head.weight, labels, "sum", self.cfg.trainer.loss_chunk_tokens, compiled=self.compiled
        )
        return hidden, nll, (labels != IGNORE_INDEX).sum()

    @torch.no_grad()
    def nll_per_position(self, batch: dict) -> torch.Tensor:
        """NLL of every position [B, T] (0 where the label is IGNORE_INDEX), by the training loss's own path:
        for evaluations that need more than the sums (e.g. loss by position)."""
        hidden = self.model(batch["input_ids"], return_hidden=True)
        return token_nll(
            hidden,
            self.model.lm_head.weight,
            batch["labels"],
            "none",
            self.cfg.trainer.loss_chunk_tokens,
            compiled=self.compiled,
        )

    # ------------------------------------------------------------------ training
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        _, nll, count = self._losses(batch)
        loss = nll / count.clamp_min(1)
        self._last_batch_size = batch["input_ids"].shape[0]
        self._step_losses.append(loss.detach())
        # not prog_bar: Lightning converts progress-bar values to floats after every batch (a host sync);
        # TokensProgressBar reads the loss when it refreshes
        self.log("train/loss", loss, on_step=True, on_epoch=False)
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
        """Clip here rather than through the Trainer (Lightning refuses `gradient_clip_val` with a fused AdamW
        under bf16-mixed, where no gradient scaler is involved and clipping is safe), then guard the step."""
        clip = self.cfg.optim.grad_clip or float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)  # the norm before clipping
        self._guard_step(getattr(optimizer, "optimizer", optimizer), norm)  # (a LightningOptimizer wraps it)
        if (self.global_step + 1) % self.cfg.trainer.log_every_n_steps == 0:
            self.log("train/grad_norm", norm, on_step=True, on_epoch=False)

    def _guard_step(self, optimizer: torch.optim.Optimizer, norm: torch.Tensor) -> None:
        """Record on the device whether this step's losses (every micro-batch) and gradient norm are finite, and
        keep a fused AdamW from applying this step or any after a bad one: `found_inf` makes its kernel skip the
        update of weights, moments and step count on the device. Under DDP the ranks' flags are all-reduced (on the
        device) so that all skip and stop together. Without a fused AdamW (optim.fused=false, 16-mixed) nothing can
        skip a step on the device, so the flag is read here: one host sync per step."""
        losses = torch.stack(self._step_losses).sum() if self._step_losses else norm.new_zeros(())
        self._step_losses = []  # (empty: the bench's hand-written loop, which calls this hook alone)
        if self._bad_step.device != norm.device:  # (once)
            self._bad_step, self._bad_values = self._bad_step.to(norm.device), self._bad_values.to(norm.device)
        bad = (~(torch.isfinite(losses) & torch.isfinite(norm))).int()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)  # every rank skips (and stops) alike
        first = bad.bool() & (self._bad_step == 0)
        self._bad_step = torch.where(first, self.global_step + 1, self._bad_step)
        self._bad_values = torch.where(first, torch.stack([losses, norm]).to(self._bad_values.dtype), self._bad_values)
        if optimizer.defaults.get("fused"):
            optimizer.found_inf = (self._bad_step != 0).float()
        else:
            self.raise_if_nonfinite()

    def raise_if_nonfinite(self) -> None:
        """NonFiniteLossError naming the first bad step, if there was one (one host read of the device flag)."""
        step = int(self._bad_step)
        if not step:
            return
        loss, norm = self._bad_values.tolist()
        what = (
            f"training loss ({loss}) at step {step} (gradient norm {norm})"
            if not math.isfinite(loss)
            else f"gradient norm ({norm}) at step {step} (training loss {loss})"
        )
        skipped = (
            "the optimizer step was not taken"
            if step > self.global_step  # (raised before that step)
            else "the fused AdamW skipped that step and every one after it"
        )
        raise NonFiniteLossError(
            f"non-finite {what}; {skipped}, and the run stopped at step {self.global_step} "
            "before any checkpoint of them"
        )

    def on_train_batch_end(self, outputs, batch: dict, batch_idx: int) -> None:
        """Read the device flag at the logging steps (where the loggers read the device anyway) and the last step."""
        step = self.global_step
        if (
            step
            and step != self._checked_step
            and (step % self.cfg.trainer.log_every_n_steps == 0 or step >= self.trainer.max_steps)
        ):
            self._checked_step = step
            self.raise_if_nonfinite()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self.raise_if_nonfinite()  # every checkpoint (periodic, best, last, on interruption) is of finite steps

    def on_validation_start(self) -> None:
        self.raise_if_nonfinite()

    def on_train_end(self) -> None:
        self.raise_if_nonfinite()

    def configure_optimizers(self):
        optimizer = build_optimizer(self.model, self.cfg.optim, self.device, self.trainer.precision)
        schedule = build_schedule(optimizer, self.cfg.optim, self.cfg.trainer.max_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # ------------------------------------------------------------------ evaluation
    def _eval_step(self, batch: dict, batch_idx: int, stage: str) -> None:
        hidden, nll, count = self._losses(batch)
        self._last_batch_size = batch["input_ids"].shape[0]
        if not torch.isfinite(nll):
            raise NonFiniteLossError(
                f"non-finite {stage} loss ({nll.item()}) in {stage} batch {batch_idx} "
                f"(after training step {self.global_step}): the model's outputs are not finite"
            )
        self.eval_nll.update(nll.detach().float())
        self.eval_tokens.update(count.float())
        if self.is_mqar:
            mask = batch["labels"] != IGNORE_INDEX  # the answer positions: logits only for those rows
            predicted = argmax_tokens(hidden[mask], self.model.lm_head.weight, self.cfg.trainer.loss_chunk_tokens)
            self.eval_acc.update(predicted, batch["labels"][mask])

    def _eval_epoch_end(self, stage: str) -> dict[str, float]:
        nll, tokens = self.eval_nll.compute().item(), self.eval_tokens.compute().item()
        self.eval_nll.reset()
        self.eval_tokens.reset()
        loss = nll / max(tokens, 1.0)
        metrics = {f"{stage}/loss": loss, f"{stage}/tokens": tokens}
        if self.is_mqar:
            metrics[f"{stage}/accuracy"] = self.eval_acc.compute().item()
            self.eval_acc.reset()
        else:
            metrics[f"{stage}/ppl"] = math.exp(min(loss, 50.0))
            n_bytes = self._protocol(stage).get("n_bytes")
            if n_bytes:
                metrics[f"{stage}/bpb"] = nll / (math.log(2) * n_bytes)
        self.log_dict(metrics, sync_dist=True)
        return metrics

    def _protocol(self, stage: str) -> dict:
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        return datamodule.eval_protocol(EVAL_SPLITS[stage]) if datamodule is not None else {}

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, "val")

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, "test")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")
