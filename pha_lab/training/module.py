"""The LightningModule: next-token cross-entropy (or MQAR answer accuracy) around any `build_model` result."""

from __future__ import annotations

import math

import lightning as L
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torchmetrics import SumMetric
from torchmetrics.classification import MulticlassAccuracy

from pha_lab.data.batch import IGNORE_INDEX
from pha_lab.models import build_model
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
        # summed over scored tokens: exact token-level loss, PPL and bits per byte. NaN checks are ours
        # (_eval_step): the metrics' default would drop a NaN loss and keep its tokens.
        self.eval_nll = SumMetric(nan_strategy="disable")
        self.eval_tokens = SumMetric(nan_strategy="disable")
        if self.is_mqar:
            self.eval_acc = MulticlassAccuracy(num_classes=cfg.model.vocab_size, ignore_index=IGNORE_INDEX, average="micro")
        if cfg.trainer.compile:
            self.model.compile()

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx)

    @property
    def flops_per_batch(self) -> float:
        """FLOPs of the batch just processed, read by Lightning's ThroughputMonitor after every batch (-> FLOP/s,
        MFU): forward + backward in training, forward only in validation and test, over that batch's rows."""
        training = self._trainer is None or self.trainer.training
        per_token = self.flops_per_token if training else self.eval_flops_per_token
        return per_token * self.cfg.data.seq_len * self._last_batch_size

    def _losses(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = self.model(batch["input_ids"])
        labels = batch["labels"]
        nll = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
        return logits, nll, (labels != IGNORE_INDEX).sum()

    # ------------------------------------------------------------------ training
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        _, nll, count = self._losses(batch)
        loss = nll / count.clamp_min(1)
        self._last_batch_size = batch["input_ids"].shape[0]
        self._step_losses.append(loss.detach())
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False)
        return loss

    def _check_step_losses(self) -> None:
        """A NaN/inf loss in any micro-batch of this step fails the run *before* the optimizer step, so no
        weights (nor checkpoint) ever hold its NaN. One host sync per optimizer step."""
        if not self._step_losses:  # no training_step ran: the bench's hand-written loop, which clips only
            return
        losses, self._step_losses = torch.stack(self._step_losses), []
        if not torch.isfinite(losses).all():
            bad = losses[~torch.isfinite(losses)][0].item()
            raise NonFiniteLossError(f"non-finite training loss ({bad}) at step {self.global_step + 1}; "
                                     "the optimizer step was not taken")

    def on_before_optimizer_step(self, optimizer) -> None:
        """Check the losses, then clip here rather than through the Trainer: Lightning refuses
        `gradient_clip_val` with a fused AdamW under bf16-mixed, where no gradient scaler is involved and
        clipping is safe."""
        self._check_step_losses()
        clip = self.cfg.optim.grad_clip or float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)  # the norm before clipping
        if (self.global_step + 1) % self.cfg.trainer.log_every_n_steps == 0:
            self.log("train/grad_norm", norm, on_step=True, on_epoch=False)

    def configure_optimizers(self):
        optimizer = build_optimizer(self.model, self.cfg.optim, self.device, self.trainer.precision)
        schedule = build_schedule(optimizer, self.cfg.optim, self.cfg.trainer.max_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # ------------------------------------------------------------------ evaluation
    def _eval_step(self, batch: dict, batch_idx: int, stage: str) -> None:
        logits, nll, count = self._losses(batch)
        self._last_batch_size = batch["input_ids"].shape[0]
        if not torch.isfinite(nll):
            raise NonFiniteLossError(f"non-finite {stage} loss ({nll.item()}) in {stage} batch {batch_idx} "
                                     f"(after training step {self.global_step}): the model's outputs are not finite")
        self.eval_nll.update(nll.detach().float())
        self.eval_tokens.update(count.float())
        if self.is_mqar:
            mask = batch["labels"] != IGNORE_INDEX
            self.eval_acc.update(logits.argmax(-1)[mask], batch["labels"][mask])

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
