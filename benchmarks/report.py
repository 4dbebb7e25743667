"""Print the tables of saved benchmark results again (Markdown), e.g. to paste into BENCHMARKS.md.

    python -m benchmarks.report                       # every JSON under benchmarks/results/
    python -m benchmarks.report benchmarks/results/training-100x600.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import memory, training, unlearning
from .common import RESULTS_DIR

PRINTERS = {"training": training.print_report, "memory": memory.print_report, "unlearning": unlearning.print_report}


def main(argv: list[str] | None = None) -> int:
    """Print the report of each results file given (default: all saved ones)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="*", help="results JSON files (default: benchmarks/results/*.json)")
    args = parser.parse_args(argv)
    files = [Path(f) for f in args.files] or sorted(RESULTS_DIR.glob("*.json"))
    if not files:
        print(f"no results under {RESULTS_DIR}: run a benchmark first (see BENCHMARKS.md)", file=sys.stderr)
        return 1
    for path in files:
        result = json.loads(path.read_text())
        kind = result.get("benchmark")
        if kind not in PRINTERS:
            print(f"{path}: not a benchmark result (benchmark={kind!r}); skipped", file=sys.stderr)
            continue
        print(f"\n### {path.name}: `{result.get('command')}`")
        PRINTERS[kind](result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
