"""`python -m simulations.run`: one complete experiment (train, withdraw, unlearn, retrain, compare) from one command.

Every option is a field of `fedunlearn.config.ExperimentConfig`; a config file (TOML or JSON)
uses the same keys as the flags. Precedence: preset < config file < command line.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import sys
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

from fedunlearn.config import PRESETS, ExperimentConfig, build_config, coerce, load_config_file
from fedunlearn.errors import ConfigError, FedUnlearnError

from .lifecycle import Interrupted, handle_signals
from .methods import REGISTRY


def _flag_default(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(value)
    return str(value)


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (argparse's own prints the whole usage first), exit code 2."""

    def error(self, message: str) -> Any:  # argparse declares NoReturn
        hint = ""
        if message.startswith("unrecognized arguments: "):
            flags = [a for a in message.split(": ", 1)[1].split() if a.startswith("--")]
            options = [o for action in self._actions for o in action.option_strings]
            close = difflib.get_close_matches(flags[0].split("=", 1)[0], options, n=1) if flags else []
            hint = f" (did you mean {close[0]}?)" if close else ""
        self.exit(2, f"error: {message}{hint}; see {self.prog} --help\n")


def build_parser() -> argparse.ArgumentParser:
    """The CLI: one flag per ExperimentConfig field, plus --preset, --config, --out, --print-config."""
    parser = _Parser(
        prog="python -m simulations.run",
        allow_abbrev=False,  # a typo such as --round is an error, not --rounds
        description="Federated unlearning experiment on Flower + Ray: train with FedAvg, let a client withdraw, "
        "unlearn it with each method, retrain from scratch as the gold standard, and compare.",
        epilog="methods: "
        + "; ".join(f"{m.name} ({m.summary})" for m in REGISTRY.values())
        + ". retrain always runs: it is the reference of every distance and speedup.",
    )
    parser.add_argument("--preset", default="default", help=f"named scenario: {', '.join(PRESETS)} (default: default)")
    parser.add_argument("--config", metavar="FILE", help="TOML or JSON file of settings; keys are the flags without '--'")
    parser.add_argument("--out", metavar="DIR", default="results", help="where results.json and results.csv go (default: results)")
    parser.add_argument("--print-config", action="store_true", help="print the effective configuration as JSON and exit")
    parser.add_argument("--quiet", action="store_true", help="no progress display")
    parser.add_argument(
        "--resume", action="store_true", help="continue the interrupted run in --out DIR from its last checkpoint (same settings)"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace results already in --out DIR (otherwise a new run refuses to touch them)"
    )
    parser.add_argument(
        "--seeds",
        metavar="LIST",
        help="repeat the scenario for each seed (e.g. 0,1,2) into DIR/seed-N/, "
        "then report mean and std per metric and method in DIR/report.md and DIR/summary.json",
    )
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


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code (2: bad input, found before Ray or any training started)."""
    args = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
        if args.print_config:
            print(json.dumps(cfg.to_dict(), indent=2, allow_nan=False))  # valid JSON: non-finite values were refused
            return 0
        from fedunlearn.data import DatasetStore

        from .runner import Experiment

        seeds = parse_seeds(args.seeds) if args.seeds else None
        if not str(args.out).strip():  # Path("") is the current folder: never what was meant
            raise ConfigError(f"out={args.out!r}: give the folder results go to, e.g. --out results")
        experiments = (
            [
                Experiment(
                    cfg.replace(seed=s),
                    out_dir=Path(args.out) / f"seed-{s}",
                    show_progress=not args.quiet,
                    resume=args.resume,
                    overwrite=args.overwrite,
                )
                for s in seeds
            ]
            if seeds
            else [Experiment(cfg, out_dir=args.out, show_progress=not args.quiet, resume=args.resume, overwrite=args.overwrite)]
        )
        for later in experiments[1:]:  # checked; loaded again when its turn comes, so one seed's data is in memory at a time
            if later.data_spec != experiments[0].data_spec:
                DatasetStore.drop(later.data_spec)
    except FedUnlearnError as err:
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return 2
    from .report import print_report
    from .summary import write_summary
    from .tracking import log_report

    runs = []
    try:
        with handle_signals():
            for experiment in experiments:
                results = experiment.run()
                print_report(results)
                runs.append(results)
    except Interrupted as stop:
        _exit_interrupted(stop.signum, experiments)
    except KeyboardInterrupt:  # a Ctrl-C that came before the handlers were in place
        _exit_interrupted(2, experiments)
    except FedUnlearnError as err:  # found once running (a client's error, Ray that did not start): one line, no traceback
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return 2 if isinstance(err, ConfigError) else 1
    title = f"fedunlearn report: preset {args.preset}" + (f", seeds {args.seeds}" if seeds else "")
    summary = write_summary(args.out, runs, title)
    log_report(experiments, args.out, summary)  # --tracking: the report and plots join each experiment's run
    where = f"{args.out}/seed-N/results.json" if seeds else f"{args.out}/results.json, {args.out}/results.csv"
    print(f"results: {where}; report: {args.out}/report.md ({len(summary['plots'])} plots in {args.out}/plots)")
    return 0


def _exit_interrupted(signum: int, experiments: list[Any]) -> None:
    """One line saying where the run stopped and how to go on; then exit at once with 128 + the signal.

    os._exit, not sys.exit: Ray is shut down by now, but the ServerApp thread Flower started is still waiting
    for replies that will never come, and a normal exit would wait for it (up to --round-timeout).
    """
    import signal

    name = signal.Signals(signum).name
    where = ""
    for experiment in experiments:
        if experiment.results.get("status", "").startswith("interrupted") and experiment.checkpoints is not None:
            state = experiment.checkpoints.root / "state.json"
            where = (
                f"; the checkpoint in {experiment.checkpoints.root} continues it: the same command with --resume"
                if state.exists()
                else "; no checkpoint was written yet (every --checkpoint-every rounds): rerun with --overwrite"
            )
    print(f"interrupted by {name}: Ray was shut down{where}", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(128 + signum)


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
