"""`train(config)`: the one way a model is trained, from the CLI and from sweeps alike.

It creates (or, with `resume=RUN_ID`, reopens) an MLflow run, trains with Lightning under the
MLFlowLogger, checkpoints to `<runs_dir>/checkpoints/<run_id>/`, evaluates on the test split with
the data layer's protocol, and leaves the run FINISHED, FAILED (reason in the `failure_reason` tag)
or KILLED (after a clean checkpoint on SIGINT/SIGTERM).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from pha_lab.config import ConfigError, flatten, to_yaml, validate
from pha_lab import tracking
from pha_lab.training import ranks

# Lightning's DDP launcher leaves these in os.environ; a later run in the same process (a sweep
# worker) must not mistake them for an external launcher.
DDP_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE", "PHA_RUN_ID")

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
            f"resume={run_id}: no saved config at {path}; is tracking.runs_dir ({cfg.tracking.runs_dir}) the one the run used?"
        )
    return OmegaConf.merge(cfg, OmegaConf.load(path))


def check_resume_compatible(saved: DictConfig, cfg: DictConfig) -> list[str]:
    """Refuse a resume whose config changes a shape-changing key; return the other changed keys."""
    old, new = flatten(saved), flatten(cfg)
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k) and k != "resume")
    bad = [k for k in changed if k.startswith(SHAPE_KEYS)]
    if bad:
        detail = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in bad)
        raise ConfigError(f"cannot resume run {cfg.resume}: shape-changing config differs ({detail}); "
                          "start a new run instead or restore these values")
    return changed


def _precision(cfg: DictConfig, on_gpu: bool) -> str:
    if cfg.trainer.precision != "auto":
        return cfg.trainer.precision
    return "bf16-mixed" if on_gpu else "32-true"


def _is_rank_zero() -> bool:
    rank = os.environ.get("RANK", os.environ.get("LOCAL_RANK", os.environ.get("SLURM_PROCID", 0)))
    return int(rank) == 0


def _open_run(cfg: DictConfig, client, uri: str) -> tuple[str, bool]:
    """(run_id, resumed). DDP worker processes re-run the entry point: they join the rank-0 run
    (Lightning's launcher passes its id in PHA_RUN_ID; ranks that srun started receive it from rank 0)."""
    if os.environ.get("PHA_RUN_ID"):
        return os.environ["PHA_RUN_ID"], bool(cfg.resume)
    if not _is_rank_zero():
        return ranks.receive(cfg.tracking)["run_id"], bool(cfg.resume)
    run_id, resumed = _create_or_reopen_run(cfg, client, uri)
    if ranks.srun_world():
        ranks.share(cfg.tracking, {"run_id": run_id, "config": to_yaml(cfg)})
    return run_id, resumed


def _create_or_reopen_run(cfg: DictConfig, client, uri: str) -> tuple[str, bool]:
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


def prepare_determinism(cfg: DictConfig) -> None:
    """`trainer.deterministic`: Lightning then enables `torch.use_deterministic_algorithms(True)` (strict: an op
    without a deterministic kernel raises; SDPA's flash and memory-efficient backward switch to their
    deterministic modes, cuDNN attention is not chosen). cuBLAS reads CUBLAS_WORKSPACE_CONFIG once per process,
    at its first use, so it must be set before anything touches CUDA (the run's tags query the GPU)."""
    import torch

    if not cfg.trainer.deterministic or os.environ.get("CUBLAS_WORKSPACE_CONFIG") in (":4096:8", ":16:8"):
        return
    if torch.cuda.is_initialized():
        raise ConfigError("trainer.deterministic=true: this process already uses CUDA without CUBLAS_WORKSPACE_CONFIG, "
                          "so cuBLAS may not be deterministic; start it with CUBLAS_WORKSPACE_CONFIG=:4096:8 in the "
                          "environment (e.g. a sweep that mixes deterministic and non-deterministic trials)")
    os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"


def per_step_callbacks(cfg: DictConfig, ckpt_dir: Path) -> list:
    """The callbacks that act on every training step (also timed by `pha-lab bench`'s overhead part):
    interruption, peak memory, LR, tokens/s in the progress bar, Lightning's throughput/MFU."""
    from lightning.pytorch.callbacks import LearningRateMonitor, ThroughputMonitor

    from pha_lab.training.callbacks import Interruption, PeakMemory, TokensProgressBar

    window = max(2, min(50, cfg.trainer.max_steps // 4))
    return [
        Interruption(ckpt_dir / "last.ckpt"), PeakMemory(), LearningRateMonitor(logging_interval="step"),
        TokensProgressBar(),
        ThroughputMonitor(batch_size_fn=lambda b: b["input_ids"].shape[0], length_fn=lambda b: b["input_ids"].numel(),
                          window_size=window),
    ]


def train(cfg: DictConfig, extra_callbacks: list | None = None, on_start=None) -> TrainResult:
    """Train, test and track one run described by `cfg` (see pha_lab.config).

    `on_start(run_id, ckpt_dir)` is called once the MLflow run exists (the sweep runner records both
    on its Optuna trial, so a trial whose worker dies can be resumed in the same run)."""
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
    from lightning.pytorch.loggers import MLFlowLogger

    from pha_lab.data import build_datamodule
    from pha_lab.training.callbacks import Interruption, MixerIntrospection, RunInterrupted, is_interruption
    from pha_lab.training.module import LMModule, NonFiniteLossError

    env_before = {key: os.environ.get(key) for key in DDP_ENV}
    if cfg.resume and not os.environ.get("PHA_RUN_ID"):
        changed = check_resume_compatible(resume_config(cfg.resume, cfg), cfg)
    else:
        changed = []
    validate(cfg)
    prepare_determinism(cfg)
    deterministic_before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    uri = tracking.tracking_uri(cfg.tracking)
    client = tracking.client(uri)
    run_id, resumed = _open_run(cfg, client, uri)
    os.environ["PHA_RUN_ID"] = run_id  # for DDP workers started by Lightning
    ckpt_dir = checkpoint_dir(cfg, run_id)
    rank_zero = _is_rank_zero()
    if on_start is not None and rank_zero:
        on_start(run_id, ckpt_dir)
    status, reason = "FAILED", None
    step_callbacks = per_step_callbacks(cfg, ckpt_dir)
    interruption = next(cb for cb in step_callbacks if isinstance(cb, Interruption))
    last = interruption.ckpt_path
    try:
        L.seed_everything(cfg.seed, workers=True, verbose=False)
        resume_from = last if resumed and last.is_file() else None
        if resumed and rank_zero:
            if resume_from is not None:
                client.set_tag(run_id, "resumed_from", str(resume_from))
            if changed:
                client.set_tag(run_id, "resume_changed_keys", ", ".join(changed))
            if resume_from is None:  # died before its first checkpoint: start over, in the same run
                print(f"pha-lab: run {run_id} has no checkpoint yet; training it again from step 0")
                client.set_tag(run_id, "restarted_without_checkpoint", "true")
        if rank_zero and resume_from is None:
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            config_yaml = to_yaml(cfg)
            (ckpt_dir / "config.yaml").write_text(config_yaml)
            client.log_text(run_id, config_yaml, "config.yaml")
        datamodule = build_datamodule(cfg)
        module = LMModule(cfg)
        on_gpu = cfg.trainer.accelerator in ("gpu", "cuda") or (cfg.trainer.accelerator == "auto" and torch.cuda.is_available())
        precision = _precision(cfg, on_gpu)
        if cfg.trainer.cpu_threads and not on_gpu:
            torch.set_num_threads(cfg.trainer.cpu_threads)
        if rank_zero and resume_from is None:
            # tracking.tags are the run's tags already; as params they would differ on a sweep's retry
            # (trial_number), and MLflow refuses to change a logged param
            params = {k: v for k, v in flatten(cfg).items() if k != "resume" and not k.startswith("tracking.tags.")}
            if resumed:  # restarted from step 0, maybe on another machine (tracking.runs_dir...): keep the first params
                params = {k: v for k, v in params.items() if k not in client.get_run(run_id).data.params}
            MLFlowLogger(tracking_uri=uri, run_id=run_id).log_hyperparams(params)
            for key, value in {
                "n_params": module.model.n_params(),
                "n_params_non_embedding": module.model.n_params(non_embedding=True),
                "flops_per_token": f"{module.flops_per_token:.6g}",
                "checkpoint_dir": str(ckpt_dir),
                "precision": precision,
            }.items():
                client.set_tag(run_id, key, str(value))

        objective, mode = ("val/accuracy", "max") if cfg.data.source == "mqar" else ("val/loss", "min")
        best = ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor=objective, mode=mode, save_top_k=1,
                               enable_version_counter=False, auto_insert_metric_name=False)
        periodic = ModelCheckpoint(dirpath=ckpt_dir, save_top_k=0, save_last=True,
                                   every_n_train_steps=cfg.trainer.ckpt_every_n_steps)
        callbacks = [best, periodic, MixerIntrospection(ckpt_dir / "introspection"), *step_callbacks,
                     *(extra_callbacks or [])]
        if cfg.trainer.early_stop_value is not None:
            callbacks.append(EarlyStopping(monitor=objective, mode=mode, stopping_threshold=cfg.trainer.early_stop_value,
                                           patience=10**9, check_on_train_epoch_end=False))
        trainer = L.Trainer(
            max_steps=cfg.trainer.max_steps,
            val_check_interval=cfg.trainer.val_every_n_steps * cfg.trainer.accumulate_grad_batches,  # counts micro-batches
            check_val_every_n_epoch=None, num_sanity_val_steps=0, log_every_n_steps=cfg.trainer.log_every_n_steps,
            accumulate_grad_batches=cfg.trainer.accumulate_grad_batches,  # clipping: LMModule.on_before_optimizer_step
            precision=precision, accelerator=cfg.trainer.accelerator, devices=cfg.trainer.devices,
            num_nodes=cfg.trainer.num_nodes,
            deterministic=cfg.trainer.deterministic, logger=MLFlowLogger(tracking_uri=uri, run_id=run_id),
            callbacks=callbacks, default_root_dir=ckpt_dir, enable_model_summary=False,
        )
        try:
            trainer.fit(module, datamodule=datamodule, ckpt_path=str(resume_from) if resume_from else None)
        except torch.cuda.OutOfMemoryError as exc:
            raise RuntimeError(
                f"CUDA out of memory at data.batch_size={cfg.data.batch_size}, data.seq_len={cfg.data.seq_len} "
                f"(model {cfg.name}): lower the batch size or raise trainer.accumulate_grad_batches. {str(exc).splitlines()[0]}"
            ) from exc
        trainer.save_checkpoint(last)  # the final state, for `pha-lab eval RUN_ID`
        test_ckpt = best.best_model_path if cfg.trainer.test_ckpt == "best" and best.best_model_path else None
        test_metrics = trainer.test(module, datamodule=datamodule, ckpt_path=test_ckpt, verbose=False)
        metrics = {k: float(v) for k, v in (test_metrics[0] if test_metrics else {}).items()}
        tokens_seen = (trainer.global_step * cfg.data.batch_size * cfg.trainer.accumulate_grad_batches
                       * cfg.data.seq_len * trainer.world_size)
        if rank_zero:
            protocol = datamodule.eval_protocol("test")
            for key, value in protocol.items():
                client.set_tag(run_id, f"protocol.{key}", str(value))
            client.log_metric(run_id, "train/tokens_seen", tokens_seen, step=trainer.global_step)
            client.set_tag(run_id, "test_ckpt", test_ckpt or "last")
        status = "FINISHED"
        return TrainResult(run_id, uri, ckpt_dir, status, metrics, module.model.n_params(), tokens_seen)
    except BaseException as exc:
        if type(exc).__name__ == "TrialPruned":  # optuna's pruning callback stopped the run
            status, reason = "KILLED", f"pruned by Optuna: {exc}"
            raise
        if is_interruption(exc):
            status, reason = "KILLED", f"{interruption.requested or type(exc).__name__} {exc}".strip()
            raise RunInterrupted(f"run {run_id} interrupted ({reason}); checkpoint at {last}") from exc
        reason = str(exc) if isinstance(exc, NonFiniteLossError) else f"{type(exc).__name__}: {exc}"
        raise
    finally:
        if rank_zero:
            if reason:
                client.set_tag(run_id, "failure_reason" if status == "FAILED" else "killed_reason", reason[:5000])
            client.set_terminated(run_id, status)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()  # the next run in this process (a sweep) starts a new group
        torch.use_deterministic_algorithms(deterministic_before[0], warn_only=deterministic_before[1])  # Lightning leaves it set
        for key, value in env_before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


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
