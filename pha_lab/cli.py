"""`pha-lab` command line: train | eval | generate | sweep | bench | tables | params.

Heavy imports (torch, lightning, mlflow) happen inside each command so `pha-lab --help` is instant. Over 400 lines
on purpose: every subcommand's flags and its few-line handler in one file (the handlers call into the packages,
which hold the logic), so a reader finds every command and every flag in one place.
"""

from __future__ import annotations

import argparse
import sys

from pha_lab.branches import BRANCH_REGISTRY
from pha_lab.config import ConfigError


def cmd_params(args: argparse.Namespace) -> None:
    """Print parameter counts, FLOPs/token, weight and training-state memory and the inference cache per token of
    presets, built on the meta device (pha_lab.models.memory says what each counts)."""
    import torch

    from pha_lab.config import experiment_names, load_config
    from pha_lab.models import build_model

    names = args.experiments or experiment_names()
    contexts = args.contexts
    cache_cols = "".join(f" {'cache B/tok @' + _short_len(t):>16}" for t in contexts)
    print(
        f"{'preset':<22} {'layers':>6} {'d_model':>7} {'attn layers':>14} {'params':>12} {'non-emb':>12} "
        f"{'GFLOPs/tok':>10} {'bf16 GB':>8} {'train GB':>8}{cache_cols}"
    )
    for name in names:
        cfg = load_config(name, args.overrides)
        with torch.device("meta"):
            model = build_model(cfg.model)
        flops = model.flops_per_token(cfg.data.seq_len)["total"]
        attn = [i for i, blk in enumerate(model.blocks) if "attn" in blk.names]
        placed = "all" if len(attn) == len(model.blocks) else ",".join(map(str, attn)) or "-"
        n_swa = sum("swa" in blk.names for blk in model.blocks)
        placed += f" +{n_swa}swa" if n_swa else ""
        cache = "".join(f" {model.cache_bytes(1, t, 2) / t:>16,.0f}" for t in contexts)
        print(
            f"{name:<22} {cfg.model.n_layers:>6} {cfg.model.d_model:>7} {placed:>14} {model.n_params():>12,} "
            f"{model.n_params(non_embedding=True):>12,} {flops / 1e9:>10.3f} {2 * model.n_params() / 1e9:>8.3f} "
            f"{model.training_bytes()['total'] / 1e9:>8.3f}{cache}"
        )
    print(
        "\nGFLOPs/tok: training, at each preset's data.seq_len. bf16 GB: the weights at 2 bytes each. train GB: "
        "fp32 weights + gradients + AdamW moments (16 bytes per parameter), activations not included. "
        "cache B/tok: the inference cache (KV cache + recurrent state) of one sequence at that context in bf16, "
        "divided by the context. attn layers: those with full attention (+N swa: N layers with sliding-window "
        "attention)."
    )


def _short_len(tokens: int) -> str:
    return f"{tokens // 1024}k" if tokens % 1024 == 0 else str(tokens)


def _tracking_overrides(args: argparse.Namespace) -> list[str]:
    """--tracking-uri / --runs-dir as the config overrides they stand for."""
    return ([f"tracking.tracking_uri={args.tracking_uri}"] if args.tracking_uri else []) + (
        [f"tracking.runs_dir={args.runs_dir}"] if args.runs_dir else []
    )


def _split_overrides(words: list[str]) -> tuple[str | None, list[str]]:
    """`EXPERIMENT key=value ...` or just `key=value ...`."""
    if words and "=" not in words[0]:
        return words[0], words[1:]
    return None, words


def cmd_train(args: argparse.Namespace) -> int:
    from pha_lab.config import load_config
    from pha_lab.training import handoff
    from pha_lab.training.callbacks import RunInterrupted
    from pha_lab.training.run import resume_config, summary, train

    experiment, overrides = _split_overrides(args.words)
    overrides = [*overrides, *_tracking_overrides(args)]
    cfg = load_config(experiment, overrides)
    if experiment is None and cfg.resume:  # `pha-lab train resume=RUN_ID [...]`: the run's own config
        from omegaconf import OmegaConf

        cfg = OmegaConf.merge(resume_config(cfg.resume, cfg), OmegaConf.from_dotlist(overrides))
    elif experiment is None:
        raise ConfigError("name an experiment (e.g. `pha-lab train tiny_pha`) or pass resume=RUN_ID")
    try:
        result = train(cfg)
    except RunInterrupted as exc:
        print(
            f"\npha-lab: {exc}\nresume with: pha-lab train {' '.join(args.words)} resume={exc.run_id}", file=sys.stderr
        )
        return 130
    if handoff.is_rank_zero():  # DDP ranks > 0 run this command too
        print("\n" + summary(result))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    if args.by_position or args.contexts:
        return cmd_eval_long_context(args)
    from pha_lab.training.evaluate import evaluate

    table = evaluate(
        args.target,
        [*args.overrides, *_tracking_overrides(args)],
        split=args.split,
        knockout=args.knockout,
        per_layer=args.per_layer,
        which=args.ckpt,
    )
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    return 0


def cmd_eval_long_context(args: argparse.Namespace) -> int:
    """`pha-lab eval RUN --by-position [--contexts ...]`: PPL and bits per byte by context and position."""
    from pha_lab.training.long_context import LongContextSpec, evaluate_long_context

    if args.knockout or args.per_layer:
        raise ConfigError(
            "--knockout/--per-layer and the long-context evaluation (--by-position, --contexts) are "
            "separate evaluations: run them as two commands"
        )
    spec = LongContextSpec(
        contexts=args.contexts or [],
        stride=args.stride,
        split=args.split,
        window_bucket=args.window_bucket,
        book_bucket=args.book_bucket,
        max_book_tokens=args.max_book_tokens,
        batch_tokens=args.batch_tokens,
        ckpt=args.ckpt,
    )
    table = evaluate_long_context(args.target, [*args.overrides, *_tracking_overrides(args)], spec)
    whole = table[table.kind == "all"][["context", "stride", "tokens", "bytes", "ppl", "bpb"]]
    print("\n" + whole.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    by_position = table[table.kind == "position"].pivot(index="bucket", columns="context", values="ppl")
    order = table[table.kind == "position"].drop_duplicates("bucket").sort_values("lo")["bucket"]
    print("\nPPL by position in the book (rows) and evaluation context (columns):")
    print(by_position.reindex(order).to_string(float_format=lambda v: f"{v:.3f}"))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    """Print the prompt and a continuation sampled from a run or checkpoint (pha_lab.training.generation)."""
    from pha_lab.training.generation import generate_text

    print(
        generate_text(
            args.target,
            args.prompt,
            args.max_new_tokens,
            [*args.overrides, *_tracking_overrides(args)],
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed,
            device=args.device,
            which=args.ckpt,
        )
    )
    return 0


def _positive_ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected positive integers separated by commas, e.g. 1024,2048")
    return values


SLURM_OPTIONS = {
    "partition": "partition",
    "gpus_per_node": "gpus-per-node",
    "array_tasks": "array-tasks",
    "time_min": "time-limit",
    "account": "account",
    "cpus_per_task": "cpus-per-task",
    "sbatch": "sbatch",
    "setup": "setup",
    "max_parallel": "max-parallel",
    "folder": "slurm-folder",
}


def cmd_sweep(args: argparse.Namespace) -> int:
    given = [f"--{flag}" for key, flag in SLURM_OPTIONS.items() if getattr(args, key) not in (None, [])]
    if args.launcher == "slurm":
        from pha_lab.sweep.slurm import SlurmOptions, submit

        opts = SlurmOptions(**{key: getattr(args, key) for key in SLURM_OPTIONS if getattr(args, key) is not None})
        submit(
            args.name,
            args.overrides,
            opts,
            storage=args.storage,
            tracking_uri=args.tracking_uri,
            runs_dir=args.runs_dir,
            retry_failed=args.retry_failed,
            dry_run=args.dry_run,
        )
        return 0
    if given or args.dry_run:
        raise ConfigError(f"{' '.join(given + (['--dry-run'] if args.dry_run else []))}: only with --launcher slurm")
    from pha_lab.sweep.runner import run_sweep
    from pha_lab.training.callbacks import RunInterrupted

    try:
        run_sweep(
            args.name,
            args.overrides,
            storage=args.storage,
            tracking_uri=args.tracking_uri,
            runs_dir=args.runs_dir,
            retry_failed=args.retry_failed,
            workers=args.workers,
        )
    except (KeyboardInterrupt, RunInterrupted):
        return 130
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    """Build the tokenizer and token caches of an experiment (a CPU job: do it once before GPU runs)."""
    import time

    from pha_lab.config import load_config
    from pha_lab.data import build_datamodule

    cfg = load_config(args.experiment, args.overrides)
    datamodule = build_datamodule(cfg)
    start = time.perf_counter()
    datamodule.prepare_data()
    print(
        f"prepared {cfg.name} ({cfg.data.source}) in {time.perf_counter() - start:.1f} s; cache: {cfg.data.cache_dir}"
    )
    for split in ("valid", "test"):
        protocol = datamodule.eval_protocol(split)
        print(f"  {split}: {protocol.get('n_tokens'):,} tokens scored, {protocol.get('n_bytes') or 0:,} bytes")
    return 0


def cmd_tables(args: argparse.Namespace) -> int:
    """Execute the analysis notebooks (papermill) against a tracking URI into --out; 1 if a cell failed."""
    from pha_lab.analysis.notebooks import NOTEBOOKS, render_notebooks
    from pha_lab.analysis.runs import resolve_uri

    sweeps = {}
    for item in args.sweeps:
        notebook, _, names = item.partition("=")
        if notebook not in NOTEBOOKS or not names:
            raise ConfigError(
                f"--sweeps {item!r}: expected NOTEBOOK=SWEEP[,SWEEP...] with NOTEBOOK in {', '.join(NOTEBOOKS)}"
            )
        sweeps[notebook] = names.split(",")
    uri = resolve_uri(args.tracking_uri, args.runs_dir or "runs")
    print(f"[tables] tracking URI {uri}; writing {args.out}")
    failures = render_notebooks(
        uri, args.out, sweeps, args.notebooks or NOTEBOOKS, args.efficiency_csv, args.datasets, args.jobs
    )
    if failures:
        print(f"pha-lab tables: {len(failures)} notebook(s) failed: {'; '.join(failures)}", file=sys.stderr)
        return 1
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """Throughput, memory and MFU vs context length (bench/efficiency.yaml); a tiny version without a GPU."""
    from pha_lab.bench.efficiency import BenchOptions, log_csv, run

    config, overrides = _split_overrides(args.words)
    opts = BenchOptions(
        config=config or "efficiency",
        overrides=overrides,
        out=args.out,
        measure_peak=args.measure_peak,
        compile=args.compile,
        tiny=True if args.tiny else None,
        device=args.device,
        mlflow=not args.no_mlflow,
        tracking_uri=args.tracking_uri,
        runs_dir=args.runs_dir,
        plan_only=args.plan,
    )
    if args.from_csv:
        log_csv(args.from_csv, opts)
        return 0
    rows = run(opts)[0]
    return 1 if any(r["status"] == "error" for r in rows) else 0


def _tracking_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--tracking-uri",
        help="MLflow tracking URI, e.g. http://mlflow-host:5000 "
        "(= tracking.tracking_uri=...; default $MLFLOW_TRACKING_URI, else sqlite:///<runs_dir>/mlflow.db)",
    )
    p.add_argument("--runs-dir", help="checkpoints and the default database (= tracking.runs_dir=...; default ./runs)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pha-lab", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train one experiment: pha-lab train EXPERIMENT [key=value ...]")
    p.add_argument(
        "words",
        nargs="*",
        metavar="EXPERIMENT [key=value ...]",
        help="a preset name or YAML path, then overrides; or only resume=RUN_ID [overrides]",
    )
    _tracking_options(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a run or checkpoint: branch knockout, or long context (--by-position)")
    p.add_argument("target", help="an MLflow run id (checkpoints under tracking.runs_dir) or a .ckpt path")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. data.eval_stride=512 tracking.runs_dir=...")
    p.add_argument("--split", default="test", choices=["valid", "test"])
    p.add_argument("--knockout", nargs="*", default=[], choices=list(BRANCH_REGISTRY), help="branches to knock out")
    p.add_argument("--per-layer", action="store_true", help="knock out one layer at a time")
    p.add_argument("--ckpt", default="last", choices=["last", "best"])
    _tracking_options(p)
    g = p.add_argument_group(
        "long context",
        "PPL and bits per byte of whole books by position and context "
        "(docs/data.md, section 9); results go to the run's MLflow record",
    )
    g.add_argument(
        "--by-position",
        action="store_true",
        help="score whole books at the training context (or --contexts), by position in window and book",
    )
    g.add_argument(
        "--contexts",
        type=_positive_ints,
        metavar="C1,C2,...",
        help="evaluation contexts, e.g. 1024,2048,4096,8192 (implies --by-position)",
    )
    g.add_argument(
        "--stride",
        type=int,
        help="window stride S <= every context (default: S = C, no overlap); "
        "S < C scores only each window's last S tokens",
    )
    g.add_argument("--window-bucket", type=int, default=256, help="tokens per position-in-window bucket (default 256)")
    g.add_argument(
        "--book-bucket",
        type=int,
        default=1024,
        help="first position-in-book bucket [0, B), then [B, 2B), [2B, 4B), ... (default 1024)",
    )
    g.add_argument("--max-book-tokens", type=int, help="score only each book's first N tokens (default: whole books)")
    g.add_argument("--batch-tokens", type=int, default=32768, help="window tokens per forward pass (default 32768)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("generate", help="sample text from a run or checkpoint: pha-lab generate RUN_ID --prompt TEXT")
    p.add_argument("target", help="an MLflow run id (checkpoints under tracking.runs_dir) or a .ckpt path")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. tracking.runs_dir=...")
    p.add_argument("--prompt", default="", help="the text to continue (default: empty, a new document)")
    p.add_argument("--max-new-tokens", type=int, default=100, help="tokens to generate at most (default 100)")
    p.add_argument("--temperature", type=float, default=1.0, help="0: greedy; default 1.0")
    p.add_argument("--top-k", type=int, help="sample among the k most likely tokens only")
    p.add_argument("--top-p", type=float, help="sample among the most likely tokens holding this probability only")
    p.add_argument("--seed", type=int, default=0, help="the sampler's seed: the same seed, the same text (default 0)")
    p.add_argument("--device", help="cuda, cuda:1 or cpu (default: cuda when available)")
    p.add_argument("--ckpt", default="last", choices=["last", "best"])
    _tracking_options(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("sweep", help="run (or resume) a sweep: pha-lab sweep NAME [key=value ...]")
    p.add_argument("name", help="a sweep in sweeps/ (smoke, ablation, baselines, hpo, mqar, scale, ...) or a YAML path")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides applied to every trial")
    p.add_argument(
        "--storage",
        help="Optuna storage URL (default sqlite:///<runs_dir>/optuna.db); "
        "e.g. postgresql://user:pw@host/db to share a study between machines",
    )
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default sqlite:///<runs_dir>/mlflow.db)")
    p.add_argument("--runs-dir", help="where checkpoints and the default databases live (default ./runs)")
    p.add_argument("--retry-failed", action="store_true", help="queue again the cells whose trials failed")
    p.add_argument("--workers", type=int, help="number of workers (default: one per GPU group, or 1 on CPU)")
    p.add_argument(
        "--launcher",
        choices=["local", "slurm"],
        default="local",
        help="local: workers on this machine; slurm: a SLURM job array of workers (submitit)",
    )
    g = p.add_argument_group(
        "SLURM launcher (--launcher slurm; needs --storage postgresql://... and --tracking-uri http://...)"
    )
    g.add_argument(
        "--dry-run", action="store_true", help="print the sbatch script that would be submitted; submit nothing"
    )
    g.add_argument(
        "--time-limit",
        dest="time_min",
        type=int,
        metavar="MINUTES",
        help="walltime of each array task (required); a task at its limit checkpoints and is requeued",
    )
    g.add_argument("--partition")
    g.add_argument(
        "--gpus-per-node",
        type=int,
        help="GPUs per node a trial may use (default gpus_per_trial; "
        "gpus_per_trial > this: a multi-node DDP trial); 0: a CPU-only partition",
    )
    g.add_argument("--array-tasks", type=int, help="number of workers (default: one per cell, or per search trial)")
    g.add_argument("--max-parallel", type=int, help="array tasks running at once (--array=...%%N)")
    g.add_argument("--account")
    g.add_argument("--cpus-per-task", type=int)
    g.add_argument(
        "--sbatch",
        action="append",
        metavar="KEY=VALUE",
        help="another #SBATCH option, e.g. --sbatch qos=high --sbatch constraint=h100 (repeatable)",
    )
    g.add_argument(
        "--setup",
        action="append",
        metavar="LINE",
        help="a shell line run before the workers start, e.g. 'source /shared/venv/bin/activate' (repeatable)",
    )
    g.add_argument(
        "--slurm-folder",
        dest="folder",
        help="submitit's folder for scripts, pickles and logs "
        "(default <runs_dir>/slurm/<sweep>; on a filesystem the nodes share)",
    )
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("prepare", help="build the tokenizer and token caches of an experiment")
    p.add_argument("experiment")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("tables", help="rebuild the paper's tables and figures from MLflow (runs analysis/*.ipynb)")
    p.add_argument(
        "--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, else sqlite:///<runs_dir>/mlflow.db)"
    )
    p.add_argument("--runs-dir", help="where the default database lives (default ./runs)")
    p.add_argument("--out", default="analysis/out", help="executed notebooks, .md/.tex/.csv tables, .png/.pdf figures")
    p.add_argument(
        "--sweeps",
        nargs="*",
        default=[],
        metavar="NOTEBOOK=SWEEP,...",
        help="sweeps (MLflow experiments) per notebook, e.g. perplexity=baselines,scale ablation=ablation "
        "(defaults: pha_lab.analysis.notebooks.DEFAULT_SWEEPS)",
    )
    p.add_argument(
        "--notebooks",
        nargs="*",
        choices=["perplexity", "ablation", "mixing", "mqar", "efficiency", "long_context"],
        help="only these notebooks (default: all)",
    )
    p.add_argument(
        "--datasets", nargs="*", help="perplexity tables for these data.source values (default: each with runs)"
    )
    p.add_argument(
        "--efficiency-csv", default="docs/benchmarks/efficiency.csv", help="benchmark CSV of `pha-lab bench`"
    )
    p.add_argument("--jobs", type=int, default=2, help="notebooks executed at once")
    p.set_defaults(func=cmd_tables)

    p = sub.add_parser("bench", help="throughput/memory/MFU vs context length: pha-lab bench [CONFIG] [key=value ...]")
    p.add_argument(
        "words",
        nargs="*",
        metavar="[CONFIG] [key=value ...]",
        help="a bench spec in bench/ or a YAML path (default bench/efficiency.yaml), then overrides, "
        "e.g. models=[pha_125m] seq_lens=[8192]",
    )
    p.add_argument(
        "--measure-peak", action="store_true", help="time a bf16 8192^3 matmul and a device copy for MFU and floors"
    )
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.compile in every part (default: as the config says)",
    )
    p.add_argument("--out", help="CSV path (default runs/bench/<name>-<time>.csv); header and table written beside it")
    p.add_argument("--tiny", action="store_true", help="the config's cpu: version even on a GPU (a smoke test)")
    p.add_argument("--device", help="cuda, cuda:1 or cpu (default: cuda when available)")
    p.add_argument(
        "--plan", action="store_true", help="print every cell's analytic floor and a time estimate; run nothing"
    )
    p.add_argument("--no-mlflow", action="store_true", help="write the CSV only")
    p.add_argument(
        "--from-csv", help="log a CSV written elsewhere (e.g. on a GPU machine) as an MLflow run; run nothing"
    )
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default sqlite:///<runs_dir>/mlflow.db)")
    p.add_argument("--runs-dir", default="runs", help="where the default CSV and MLflow database live (default ./runs)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("params", help="parameter counts, FLOPs/token, memory and inference cache bytes of presets")
    p.add_argument("experiments", nargs="*", help="preset names or YAML paths (default: all presets)")
    p.add_argument(
        "--contexts",
        nargs="+",
        type=int,
        default=[1024, 32768],
        metavar="T",
        help="contexts at which to print the cache bytes per token (default: 1024 32768)",
    )
    p.add_argument("--set", dest="overrides", nargs="*", default=[], metavar="KEY=VALUE")
    p.set_defaults(func=cmd_params)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except ConfigError as exc:
        print(f"pha-lab: config error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
