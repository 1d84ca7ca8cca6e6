"""`train(config)`: the one way a model is trained, from the CLI and from sweeps alike.

It creates (or, with `resume=RUN_ID`, reopens) an MLflow run, trains with Lightning under the
MLFlowLogger, checkpoints to `<runs_dir>/checkpoints/<run_id>/` (or `<tracking.checkpoints_dir>/<run_id>/`),
evaluates on the test split with the data layer's protocol, and leaves the run FINISHED, FAILED (reason in
the `failure_reason` tag) or KILLED (after a clean checkpoint on SIGINT/SIGTERM).

Read from the bottom: `train` is the recipe; `tracked_run` owns the run's life (open, final status and
reason, the process given back as it was); `build_trainer` the Trainer and its callbacks. Which DDP rank
does what, and how ranks > 0 find rank 0's run: pha_lab/training/handoff.py.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from pha_lab import tracking
from pha_lab.config import ConfigError, flatten, to_yaml, validate
from pha_lab.training import handoff
from pha_lab.training.device import on_gpu, precision

# Keys whose change makes a checkpoint meaningless for a resumed run (shapes, tokens).
SHAPE_KEYS = ("model.", "data.source", "data.tokenizer.", "data.mqar.vocab_size", "data.seq_len")


@dataclass
class TrainResult:
    run_id: str
    tracking_uri: str
    ckpt_dir: Path
    status: str
    metrics: dict[str, float] = field(default_factory=dict)
    n_params: int = 0
    tokens_seen: int = 0


def checkpoint_dir(cfg: DictConfig, run_id: str) -> Path:
    root = cfg.tracking.checkpoints_dir
    return (Path(root).resolve() if root else tracking.runs_dir(cfg.tracking) / "checkpoints") / run_id


def resume_config(run_id: str, cfg: DictConfig) -> DictConfig:
    """The config a run was started with (saved beside its checkpoints)."""
    path = checkpoint_dir(cfg, run_id) / "config.yaml"
    if not path.is_file():
        raise ConfigError(
            f"resume={run_id}: no saved config at {path}; is tracking.runs_dir ({cfg.tracking.runs_dir}) the one the "
            "run used?"
        )
    return OmegaConf.merge(cfg, OmegaConf.load(path))


def check_resume_compatible(saved: DictConfig, cfg: DictConfig) -> list[str]:
    """Refuse a resume whose config changes a shape-changing key; return the other changed keys."""
    old, new = flatten(saved), flatten(cfg)
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k) and k != "resume")
    bad = [k for k in changed if k.startswith(SHAPE_KEYS)]
    if bad:
        detail = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in bad)
        raise ConfigError(
            f"cannot resume run {cfg.resume}: shape-changing config differs ({detail}); "
            "start a new run instead or restore these values"
        )
    return changed


def prepare_determinism(cfg: DictConfig) -> None:
    """`trainer.deterministic`: Lightning then enables `torch.use_deterministic_algorithms(True)` (strict: an op
    without a deterministic kernel raises; SDPA's flash and memory-efficient backward switch to their
    deterministic modes, cuDNN attention is not chosen). cuBLAS reads CUBLAS_WORKSPACE_CONFIG once per process,
    at its first use, so it must be set before anything touches CUDA (the run's tags query the GPU)."""
    import torch

    if not cfg.trainer.deterministic or os.environ.get("CUBLAS_WORKSPACE_CONFIG") in (":4096:8", ":16:8"):
        return
    if torch.cuda.is_initialized():
        raise ConfigError(
            "trainer.deterministic=true: this process already uses CUDA without CUBLAS_WORKSPACE_CONFIG, "
            "so cuBLAS may not be deterministic; start it with CUBLAS_WORKSPACE_CONFIG=:4096:8 in the "
            "environment (e.g. a sweep that mixes deterministic and non-deterministic trials)"
        )
    os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"


# --------------------------------------------------------------------------- the MLflow run
@dataclass
class TrackedRun:
    """The MLflow run being trained, as every rank sees it; only rank 0 has a client and writes to the run."""

    cfg: DictConfig
    client: object | None
    uri: str
    run_id: str
    resumed: bool
    rank_zero: bool

    @property
    def ckpt_dir(self) -> Path:
        return checkpoint_dir(self.cfg, self.run_id)

    @property
    def last_ckpt(self) -> Path:
        return self.ckpt_dir / "last.ckpt"

    def tag(self, tags: dict) -> None:
        if self.rank_zero:
            for key, value in tags.items():
                self.client.set_tag(self.run_id, key, str(value))

    def start(self, changed: list[str]) -> Path | None:
        """The checkpoint to resume from (None: train from step 0, in this run); the config saved beside the
        checkpoints and as an artifact when training from step 0."""
        resume_from = self.last_ckpt if self.resumed and self.last_ckpt.is_file() else None
        if self.resumed and resume_from is not None:
            self.tag({"resumed_from": resume_from})
        if self.resumed and changed:
            self.tag({"resume_changed_keys": ", ".join(changed)})
        if self.resumed and resume_from is None and self.rank_zero:  # died before its first checkpoint
            print(f"pha-lab: run {self.run_id} has no checkpoint yet; training it again from step 0")
            self.tag({"restarted_without_checkpoint": "true"})
        if self.rank_zero and resume_from is None:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            config_yaml = to_yaml(self.cfg)
            (self.ckpt_dir / "config.yaml").write_text(config_yaml)
            self.client.log_text(self.run_id, config_yaml, "config.yaml")
        return resume_from

    def log_setup(self, module, precision: str) -> None:
        """The flattened config as params, sizes and precision as tags. MLflow refuses to change a logged param:
        tracking.tags are the run's tags already (as params they would differ on a sweep's retry, trial_number),
        and a run restarted from step 0 only logs params it doesn't already have (it may run on another machine,
        with another tracking.runs_dir)."""
        from lightning.pytorch.loggers import MLFlowLogger

        if not self.rank_zero:
            return
        params = {k: v for k, v in flatten(self.cfg).items() if k != "resume" and not k.startswith("tracking.tags.")}
        if self.resumed:
            logged = self.client.get_run(self.run_id).data.params
            params = {k: v for k, v in params.items() if k not in logged}
        MLFlowLogger(tracking_uri=self.uri, run_id=self.run_id).log_hyperparams(params)
        model = module.model
        self.tag(
            {
                "n_params": model.n_params(),
                "n_params_non_embedding": model.n_params(non_embedding=True),
                "flops_per_token": f"{module.flops_per_token:.6g}",
                "checkpoint_dir": self.ckpt_dir,
                "precision": precision,
            }
        )

    def finish(self, trainer, datamodule, test_ckpt: str | None) -> int:
        """Tokens seen (logged), the test protocol and checkpoint as tags; returns the tokens seen."""
        c = self.cfg
        tokens_seen = (
            trainer.global_step
            * c.data.batch_size
            * c.trainer.accumulate_grad_batches
            * c.data.seq_len
            * trainer.world_size
        )
        if self.rank_zero:
            self.tag({f"protocol.{k}": v for k, v in datamodule.eval_protocol("test").items()})
            self.client.log_metric(self.run_id, "train/tokens_seen", tokens_seen, step=trainer.global_step)
            self.tag({"test_ckpt": test_ckpt or "last"})
        return tokens_seen


def _open_run(cfg: DictConfig, client, uri: str) -> tuple[str, bool]:
    """(run_id, resumed), on rank 0: a new run, or `resume` reopened."""
    if cfg.resume:
        try:
            run = client.get_run(cfg.resume)
        except Exception as exc:
            raise ConfigError(f"resume={cfg.resume}: no such MLflow run in {uri} ({type(exc).__name__})") from None
        client.update_run(run.info.run_id, status="RUNNING")
        return run.info.run_id, True
    exp_id = tracking.ensure_experiment(client, cfg.tracking.experiment, cfg.tracking)
    tags = {**tracking.environment_tags(), **{k: str(v) for k, v in cfg.tracking.tags.items()}, "config_name": cfg.name}
    if cfg.model.family:  # what the analysis groups runs by (pha_lab.analysis.runs); unset: it guesses, and says so
        tags["family"] = cfg.model.family
    run = client.create_run(exp_id, run_name=cfg.tracking.run_name or cfg.name, tags=tags)
    return run.info.run_id, False


def _outcome(exc: BaseException) -> tuple[str, str]:
    """(MLflow status, reason tag) of a run that raised `exc`."""
    from pha_lab.training.callbacks import RunInterrupted, is_interruption
    from pha_lab.training.module import NonFiniteLossError

    if type(exc).__name__ == "TrialPruned":  # optuna's pruning callback stopped the run
        return "KILLED", f"pruned by Optuna: {exc}"
    if is_interruption(exc):
        return "KILLED", str(exc) if isinstance(exc, RunInterrupted) else f"{type(exc).__name__} {exc}".strip()
    return "FAILED", str(exc) if isinstance(exc, NonFiniteLossError) else f"{type(exc).__name__}: {exc}"


@contextmanager
def tracked_run(cfg: DictConfig) -> Iterator[TrackedRun]:
    """Open (or reopen, or on ranks > 0 join) the run; on exit leave it FINISHED, FAILED (`failure_reason` tag)
    or KILLED (`killed_reason`: interrupted, re-raised as RunInterrupted naming the run, or pruned), and give
    the process back as it was (DDP environment and process group, deterministic-algorithms flags, torch's CPU thread
    count, which `trainer.cpu_threads` sets)."""
    import torch

    from pha_lab.training.callbacks import RunInterrupted, is_interruption

    uri = tracking.tracking_uri(cfg.tracking)
    rank_zero = handoff.is_rank_zero()
    client = tracking.client(uri) if rank_zero else None  # (srun starts the ranks together: one creates the database)
    deterministic = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    threads = torch.get_num_threads()
    with handoff.ddp_session():
        if rank_zero:
            run = TrackedRun(cfg, client, uri, *_open_run(cfg, client, uri), rank_zero=True)
            handoff.publish_run(run.run_id, cfg)
        else:  # rank 0's run
            run = TrackedRun(cfg, None, uri, handoff.joined_run_id(cfg.tracking), bool(cfg.resume), rank_zero=False)
        status, reason = "FAILED", None
        try:
            yield run
            status = "FINISHED"
        except BaseException as exc:
            status, reason = _outcome(exc)
            if is_interruption(exc):
                raise RunInterrupted(
                    f"run {run.run_id} interrupted ({reason}); checkpoint at {run.last_ckpt}",
                    run_id=run.run_id,
                    ckpt_path=run.last_ckpt,
                ) from exc
            raise
        finally:
            if reason:
                run.tag({"failure_reason" if status == "FAILED" else "killed_reason": reason[:5000]})
            if rank_zero:
                client.set_terminated(run.run_id, status)
            torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])  # Lightning leaves it set
            torch.set_num_threads(threads)


# --------------------------------------------------------------------------- the Trainer
def per_step_callbacks(cfg: DictConfig, ckpt_dir: Path) -> list:
    """The callbacks that act on every training step (also timed by `pha-lab bench`'s overhead part):
    interruption, peak memory, LR, loss and tokens/s in the progress bar, Lightning's throughput/MFU. None of them
    reads the device between logging steps (tests/test_training.py counts the host transfers)."""
    from lightning.pytorch.callbacks import LearningRateMonitor

    from pha_lab.training.callbacks import Interruption, PeakMemory, ThroughputAtLogSteps, TokensProgressBar

    t = cfg.trainer
    window_steps = max(2, min(50, t.max_steps // 4))  # throughput averaged over about this many steps
    return [
        Interruption(ckpt_dir / "last.ckpt"),
        PeakMemory(),
        LearningRateMonitor(logging_interval="step"),
        TokensProgressBar(refresh_rate=t.log_every_n_steps * t.accumulate_grad_batches),
        ThroughputAtLogSteps(
            batch_size_fn=lambda b: b["input_ids"].shape[0],
            length_fn=lambda b: b["input_ids"].numel(),
            window_size=max(2, window_steps // t.log_every_n_steps + 1),
        ),
    ]


def build_trainer(cfg: DictConfig, run: TrackedRun, extra_callbacks: list | None = None):
    """The Lightning Trainer of a run: checkpoints (`trainer.checkpoint_callback` keeps the best on the
    objective; a periodic `last.ckpt`), early stopping, introspection, the per-step callbacks, the MLflow logger,
    precision, devices and CPU threads."""
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
    from lightning.pytorch.loggers import MLFlowLogger

    from pha_lab.training.callbacks import MixerIntrospection

    t, ckpt_dir = cfg.trainer, run.ckpt_dir
    objective, mode = ("val/accuracy", "max") if cfg.data.source == "mqar" else ("val/loss", "min")
    best = ModelCheckpoint(
        dirpath=ckpt_dir,
        filename="best",
        monitor=objective,
        mode=mode,
        save_top_k=1,
        enable_version_counter=False,
        auto_insert_metric_name=False,
    )
    periodic = ModelCheckpoint(dirpath=ckpt_dir, save_top_k=0, save_last=True, every_n_train_steps=t.ckpt_every_n_steps)
    callbacks = [
        best,
        periodic,
        MixerIntrospection(ckpt_dir / "introspection"),
        *per_step_callbacks(cfg, ckpt_dir),
        *(extra_callbacks or []),
    ]
    if t.early_stop_value is not None:
        callbacks.append(
            EarlyStopping(
                monitor=objective,
                mode=mode,
                stopping_threshold=t.early_stop_value,
                patience=10**9,
                check_on_train_epoch_end=False,
            )
        )
    if t.cpu_threads and not on_gpu(cfg):
        torch.set_num_threads(t.cpu_threads)
    return L.Trainer(
        max_steps=t.max_steps,
        val_check_interval=t.val_every_n_steps * t.accumulate_grad_batches,  # counts micro-batches
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        log_every_n_steps=t.log_every_n_steps,
        accumulate_grad_batches=t.accumulate_grad_batches,  # clipping: LMModule.on_before_optimizer_step
        precision=precision(cfg),
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        deterministic=t.deterministic,
        logger=MLFlowLogger(tracking_uri=run.uri, run_id=run.run_id),
        callbacks=callbacks,
        default_root_dir=ckpt_dir,
        enable_model_summary=False,
    )


def fit(trainer, module, datamodule, ckpt_path: Path | None) -> None:
    """`trainer.fit`, with an out-of-memory error that says which knobs to turn."""
    import torch

    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(ckpt_path) if ckpt_path else None)
    except torch.cuda.OutOfMemoryError as exc:
        c = module.cfg
        raise RuntimeError(
            f"CUDA out of memory at data.batch_size={c.data.batch_size}, data.seq_len={c.data.seq_len} "
            f"(model {c.name}): lower the batch size or raise trainer.accumulate_grad_batches. "
            f"{str(exc).splitlines()[0]}"
        ) from exc


# --------------------------------------------------------------------------- train
def train(cfg: DictConfig, extra_callbacks: list | None = None, on_start=None) -> TrainResult:
    """Train, test and track one run described by `cfg` (see pha_lab.config).

    `on_start(run_id, ckpt_dir)` is called once the MLflow run exists (the sweep runner records both
    on its Optuna trial, so a trial whose worker dies can be resumed in the same run)."""
    import lightning as L

    from pha_lab.data import build_datamodule
    from pha_lab.training.module import LMModule

    resuming = cfg.resume and handoff.is_rank_zero()  # (ranks > 0 follow rank 0)
    changed = check_resume_compatible(resume_config(cfg.resume, cfg), cfg) if resuming else []
    validate(cfg)
    prepare_determinism(cfg)
    with tracked_run(cfg) as run:
        if on_start is not None and run.rank_zero:
            on_start(run.run_id, run.ckpt_dir)
        L.seed_everything(cfg.seed, workers=True, verbose=False)
        resume_from = run.start(changed)
        datamodule, module = build_datamodule(cfg), LMModule(cfg)
        trainer = build_trainer(cfg, run, extra_callbacks)
        if resume_from is None:
            run.log_setup(module, trainer.precision)
        fit(trainer, module, datamodule, resume_from)
        if trainer.global_step % cfg.trainer.val_every_n_steps:  # the final weights' val metrics, at the last step
            trainer.validate(module, datamodule=datamodule, verbose=False)
        trainer.save_checkpoint(run.last_ckpt)  # the final state, for `pha-lab eval RUN_ID`
        best = trainer.checkpoint_callback.best_model_path
        test_ckpt = best if cfg.trainer.test_ckpt == "best" and best else None
        test_metrics = trainer.test(module, datamodule=datamodule, ckpt_path=test_ckpt, verbose=False)
        metrics = {k: float(v) for k, v in (test_metrics[0] if test_metrics else {}).items()}
        tokens_seen = run.finish(trainer, datamodule, test_ckpt)
        return TrainResult(run.run_id, run.uri, run.ckpt_dir, "FINISHED", metrics, module.model.n_params(), tokens_seen)


def summary(result: TrainResult) -> str:
    """A one-screen summary printed at the end of `pha-lab train`."""
    lines = [
        f"run      {result.run_id}  [{result.status}]",
        f"tracking {result.tracking_uri}",
        f"ckpts    {result.ckpt_dir}",
        f"params   {result.n_params:,}    tokens seen {result.tokens_seen:,}",
    ]
    for key, value in sorted(result.metrics.items()):
        lines.append(f"{key:<16} {value:.4f}" if math.isfinite(value) else f"{key:<16} {value}")
    lines.append("browse:  make ui   (or mlflow ui --backend-store-uri " + result.tracking_uri + ")")
    return "\n".join(lines)
