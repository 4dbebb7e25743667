"""The restructuring of the methods is bit-identical: a complete in-process run against values recorded before it.

The expected values are what the code printed before issue 13's restructuring (method registry, reply pipeline),
re-taken once for the flwr-datasets partition: printed by the pre-restructuring code with the new split (branch
`plug`) and by the restructured code, identical to the last digit. Re-taken once more for issue 15's streamed
training round: its running FedAvg sum is float64 (cast to float32 at the end) where Flower's summed float32 products
in float32, so the global models moved by float32 rounding (dist_para / dist_output by 1e-10..6e-7 relative, every
accuracy and cost unchanged); the gathered path (`streaming=False`) still reproduced the previous values exactly.
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
    cfg = build_config(
        "smoke",
        overrides={
            "model": "mlp",
            "rounds": 3,
            "methods": METHODS,
            "federaser_interval": 1,
            "finetune_rounds": 1,
            "pga_rounds": 1,
            "shadow_mia": False,
        },
    )
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
    "original": {
        "acc_test": 0.11388888888888889,
        "acc_remained": 0.12282608695652174,
        "acc_deleted": 0.8173913043478261,
        "backdoor_asr": 1.0,
        "dist_para": 0.43796808053178055,
        "dist_output": 0.00305673583481823,
    },
    "retrain": {
        "acc_test": 0.4888888888888889,
        "acc_remained": 0.5260869565217391,
        "acc_deleted": 0.14347826086956522,
        "backdoor_asr": 0.006172839506172839,
        "dist_para": 0.0,
        "dist_output": 0.0,
        "rounds": 3,
        "participations": 12,
        "bytes_down": 839124,
        "bytes_up": 837228,
    },
    "iau": {
        "acc_test": 0.49722222222222223,
        "acc_remained": 0.5315217391304348,
        "acc_deleted": 0.14782608695652175,
        "backdoor_asr": 0.0,
        "dist_para": 0.5866409343695312,
        "dist_output": 0.0022141645424805273,
        "rounds": 3,
        "participations": 14,
        "bytes_down": 979562,
        "bytes_up": 977274,
    },
    "iau-cached": {
        "acc_test": 0.1527777777777778,
        "acc_remained": 0.1565217391304348,
        "acc_deleted": 0.0391304347826087,
        "backdoor_asr": 0.0,
        "dist_para": 0.5086849693061948,
        "dist_output": 0.006678225649779455,
        "rounds": 2,
        "participations": 2,
        "bytes_down": 139974,
        "bytes_up": 139670,
    },
    "finetune": {
        "acc_test": 0.3333333333333333,
        "acc_remained": 0.35108695652173916,
        "acc_deleted": 0.8652173913043478,
        "backdoor_asr": 1.0,
        "dist_para": 0.5562308778264826,
        "dist_output": 0.0021198358400902687,
        "rounds": 1,
        "participations": 4,
        "bytes_down": 279708,
        "bytes_up": 279076,
    },
    "gradient-ascent": {
        "acc_test": 0.1361111111111111,
        "acc_remained": 0.13369565217391305,
        "acc_deleted": 0.030434782608695653,
        "backdoor_asr": 0.0,
        "dist_para": 0.4943907339401212,
        "dist_output": 0.006244992013994811,
        "rounds": 2,
        "participations": 2,
        "bytes_down": 139974,
        "bytes_up": 139670,
    },
    "federaser": {
        "acc_test": 0.4305555555555556,
        "acc_remained": 0.45217391304347826,
        "acc_deleted": 0.11304347826086956,
        "backdoor_asr": 0.0,
        "dist_para": 0.1008621324705327,
        "dist_output": 0.0002776221643418669,
        "rounds": 2,
        "participations": 8,
        "bytes_down": 559416,
        "bytes_up": 558152,
    },
    "pga": {
        "acc_test": 0.39166666666666666,
        "acc_remained": 0.41304347826086957,
        "acc_deleted": 0.06956521739130435,
        "backdoor_asr": 0.0,
        "dist_para": 0.560846173151986,
        "dist_output": 0.004487702513061877,
        "rounds": 2,
        "participations": 5,
        "bytes_down": 419429,
        "bytes_up": 348997,
    },
    "imu": {
        "acc_test": 0.1527777777777778,
        "acc_remained": 0.14456521739130435,
        "acc_deleted": 0.8347826086956521,
        "backdoor_asr": 1.0,
        "dist_para": 0.4004888199613192,
        "dist_output": 0.0014098167579504662,
        "rounds": 1,
        "participations": 1,
        "bytes_down": 69918,
        "bytes_up": 2973,
    },
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
