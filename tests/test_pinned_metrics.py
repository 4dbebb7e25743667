"""The restructuring of the methods is bit-identical: a complete in-process run against values recorded before it.

The expected values are what the code printed before issue 13's restructuring (method registry, reply pipeline).
A change of the data split (e.g. flwr-datasets partitioners) legitimately changes them: regenerate with
`python tests/test_pinned_metrics.py` and paste the dict it prints over PINNED.
"""

from __future__ import annotations

import math
import sys
import tempfile
from pathlib import Path

import torch

from fedunlearn.config import build_config
from simulations.runner import Experiment
from strategies import app_config
from strategies.client_app import build_client_app
from strategies.local_grid import LocalGrid

METHODS = "retrain,iau,iau-cached,finetune,gradient-ascent,federaser,pga,imu"
METRICS = ("acc_test", "acc_remained", "acc_deleted", "backdoor_asr", "dist_para", "dist_output")
COSTS = ("rounds", "participations", "bytes_down", "bytes_up")


def measured(tmp: Path) -> dict[str, dict[str, float | int]]:
    """Every method's metrics and message costs of a small complete run (one torch thread: sums in one order)."""
    torch.set_num_threads(1)
    cfg = build_config("smoke", overrides={"model": "mlp", "rounds": 3, "methods": METHODS, "federaser_interval": 1,
                                           "finetune_rounds": 1, "pga_rounds": 1, "shadow_mia": False})
    experiment = Experiment(cfg, out_dir=None, show_progress=False)
    app = build_client_app(app_config.client_spec_for(cfg, str(tmp / "caches")))
    experiment.drive(LocalGrid(app, cfg.num_clients))
    out: dict[str, dict[str, float | int]] = {}
    for name, model in experiment.results["models"].items():
        entry: dict[str, float | int] = {k: model[k] for k in METRICS}
        if "cost" in model:
            entry.update({k: model["cost"][k] for k in COSTS})
        out[name] = entry
    return out


# Regenerate: `python tests/test_pinned_metrics.py` prints this dict from the current code.
PINNED: dict[str, dict[str, float | int]] = {
    'original': {'acc_test': 0.1111111111111111, 'acc_remained': 0.1108695652173913, 'acc_deleted': 0.8260869565217391, 'backdoor_asr': 1.0, 'dist_para': 0.4416342107191486, 'dist_output': 0.0033587204098391036},
    'retrain': {'acc_test': 0.5111111111111111, 'acc_remained': 0.5293478260869565, 'acc_deleted': 0.16521739130434782, 'backdoor_asr': 0.0, 'dist_para': 0.0, 'dist_output': 0.0, 'rounds': 3, 'participations': 12, 'bytes_down': 839124, 'bytes_up': 837228},
    'iau': {'acc_test': 0.5444444444444444, 'acc_remained': 0.5673913043478261, 'acc_deleted': 0.1782608695652174, 'backdoor_asr': 0.0, 'dist_para': 0.5631461882585695, 'dist_output': 0.0016950919070546256, 'rounds': 3, 'participations': 14, 'bytes_down': 979562, 'bytes_up': 977274},
    'iau-cached': {'acc_test': 0.16111111111111112, 'acc_remained': 0.1532608695652174, 'acc_deleted': 0.030434782608695653, 'backdoor_asr': 0.0, 'dist_para': 0.5024178919284722, 'dist_output': 0.006093763832339189, 'rounds': 2, 'participations': 2, 'bytes_down': 139974, 'bytes_up': 139670},
    'finetune': {'acc_test': 0.31666666666666665, 'acc_remained': 0.33369565217391306, 'acc_deleted': 0.8739130434782608, 'backdoor_asr': 1.0, 'dist_para': 0.5440098162953662, 'dist_output': 0.0019931014419853456, 'rounds': 1, 'participations': 4, 'bytes_down': 279708, 'bytes_up': 279076},
    'gradient-ascent': {'acc_test': 0.14722222222222223, 'acc_remained': 0.13804347826086957, 'acc_deleted': 0.030434782608695653, 'backdoor_asr': 0.0, 'dist_para': 0.4838995869227102, 'dist_output': 0.005742608219022966, 'rounds': 2, 'participations': 2, 'bytes_down': 139974, 'bytes_up': 139670},
    'federaser': {'acc_test': 0.5888888888888889, 'acc_remained': 0.6097826086956522, 'acc_deleted': 0.17391304347826086, 'backdoor_asr': 0.0, 'dist_para': 0.08180178411353939, 'dist_output': 0.00012028522972589902, 'rounds': 2, 'participations': 8, 'bytes_down': 559416, 'bytes_up': 558152},
    'pga': {'acc_test': 0.44722222222222224, 'acc_remained': 0.45869565217391306, 'acc_deleted': 0.08695652173913043, 'backdoor_asr': 0.0, 'dist_para': 0.5546343172567806, 'dist_output': 0.004731642486553432, 'rounds': 2, 'participations': 5, 'bytes_down': 419429, 'bytes_up': 348997},
    'imu': {'acc_test': 0.15833333333333333, 'acc_remained': 0.16195652173913044, 'acc_deleted': 0.8304347826086956, 'backdoor_asr': 1.0, 'dist_para': 0.40190127525841474, 'dist_output': 0.0015940441364768452, 'rounds': 1, 'participations': 1, 'bytes_down': 69918, 'bytes_up': 2973},
}


def test_every_method_reproduces_the_pinned_metrics(tmp_path):
    got = measured(tmp_path)
    assert set(got) == set(PINNED)
    for name, expected in PINNED.items():
        for key, value in expected.items():
            actual = got[name][key]
            same = actual == value or (isinstance(value, float) and math.isnan(value) and math.isnan(actual))
            assert same, f"{name}.{key}: {actual!r} != pinned {value!r}"


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        values = measured(Path(tmp))
    sys.stdout.write("PINNED: dict[str, dict[str, float | int]] = {\n")
    for name, entry in values.items():
        sys.stdout.write(f"    {name!r}: {entry!r},\n")
    sys.stdout.write("}\n")
