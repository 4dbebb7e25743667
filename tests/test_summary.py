"""Across-seed summaries, rankings and the written report."""

from __future__ import annotations

import json

import pytest

from fedunlearn.errors import ConfigError
from simulations.run import parse_seeds
from simulations.summary import aggregate, rankings, write_summary


def fake_run(seed, iau_asr, ga_asr, iau_wall):
    def model(asr, acc, wall=None, rounds=None):
        entry = {
            "acc_test": acc,
            "acc_remained": acc,
            "acc_deleted": 0.5,
            "backdoor_asr": asr,
            "dist_para": 1.0,
            "dist_output": 0.01,
            "mia_auc": 0.5,
            "mia_shadow_auc": 0.6,
            "mia": {
                "loss": {"auc": 0.5, "scored": {"members": 30, "non_members": 30, "which": "test"}},
                "shadow": {"auc": 0.9, "scored": {"members": 30, "non_members": 30, "which": "test"}},
            },
        }
        if wall is not None:
            entry["cost"] = {
                "wall_s": wall,
                "client_compute_s": 0.0,
                "rounds": rounds,
                "participations": 1,
                "bytes_down": 100,
                "bytes_up": 50,
            }
        return entry

    return {
        "config": {
            "seed": seed,
            "dataset": "digits",
            "num-clients": 10,
            "partition": "iid",
            "alpha": 0.5,
            "rounds": 30,
            "forget-client": 0,
            "forget-samples": "all",
            "withdraw-round": None,
        },
        "machine": {"cpus": 2, "platform": "test", "gpu": None},
        "models": {
            "original": model(0.9, 0.95),
            "retrain": model(0.02, 0.96, 20.0, 30),
            "iau": model(iau_asr, 0.93, iau_wall, 1),
            "gradient-ascent": model(ga_asr, 0.80, 0.1, 1),
        },
        "history": {"original": [{"round": 1, "acc_test": 0.5}, {"round": 2, "acc_test": 0.7}]},
    }


def test_mean_and_sample_std_per_metric_and_method():
    runs = [fake_run(0, 0.10, 0.0, 0.5), fake_run(1, 0.20, 0.1, 0.7), fake_run(2, 0.30, 0.2, 0.9)]
    summary = aggregate(runs)
    assert summary["iau"]["backdoor_asr"]["mean"] == pytest.approx(0.2)
    assert summary["iau"]["backdoor_asr"]["std"] == pytest.approx(0.1)  # sample std of 0.1, 0.2, 0.3
    assert summary["iau"]["asr_gap"]["mean"] == pytest.approx(0.18)
    assert summary["iau"]["bytes"]["mean"] == 150
    assert summary["retrain"]["wall_s"]["std"] == 0.0
    assert "wall_s" not in summary["original"]


def test_rankings_order_methods_by_each_criterion():
    summary = aggregate([fake_run(0, 0.10, 0.0, 0.5)])
    ranked = rankings(summary)
    assert ranked["asr_gap"] == [["gradient-ascent"], ["iau"]]  # |0.0-0.02| < |0.10-0.02|
    assert ranked["acc_test"] == [["iau"], ["gradient-ascent"]]  # higher is better
    assert ranked["wall_s"] == [["gradient-ascent"], ["iau"]]
    assert "retrain" not in ranked["wall_s"][0]


def test_methods_equal_at_the_printed_precision_rank_equal():
    run = fake_run(0, 0.10, 0.1002, 0.5)
    run["models"]["imu"] = {**run["models"]["iau"], "backdoor_asr": 0.3}
    ranked = rankings(aggregate([run]))
    assert ranked["asr_gap"] == [["iau", "gradient-ascent"], ["imu"]]  # 0.080 and 0.0802 print alike
    assert ranked["rounds"] == [["iau", "gradient-ascent", "imu"]]


def test_chance_bound_is_two_standard_errors_of_a_null_auc():
    from simulations.summary import chance_bound

    # Hanley-McNeil at AUC 0.5: var = (n1 + n2 + 1) / (12 n1 n2); 30 vs 30: sqrt(61 / 10800) = 0.07516
    assert chance_bound(30, 30) == pytest.approx(0.5 + 2 * 0.075155, abs=1e-5)


def test_report_files_are_written(tmp_path):
    runs = [fake_run(0, 0.1, 0.0, 0.5), fake_run(1, 0.2, 0.1, 0.7)]
    document = write_summary(tmp_path, runs, "test report")
    report = (tmp_path / "report.md").read_text()
    assert "| **retrain** (reference) |" in report
    assert "0.150 ± 0.071" in report  # iau ASR over the two seeds
    assert "ASR gap to retrain (lower is better): gradient-ascent > iau" in report
    assert "Seed 0, loss attack on the original model: AUC 0.500" in report and "does NOT beat chance" in report
    assert (
        "Seed 1, shadow attack on the original model: AUC 0.900 (30 members vs 30 non-members; chance up to 0.650): beats chance" in report
    )
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["seeds"] == [0, 1]
    assert {p.split("/")[-1] for p in document["plots"]} == {"metrics.png", "quality_vs_cost.png", "accuracy_per_round.png"}
    for path in document["plots"]:
        assert (tmp_path / "plots" / path.split("/")[-1]).stat().st_size > 1000
    header = (tmp_path / "summary.csv").read_text().splitlines()[0]
    assert header.startswith("model,acc_test_mean,acc_test_std")


def test_seed_lists_are_checked():
    assert parse_seeds("0,1,2") == [0, 1, 2]
    for bad in ("0,x", "1,1", "-1"):
        with pytest.raises(ConfigError, match="seeds="):
            parse_seeds(bad)
