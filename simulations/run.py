"""`python -m simulations.run`: one complete experiment (train, withdraw, unlearn, retrain, compare) from one command.

Every option is a field of `fedunlearn.config.ExperimentConfig`; a config file (TOML or JSON)
uses the same keys as the flags. Precedence: preset < config file < command line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from dataclasses import MISSING, fields
from typing import Any

from fedunlearn.config import PRESETS, ExperimentConfig, build_config, coerce, load_config_file
from fedunlearn.errors import ConfigError, FedUnlearnError

from .methods import REGISTRY


def _flag_default(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(value)
    return str(value)


def build_parser() -> argparse.ArgumentParser:
    """The CLI: one flag per ExperimentConfig field, plus --preset, --config, --out, --print-config."""
    parser = argparse.ArgumentParser(
        prog="python -m simulations.run",
        description="Federated unlearning experiment on Flower + Ray: train with FedAvg, let a client withdraw, "
                    "unlearn it with each method, retrain from scratch as the gold standard, and compare.",
        epilog="methods: " + "; ".join(f"{m.name} ({m.summary})" for m in REGISTRY.values())
               + ". retrain always runs: it is the reference of every distance and speedup.",
    )
    parser.add_argument("--preset", default="default", help=f"named scenario: {', '.join(PRESETS)} (default: default)")
    parser.add_argument("--config", metavar="FILE", help="TOML or JSON file of settings; keys are the flags without '--'")
    parser.add_argument("--out", metavar="DIR", default="results", help="where results.json and results.csv go (default: results)")
    parser.add_argument("--print-config", action="store_true", help="print the effective configuration as JSON and exit")
    parser.add_argument("--quiet", action="store_true", help="no progress display")
    parser.add_argument("--resume", action="store_true", help="continue the interrupted run in --out DIR from its last checkpoint (same settings)")
    parser.add_argument("--overwrite", action="store_true", help="replace results already in --out DIR (otherwise a new run refuses to touch them)")
    parser.add_argument("--seeds", metavar="LIST", help="repeat the scenario for each seed (e.g. 0,1,2) into DIR/seed-N/, "
                        "then report mean and std per metric and method in DIR/report.md and DIR/summary.json")
    group = parser.add_argument_group("experiment settings (also valid as config-file keys)")
    for f in fields(ExperimentConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not MISSING else None
        help_text = f"{f.metadata.get('help', '')} (default: {_flag_default(default)})"
        if isinstance(default, bool):
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            group.add_argument(flag, dest=f.name, default=None, metavar=f.name.upper(), help=help_text)
    return parser


def config_from_args(args: argparse.Namespace) -> ExperimentConfig:
    """Preset, then the config file, then the flags given on the command line."""
    names = {f.name for f in fields(ExperimentConfig)}
    overrides = {name: coerce(name, value) for name, value in vars(args).items() if name in names and value is not None}
    file_settings = load_config_file(args.config) if args.config else None
    return build_config(args.preset, file_settings, overrides)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    args = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
        if args.print_config:
            print(json.dumps(cfg.to_dict(), indent=2))
            return 0
        from .report import print_report
        from .runner import Experiment

        seeds = parse_seeds(args.seeds) if args.seeds else None
        experiments = ([Experiment(cfg.replace(seed=s), out_dir=Path(args.out) / f"seed-{s}", show_progress=not args.quiet,
                                  resume=args.resume, overwrite=args.overwrite) for s in seeds]
                       if seeds else [Experiment(cfg, out_dir=args.out, show_progress=not args.quiet, resume=args.resume, overwrite=args.overwrite)])
    except (ConfigError, FedUnlearnError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from .summary import write_summary
    from .tracking import log_report

    runs = []
    for experiment in experiments:
        results = experiment.run()
        print_report(results)
        runs.append(results)
    title = f"fedunlearn report: preset {args.preset}" + (f", seeds {args.seeds}" if seeds else "")
    summary = write_summary(args.out, runs, title)
    log_report(experiments, args.out, summary)  # --tracking: the report and plots join each experiment's run
    where = f"{args.out}/seed-N/results.json" if seeds else f"{args.out}/results.json, {args.out}/results.csv"
    print(f"results: {where}; report: {args.out}/report.md ({len(summary['plots'])} plots in {args.out}/plots)")
    return 0


def parse_seeds(text: str) -> list[int]:
    """'0,1,2' -> [0, 1, 2]; a bad list raises ConfigError naming it."""
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"seeds={text!r}: expected comma-separated integers, e.g. --seeds 0,1,2") from None
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise ConfigError(f"seeds={text!r}: give distinct integers >= 0, e.g. --seeds 0,1,2")
    return seeds


if __name__ == "__main__":
    sys.exit(main())
