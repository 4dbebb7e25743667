"""The printed comparison table: every model's removal quality beside its cost and speedup against retraining."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

HEADERS = {
    "acc_test": "ACC test",
    "acc_remained": "ACC rem",
    "acc_deleted": "ACC del",
    "backdoor_asr": "ASR",
    "dist_para": "DIST para",
    "dist_output_deleted": "DIST del",
    "dist_output_triggered": "DIST trig",
    "dist_output": "DIST test",
    "mia_auc": "MIA loss",
}
# The output distance leads on the deleted set and triggered inputs (on the clean test set the original is closest).
COLUMNS = tuple(HEADERS)


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _bytes(value: Any) -> str:
    if value is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(value) < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return str(value)


def _speed(value: Any) -> str:
    return "-" if value is None else f"{value:.1f}x"


def results_table(results: dict[str, Any]) -> Table:
    """A rich Table with one row per model (original, retrain, then the methods)."""
    cfg = results["config"]
    title = (
        f"{cfg['dataset']}, {cfg['num-clients']} clients ({cfg['partition']}), {cfg['rounds']} rounds; "
        f"client {cfg['forget-client']} forgets '{cfg['forget-samples']}' (|S| = {results.get('forget_count', '?')})"
    )
    table = Table(title=title, title_justify="left")
    table.add_column("model")
    for key in COLUMNS:
        table.add_column(HEADERS[key], justify="right")
    for key in ("sec", "rounds", "bytes", "x sec", "x rounds", "x bytes", "stored srv/cli"):
        table.add_column(key, justify="right")
    for name, model in results["models"].items():
        cost = model.get("cost", {})
        spd = model.get("speedup", {})
        total_bytes = cost.get("bytes_down", 0) + cost.get("bytes_up", 0) if cost else None
        stored = model.get("storage")
        stored_text = f"{_bytes(stored.get('server_bytes'))} / {_bytes(stored.get('client_bytes'))}" if isinstance(stored, dict) else "-"
        table.add_row(
            name,
            *(_fmt(model.get(k)) for k in COLUMNS),
            _fmt(cost.get("wall_s"), 2) if cost else "-",
            _fmt(cost.get("rounds")) if cost else "-",
            _bytes(total_bytes),
            _speed(spd.get("wall")),
            _speed(spd.get("rounds")),
            _speed(spd.get("bytes")),
            stored_text,
        )
    return table


def print_report(results: dict[str, Any], console: Console | None = None) -> None:
    """Print the comparison table and the phase costs."""
    console = console or Console(width=200)
    console.print(results_table(results))
    phases = results.get("phases", {})
    if phases:
        parts = [
            f"{name} {cost['wall_s']:.2f} s / {cost['rounds']} rounds"
            for name, cost in phases.items()
            if not name.startswith(("unlearn:", "continue:"))
        ]
        console.print("phases: " + "; ".join(parts), highlight=False)
