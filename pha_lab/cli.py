"""`pha-lab` command line: train | eval | sweep | bench | tables | params.

Heavy imports (torch, lightning, mlflow) happen inside each command so `pha-lab --help` is instant.
"""

from __future__ import annotations

import argparse
import sys

from pha_lab.config import ConfigError


def cmd_params(args: argparse.Namespace) -> None:
    """Print parameter counts and FLOPs/token of presets, built on the meta device."""
    import torch

    from pha_lab.config import experiment_names, load_config
    from pha_lab.models import build_model

    names = args.experiments or experiment_names()
    print(f"{'preset':<20} {'layers':>6} {'d_model':>7} {'params':>12} {'non-emb':>12} {'GFLOPs/token (train)':>21}")
    for name in names:
        cfg = load_config(name, args.overrides)
        with torch.device("meta"):
            model = build_model(cfg.model)
        flops = model.flops_per_token(cfg.data.seq_len)["total"]
        print(f"{name:<20} {cfg.model.n_layers:>6} {cfg.model.d_model:>7} {model.n_params():>12,} "
              f"{model.n_params(non_embedding=True):>12,} {flops / 1e9:>21.3f}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pha-lab", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("params", help="parameter counts and FLOPs/token of presets")
    p.add_argument("experiments", nargs="*", help="preset names or YAML paths (default: all presets)")
    p.add_argument("--set", dest="overrides", nargs="*", default=[], metavar="KEY=VALUE")
    p.set_defaults(func=cmd_params)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except ConfigError as exc:
        print(f"pha-lab: config error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
