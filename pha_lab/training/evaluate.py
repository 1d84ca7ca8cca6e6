"""`pha-lab eval`: evaluate a run or checkpoint with the data protocol, optionally knocking out branches.

Knockout zeroes one branch's output (in all layers, or one layer at a time with `per_layer`) and
reports the change in PPL (or accuracy) against the intact model; with a run id, the numbers are
also logged to that MLflow run (`eval/...`, `knockout/...`) with a `knockout.csv` artifact.
The long-context evaluation (`--by-position`, `--contexts`) lives in long_context.py.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from pha_lab import tracking
from pha_lab.config import ConfigError, load_config, validate


def locate(target: str, overrides: list[str], which: str = "last") -> tuple[Path, DictConfig, str | None]:
    """(checkpoint path, config, run id or None) for a run id or a .ckpt path."""
    import torch

    path = Path(target)
    if path.suffix == ".ckpt" or path.is_file():
        if not path.is_file():
            raise ConfigError(f"checkpoint {path} does not exist")
        saved = torch.load(path, map_location="cpu", weights_only=False)["hyper_parameters"]["config"]
        cfg = OmegaConf.merge(load_config(None), OmegaConf.create(saved), OmegaConf.from_dotlist(overrides))
        validate(cfg)
        return path, cfg, None
    base = load_config(None, [o for o in overrides if o.startswith("tracking.")])
    from pha_lab.training.run import checkpoint_dir, resume_config

    saved = checkpoint_dir(base, target) / "config.yaml"
    if not saved.is_file():
        raise ConfigError(
            f"{target} is neither a checkpoint file nor a run id with a saved config ({saved} is "
            f"missing): check the id, or point --runs-dir (tracking.runs_dir) at the runs the run used"
        )
    cfg = resume_config(target, base)
    cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(overrides))
    validate(cfg)
    ckpt = checkpoint_dir(cfg, target) / f"{which}.ckpt"
    if not ckpt.is_file():
        raise ConfigError(f"run {target} has no {which}.ckpt in {ckpt.parent}")
    return ckpt, cfg, target


def load_module(ckpt: Path, cfg: DictConfig):
    """The LMModule of `cfg` holding the checkpoint's weights (on the CPU)."""
    import torch

    from pha_lab.training.module import LMModule

    module = LMModule(cfg)
    module.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"])
    return module


def evaluate(
    target: str,
    overrides: list[str] = (),
    split: str = "test",
    knockout: list[str] = (),
    per_layer: bool = False,
    which: str = "last",
) -> pd.DataFrame:
    """One row per condition (intact, each knockout) with loss/ppl/bpb or accuracy and the delta."""
    import lightning as L
    import torch

    from pha_lab.data import build_datamodule

    ckpt, cfg, run_id = locate(target, list(overrides), which)
    module = load_module(ckpt, cfg)
    datamodule = build_datamodule(cfg)
    precision = "bf16-mixed" if torch.cuda.is_available() else "32-true"
    trainer = L.Trainer(logger=False, precision=precision, enable_model_summary=False, devices=1)
    stage = "val" if split in ("valid", "val") else "test"
    run = trainer.validate if stage == "val" else trainer.test

    def measure() -> dict[str, float]:
        return {k.split("/", 1)[1]: float(v) for k, v in run(module, datamodule=datamodule, verbose=False)[0].items()}

    rows = [{"condition": "intact", "branch": "", "layer": "all", **measure()}]
    model = module.model
    for branch in knockout:
        layer_sets = [[i] for i, blk in enumerate(model.blocks) if branch in blk.branches] if per_layer else [None]
        for layers in layer_sets:
            with model.knockout(branch, layers):
                rows.append(
                    {
                        "condition": f"-{branch}",
                        "branch": branch,
                        "layer": "all" if layers is None else layers[0],
                        **measure(),
                    }
                )
    table = pd.DataFrame(rows)
    key = "accuracy" if cfg.data.source == "mqar" else "ppl"
    table[f"delta_{key}"] = table[key] - table.loc[0, key]
    if run_id is not None:
        _log(table, cfg, run_id, stage, key, datamodule.eval_protocol("valid" if stage == "val" else "test"))
    return table


def _log(table: pd.DataFrame, cfg: DictConfig, run_id: str, stage: str, key: str, protocol: dict) -> None:
    client = tracking.client(tracking.tracking_uri(cfg.tracking))
    intact = table.iloc[0]
    for metric in ("loss", key, "bpb"):
        if metric in table and pd.notna(intact.get(metric)):
            client.log_metric(run_id, f"eval/{stage}/{metric}", float(intact[metric]))
    for _, row in table.iloc[1:].iterrows():
        where = "all" if row.layer == "all" else f"L{row.layer}"
        client.log_metric(run_id, f"knockout/{row.branch}/{where}/{key}", float(row[key]))
        client.log_metric(run_id, f"knockout/{row.branch}/{where}/delta_{key}", float(row[f"delta_{key}"]))
    for k, v in protocol.items():
        client.set_tag(run_id, f"eval_protocol.{k}", str(v))
    if len(table) > 1:
        from pha_lab.training.run import checkpoint_dir

        out = checkpoint_dir(cfg, run_id) / "introspection" / "knockout.csv"
        out.parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(out, index=False)
        client.log_artifact(run_id, str(out))
