"""Results on disk: results.json (the contract in README.md) and results.csv, rewritten atomically as they grow."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from fedunlearn.errors import ConfigError

METRIC_KEYS = ("acc_test", "acc_remained", "acc_deleted", "backdoor_asr", "dist_para", "dist_output", "mia_auc")
MODEL_ORDER = ("original", "retrain")


def finite_or_none(value: Any) -> Any:
    """JSON has no inf/NaN: write them as null (recursively)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def csv_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One flat row per model: metrics, then cost_*, speedup_* and storage_* columns."""
    rows = []
    for name, model in results.get("models", {}).items():
        row: dict[str, Any] = {"model": name}
        for key, value in model.items():
            if isinstance(value, dict):
                if key in ("cost", "speedup", "storage"):
                    row.update({f"{key}_{k}": v for k, v in value.items()})
            elif not isinstance(value, list):
                row[key] = value
        rows.append(row)
    return rows


def stream_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """A stream of withdrawals: one row per (request, model), the models as they were after that request."""
    rows = []
    for index, step in enumerate(results.get("stream", []), 1):
        for row in csv_rows({"models": step.get("models", {})}):
            rows.append({"request": index, "client": step["request"]["client"], "samples": step["request"]["samples"], **row})
    return rows


def _csv_text(rows: list[dict[str, Any]]) -> str:
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def write_results(out_dir: str | Path, results: dict[str, Any]) -> None:
    """Write DIR/results.json, DIR/results.csv and, for a stream, DIR/stream.csv (each replaced atomically)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    clean = finite_or_none(results)
    _atomic_write(out / "results.json", json.dumps(clean, indent=2, sort_keys=False) + "\n")
    _atomic_write(out / "results.csv", _csv_text(csv_rows(clean)))
    if clean.get("stream"):
        _atomic_write(out / "stream.csv", _csv_text(stream_rows(clean)))


def read_results(out_dir: str | Path) -> dict[str, Any]:
    """Load DIR/results.json; a damaged one raises ConfigError naming the file."""
    path = Path(out_dir) / "results.json"
    try:
        results = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(
            f"{path} is not valid JSON ({err}; truncated?): move it away, or use --overwrite to replace it, or another --out DIR"
        ) from None
    if not isinstance(results, dict):
        raise ConfigError(
            f"{path} holds a {type(results).__name__}, not fedunlearn results: move it away, or use "
            "--overwrite to replace it, or another --out DIR"
        )
    return results


def existing_status(out_dir: str | Path) -> str | None:
    """The status of the run whose results.json is in DIR, in one short line (None: no results there).

    A failed run's status embeds its error, which can be a long multi-line traceback from Ray: only
    its first line, cut short, is shown.
    """
    if not (Path(out_dir) / "results.json").exists():
        return None
    status = str(read_results(out_dir).get("status", "unknown")).strip()
    first = status.splitlines()[0] if status else "unknown"
    if first.startswith("failed"):
        reason = first.removeprefix("failed").lstrip(": ")
        return f"failed: {reason[:160]}{'...' if len(reason) > 160 else ''}" if reason else "failed"
    return first.split(" ", 1)[0]  # running, complete, interrupted


def check_writable(out_dir: str | Path) -> None:
    """DIR is a folder that can be written, or can be made one; raises ConfigError saying why not. Creates nothing.

    A test file is written (and removed) in DIR, or in its nearest existing parent if DIR does not exist yet:
    a check that leaves no folder behind when a later check refuses the run.
    """
    out = Path(out_dir)
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(
            f"out={str(out)!r}: cannot be used as the results folder ({existing} is a file): give a folder (created if missing)"
        )
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".fedunlearn-write-test-"):
            pass
    except OSError as err:
        raise ConfigError(
            f"out={str(out)!r}: cannot be used as the results folder ({existing}: {err.strerror or err}): give a "
            "writable folder (created if missing)"
        ) from None
