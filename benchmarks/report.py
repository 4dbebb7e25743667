"""Render saved benchmark results as Markdown tables (dates, machines, medians, paths side by side, targets) for BENCHMARKS.md.

python -m benchmarks.report                       # every JSON under benchmarks/results/, to stdout
python -m benchmarks.report --out /tmp/tables.md  # the same into a file
python -m benchmarks.report benchmarks/results/training-100x600.json
python -m benchmarks.report --console             # each benchmark's own console report instead
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import markdown, memory, training, unlearning
from .common import RESULTS_DIR

PRINTERS = {"training": training.print_report, "memory": memory.print_report, "unlearning": unlearning.print_report}


def main(argv: list[str] | None = None) -> int:
    """Render the results files given (default: all saved ones) as Markdown."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="*", help="results JSON files (default: benchmarks/results/*.json)")
    parser.add_argument("--out", default=None, help="write the Markdown to this file instead of stdout")
    parser.add_argument("--console", action="store_true", help="print each benchmark's own console report (as when it ran)")
    args = parser.parse_args(argv)
    files = [Path(f) for f in args.files] or sorted(RESULTS_DIR.glob("*.json"))
    if not files:
        print(f"no results under {RESULTS_DIR}: run a benchmark first (see BENCHMARKS.md)", file=sys.stderr)
        return 1
    loaded = []
    for path in files:
        try:
            result = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            print(f"{path}: cannot be read as JSON ({err}); skipped", file=sys.stderr)
            continue
        kind = markdown.kind_of(result)
        if kind not in markdown.RENDERERS:
            print(f"{path}: not a benchmark result (benchmark={kind!r}); skipped", file=sys.stderr)
            continue
        loaded.append((path, result))
    if not loaded:
        print("none of the files is a benchmark result", file=sys.stderr)
        return 1
    if args.console:
        for path, result in loaded:
            kind = markdown.kind_of(result)
            if kind in PRINTERS:
                print(f"\n### {path.name}: `{result.get('command')}`")
                PRINTERS[kind](result)
        return 0
    text = markdown.document(loaded)
    if args.out:
        Path(args.out).write_text(text)
        print(f"wrote {args.out}")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
