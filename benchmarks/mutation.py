"""Mutation testing of the modules whose bugs would silently falsify results, module by module (docs/testing.md).

    python -m benchmarks.mutation                      # all four modules
    python -m benchmarks.mutation iau cache            # some of them
    python -m benchmarks.mutation --max-children 4     # more parallel workers

For each module, mutmut (configured in pyproject.toml's [tool.mutmut]) runs in a scratch copy of the tree,
.mutation/<module>/, with only that module mutated and only the fast tests that exercise it selected, so a
mutant of metrics.py never waits for the IAU pooled-reference tests. Hypothesis runs its "mutation" profile
there (3 derandomized examples per corruption kind, every kind still a pytest parameter). The score per module
(killed / total, timeouts and survivors listed) is printed and written to .mutation/summary.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / ".mutation"
KILLS = "tests/test_mutation_kills.py"
# module -> (file to mutate, the fast tests that exercise it: hand-computed values, in-process references, no Ray)
MODULES: dict[str, tuple[str, list[str]]] = {
    # The math by hand; the distributed-vs-pooled equality tests (seconds each) run in the suite, not per mutant.
    "iau": ("fedunlearn/iau.py", [KILLS, "tests/test_iau_steps.py", "-k", "not multi_step and not stale_cached and not calibration"]),
    "cache": ("fedunlearn/cache.py", [KILLS, "tests/test_cache.py"]),
    "metrics": ("fedunlearn/metrics.py", [KILLS, "tests/test_metrics.py"]),
    "validation": ("strategies/validation.py", [KILLS, "tests/test_validation.py"]),
    # The baselines' math (FedEraser's calibration, PGA's projection and ascent, IMU's weights): the Flower-free tests.
    "baselines": ("fedunlearn/baselines.py", [KILLS, "tests/test_baselines.py", "tests/test_pga.py"]),
}
STATUSES = (
    "killed",
    "survived",
    "timeout",
    "no tests",
    "suspicious",
    "segfault",
    "skipped",
    "not checked",
    "check was interrupted by user",
)


def copy_tree(target: Path) -> None:
    """The working tree as git sees it (tracked and untracked, not ignored files) copied to `target`."""
    files = (
        subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True, capture_output=True)
        .stdout.decode()
        .split("\0")
    )
    for name in filter(None, files):
        source = ROOT / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)


def module_config(path: str, tests: list[str]) -> str:
    """pyproject.toml's [tool.mutmut] narrowed to one module and its tests."""
    listed = ", ".join(json.dumps(t) for t in tests)
    return (
        f'[tool.mutmut]\nsource_paths = ["fedunlearn", "strategies"]\nonly_mutate = [{json.dumps(path)}]\n'
        f'also_copy = ["simulations", "benchmarks"]\npytest_add_cli_args_test_selection = [{listed}, "-m", "not ray"]\n'
        'pytest_add_cli_args = ["-p", "no:cacheprovider"]\nprocess_isolation = "forkserver"\n\n'
    )


def run_module(name: str, max_children: int) -> dict[str, Any]:
    """Run mutmut on one module in its scratch copy; return its score."""
    path, tests = MODULES[name]
    work = WORK / name
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    copy_tree(work)
    pyproject = (work / "pyproject.toml").read_text()
    pyproject = re.sub(r"\[tool\.mutmut\]\n.*?(?=^\[tool\.)", lambda _: module_config(path, tests), pyproject, flags=re.S | re.M)
    (work / "pyproject.toml").write_text(pyproject)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # mutmut puts mutants/ first on the path itself
    env.update(FEDUNLEARN_HYPOTHESIS_PROFILE="mutation", FLWR_TELEMETRY_ENABLED="0", RAY_USAGE_STATS_ENABLED="0")
    mutmut = [sys.executable, "-m", "mutmut"]
    with open(work / "mutmut-run.log", "w") as log:
        subprocess.run([*mutmut, "run", "--max-children", str(max_children)], cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT)
    listing = subprocess.run([*mutmut, "results", "--all", "true"], cwd=work, env=env, capture_output=True, text=True).stdout
    return score(name, listing)


def score(name: str, listing: str) -> dict[str, Any]:
    """Counts per status from `mutmut results --all true`, and the mutants that were not killed."""
    status_of: dict[str, str] = {}
    for line in listing.splitlines():
        mutant, _, status = line.strip().rpartition(": ")
        if "__mutmut_" in mutant and status in STATUSES:
            status_of[mutant] = status
    counts = Counter(status_of.values())
    total = len(status_of)
    return {
        "module": MODULES[name][0],
        "total": total,
        "killed": counts["killed"],
        "timeout": counts["timeout"],
        "counts": dict(counts),
        "score": counts["killed"] / total if total else None,
        "not_killed": sorted(m for m, s in status_of.items() if s != "killed"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("modules", nargs="*", help=f"modules to mutate, of {', '.join(MODULES)} (default: all)")
    parser.add_argument("--max-children", type=int, default=os.cpu_count() or 1, help="parallel mutant workers")
    args = parser.parse_args(argv)
    unknown = [m for m in args.modules if m not in MODULES]
    if unknown:
        parser.error(f"unknown module(s) {', '.join(unknown)}: choose from {', '.join(MODULES)}")
    WORK.mkdir(exist_ok=True)
    summary_path = WORK / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    for name in args.modules or list(MODULES):
        result = run_module(name, args.max_children)
        summary[name] = result
        summary_path.write_text(json.dumps(summary, indent=2))
        print(
            f"{result['module']}: {result['killed']} / {result['total']} killed"
            + (f" ({result['score']:.1%})" if result["score"] is not None else "")
            + f", {result['timeout']} timeouts, not killed: {len(result['not_killed'])}  {result['counts']}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
