"""benchmarks/scaling.py: the grid, the crossing rule and a miniature run that writes the JSON and the plot."""

from __future__ import annotations

import json

import pytest

from benchmarks import scaling


def test_the_default_grid_moves_one_factor_at_a_time_around_the_base():
    grid = scaling.default_grid()
    assert grid[0] == scaling.BASE and len(grid) == len(set(grid)) == 7
    for clients, rounds, examples in grid[1:]:
        changed = [a != b for a, b in zip((clients, rounds, examples), scaling.BASE, strict=True)]
        assert sum(changed) == 1  # every other point differs from the base in exactly one axis
    assert {p[1] for p in grid} == {10, 30, 100} and {p[0] for p in grid} == {10, 100, 1000} and {p[2] for p in grid} == {60, 240, 600}


@pytest.mark.parametrize("text", ["10x10", "10x10x0", "ax10x60", "10x10x60x1"])
def test_a_malformed_grid_point_is_refused_with_the_form_expected(text):
    with pytest.raises(SystemExit, match="CLIENTSxROUNDSxEXAMPLES"):
        scaling.parse_grid(text)


def _point(clients, rounds, examples, cached_speedup):
    return {"clients": clients, "rounds": rounds, "examples": examples, "methods": {"iau-cached": {"speedup_wall": cached_speedup}}}


def test_the_smallest_crossing_is_the_least_retraining_work_that_passes_1000x():
    points = [_point(10, 100, 60, 1500.0), _point(100, 10, 60, 1001.0), _point(10, 10, 600, 999.0), _point(1000, 10, 60, None)]
    # 10*100*60 = 100*10*60 = 60,000 examples each: the first met wins ties; 10*10*600 does not pass; None is not a pass
    assert scaling.smallest_crossing(points) is points[0]
    assert scaling.smallest_crossing([_point(10, 10, 60, 999.9)]) is None
    assert scaling.smallest_crossing([_point(1000, 10, 60, 2000.0), _point(10, 30, 60, 1000.0)])["rounds"] == 30  # 18,000 < 600,000


def test_a_miniature_grid_runs_every_method_and_writes_json_and_plot(tmp_path):
    out = tmp_path / "scaling.json"
    code = scaling.main(
        [
            "--grid",
            "3x2x20",
            "--model",
            "mlp",
            "--engine",
            "local",
            "--in-process",
            "--out",
            str(out),
            "--data-root",
            str(tmp_path / "data"),
        ]
    )
    result = json.loads(out.read_text())
    (point,) = result["points"]
    assert code == 0 and point["status"] == "complete"
    assert set(point["methods"]) == set(scaling.METHODS)
    assert point["methods"]["retrain"]["rounds"] == 2  # retraining redoes the 2 training rounds
    assert point["methods"]["iau-cached"]["speedup_bytes"] > 1  # one client contacted instead of all, every round
    assert (tmp_path / "scaling.png").stat().st_size > 0
