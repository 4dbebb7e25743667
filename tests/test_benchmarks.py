"""Miniatures of the benchmarks in benchmarks/ (seconds each), so they cannot rot: JSON shape and sane numbers.

No timing thresholds: the machine is shared. Most miniatures serve every node in-process (`--engine local
--in-process`: the same ServerApp/ClientApp code, no Ray); one runs the Ray path end to end in a child
process, as the real measurements do, and carries the `ray` marker (CI runs it too).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is a folder of scripts at the repository root, not an installed package
    sys.path.insert(0, str(ROOT))

from benchmarks import data, markdown, memory, reliability, report, training, unlearning, variants  # noqa: E402
from benchmarks.common import RESULTS_DIR, PeakMonitor, process_role  # noqa: E402

MCMAHAN_PARAMETERS = 1_663_370  # McMahan et al. (2017), 28x28 MNIST


def numbers_in(value, path=""):
    """Every number in a JSON value with its path."""
    if isinstance(value, bool):
        return
    if isinstance(value, (int, float)):
        yield path, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from numbers_in(item, f"{path}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from numbers_in(item, f"{path}[{i}]")


def assert_sane(result):
    """Every number finite; every duration and size non-negative; the envelope present."""
    assert result["schema"] == 1 and result["date"] and result["command"].startswith("python -m benchmarks.")
    assert result["machine"]["cpus"] >= 1 and result["machine"]["cpu"] and result["machine"]["hostname"]
    for path, number in numbers_in(result):
        assert math.isfinite(number), path
        key = path.rsplit(".", 1)[-1].split("[", 1)[0]
        if key.endswith(("_s", "_bytes", "_s_each")):
            assert number >= 0, (path, number)


def assert_training_run(run, clients, rounds, ray):
    """One path's run: every round timed, every client answered, memory measured; Ray start only where Ray ran."""
    assert run["ok"], run.get("error")
    assert run["rounds_measured"] == rounds and len(run["round_s"]) == rounds
    assert all(s > 0 for s in run["round_s"]) and run["first_round_s"] == run["round_s"][0]
    if rounds == 2:  # the steady state is rounds 2..R: here round 2 alone
        assert run["steady_round_s"] == run["round_s"][1]
    assert run["wall_s"] >= sum(run["round_s"]) and run["to_first_round_end_s"] >= run["first_round_s"]
    assert run["memory"]["driver_peak_rss_bytes"] > 50e6  # a process holding torch
    if "replies_per_round" in run:  # the Flower paths: one reply per client and round
        assert run["replies_per_round"] == [clients] * rounds
    if ray:
        assert run["ray_start_s"] > 0
        assert run["memory"]["num_worker_processes"] >= 1 and run["memory"]["worker_peak_rss_max_bytes"] > 50e6
    else:
        assert run["ray_start_s"] is None and run["memory"]["num_worker_processes"] == 0


def test_synthetic_mnist_gives_every_path_exactly_the_requested_examples(tmp_path):
    import torch
    from torchvision.datasets.mnist import read_image_file, read_label_file

    from benchmarks import flower_quickstart
    from benchmarks.variants import client_train_indices
    from fedunlearn.data import DataSpec, load_federated_data

    assert data.partition_size(600) == 750 and data.partition_size(60) == 75  # 600 = 750 - 150, 60 = 75 - 15
    info = data.prepare(3, 8, seed=1, root=tmp_path)
    raw = Path(info.root) / "MNIST" / "raw"
    images = read_image_file(str(raw / "train-images-idx3-ubyte"))
    labels = read_label_file(str(raw / "train-labels-idx1-ubyte"))
    assert images.shape == (30, 28, 28) and images.dtype == torch.uint8 and labels.shape == (30,)
    assert int(images.max()) > 0 and set(labels.tolist()) <= set(range(10))
    # fedunlearn's own MNIST loader, the quickstart-style DataLoader and the loop all see 8 training examples per client.
    federated = load_federated_data(DataSpec(dataset="mnist", data_dir=info.root, num_clients=3, backdoor_client=None))
    assert [len(t) for t in federated.client_train] == [8, 8, 8]
    for pid in range(3):
        trainloader, testloader = flower_quickstart.load_data(pid, 3, 32, info.root)
        assert len(trainloader.dataset) == 8 and len(testloader.dataset) == 2
    shards = client_train_indices(30, 3)
    assert [len(s) for s in shards] == [8, 8, 8]
    assert len(set(torch.cat(shards).tolist())) == 24  # disjoint


def test_peak_monitor_sees_a_child_processes_peak():
    # The child touches 300 MB, frees it and sleeps: only the kernel's high-water mark can still show it.
    code = "import time; b = bytearray(300 * 1024 * 1024); del b; time.sleep(1.0)"
    with PeakMonitor(interval=0.05) as monitor:
        proc = subprocess.Popen([sys.executable, "-c", code])
        time.sleep(0.8)
        monitor.sample()
        proc.wait()
    child = [p for p in monitor.peaks if p == proc.pid]
    assert child and monitor.peaks[proc.pid] >= 300 * 1024 * 1024
    measured = monitor.report()
    assert measured["driver_peak_rss_bytes"] > 0 and measured["total_rss_peak_bytes"] > 0
    assert process_role("ray::ClientAppActor") == "worker" and process_role("ray::IDLE") == "worker"
    assert process_role("ray::DashboardAgent") == "ray-system" and process_role("/x/raylet --raylet_socket_name=a") == "ray-system"


def miniature(tmp_path, *extra):
    """The flags every in-process training-style miniature shares."""
    return [
        "--clients",
        "3",
        "--examples",
        "8",
        "--rounds",
        "2",
        "--engine",
        "local",
        "--in-process",
        "--data-root",
        str(tmp_path / "data"),
        *extra,
    ]


def test_training_benchmark_miniature_runs_every_path_side_by_side(tmp_path):
    out = tmp_path / "training.json"
    code = training.main([*miniature(tmp_path), "--cohort-size", "2", "--out", str(out)])
    result = json.loads(out.read_text())
    assert code == 0, {v: r["summary"].get("errors") for v, r in result["variants"].items()}
    assert_sane(result)
    assert result["benchmark"] == "training" and result["settings"]["clients"] == 3 and result["settings"]["engine"] == "local"
    assert result["data"]["num_train"] == 30 and "synthetic" in result["data"]["description"]
    assert list(result["variants"]) == list(variants.VARIANTS)
    assert "not benchmark figures" in result["notes"][0]  # an in-process run says so
    runs = {name: v["runs"][0] for name, v in result["variants"].items()}
    assert all("replies_per_round" in runs[name] for name in ("flower-quickstart", "fedunlearn", "fedunlearn-cohort"))
    for name, run in runs.items():
        assert_training_run(run, clients=3, rounds=2, ray=False)
        assert result["variants"][name]["summary"]["steady_round_s"] == run["round_s"][1]
    assert runs["single-process-loop"]["examples_per_round"] == 24  # 3 clients x 8 examples, the quickstart's 80/20 split
    assert runs["flower-quickstart"]["grid_poll_interval_s"] is None  # LocalGrid does not poll
    # fedunlearn in both execution modes: cohort packs 3 virtual clients onto 2 nodes and trains the same model.
    per_node, cohort = runs["fedunlearn"], runs["fedunlearn-cohort"]
    assert per_node["execution"] == "per-node" and cohort["execution"] == "cohort"
    assert cohort["cohort_size"] == 2 and cohort["supernodes"] == 2
    assert per_node["final_parameter_norm"] > 0
    assert math.isclose(cohort["final_parameter_norm"], per_node["final_parameter_norm"], rel_tol=1e-6)
    assert per_node["bytes_per_round"] == cohort["bytes_per_round"] > 3 * MCMAHAN_PARAMETERS * 4 * 2  # down and up, per client
    comparison = result["comparison"]
    for key in (
        "fedunlearn_speedup_vs_flower",
        "fedunlearn_slowdown_vs_loop",
        "fedunlearn_cohort_speedup_vs_flower",
        "fedunlearn_cohort_slowdown_vs_loop",
        "flower_slowdown_vs_loop",
    ):
        assert comparison[key] > 0, key
    loop, flower = runs["single-process-loop"]["steady_round_s"], runs["flower-quickstart"]["steady_round_s"]
    assert comparison["fedunlearn_slowdown_vs_loop"] == pytest.approx(per_node["steady_round_s"] / loop)
    assert comparison["fedunlearn_cohort_speedup_vs_flower"] == pytest.approx(flower / cohort["steady_round_s"])
    # Two CPU targets and two H100 targets per fedunlearn path; the CPU ones are decided, the H100 ones need an H100.
    targets = result["targets"]
    assert [t["path"] for t in targets] == ["fedunlearn"] * 4 + ["fedunlearn-cohort"] * 4
    assert [t["met"] is None for t in targets] == [False, False, True, True] * 2
    assert all("needs an H100" in t["note"] for t in targets if "H100" in t["target"])
    cal = result["calibration"]
    assert cal["ok"] and cal["steps_per_round"] == 3 and cal["ideal_round_s"] > 0
    # The report renders the paths side by side, one column each, with the targets' verdicts.
    text = markdown.training(result)
    header = next(line for line in text.splitlines() if line.startswith("|  |"))
    assert [c.strip() for c in header.strip("|").split("|")][1:] == [variants.LABELS[v] for v in variants.VARIANTS]
    assert "not a benchmark figure" in text and text.count("| not measured |") == 4


def test_unlearning_benchmark_miniature_reports_every_registered_method(tmp_path):
    out = tmp_path / "unlearning.json"
    code = unlearning.main(
        [
            "--preset",
            "smoke",
            "--clients",
            "3",
            "--rounds",
            "1",
            "--set",
            "model=mlp",
            "--set",
            "train-limit=300",
            "--set",
            "pga-epochs=1",
            "--set",
            "imu-epochs=1",
            "--repeats",
            "1",
            "--engine",
            "local",
            "--in-process",
            "--out",
            str(out),
        ]
    )
    result = json.loads(out.read_text())
    assert code == 0, (result["errors"], {m: s["unfinished"] for m, s in result["methods"].items()})
    assert_sane(result)
    assert list(result["methods"]) == unlearning.registered_methods()
    assert result["scenario"]["num-clients"] == 3 and result["scenario"]["rounds"] == 1
    retrain = result["methods"]["retrain"]
    assert retrain["rounds"] == 1 and retrain["speedup_wall"] is None and retrain["bytes"] > 0
    for name, summary in result["methods"].items():
        assert summary["repeats"] == summary["repeats_finished"] == 1 and summary["unfinished"] == [], name
        assert summary["wall_s"] > 0 and summary["statuses"] == ["complete"], name
        if name != "retrain":
            assert summary["speedup_wall"] == pytest.approx(retrain["wall_s"] / summary["wall_s"]), name
    steps = result["scenario"].get("iau-steps", 2)  # the cached protocol: one message to client u per step
    assert result["methods"]["iau-cached"]["rounds"] == steps and result["methods"]["iau-cached"]["participations"] == steps
    assert result["grid_pull_interval_s"] is None  # in-process: nothing polls
    targets = {t["method"]: t for t in result["targets"]}
    assert targets["iau"]["required"] == 0.5 and targets["iau-cached"]["required"] == 1000
    for target in targets.values():
        assert target["measured"] > 0 and target["met"] is (target["measured"] >= target["required"]) and target["note"]
    text = markdown.unlearning(result)
    assert all(f"| {name} |" in text for name in result["methods"])


def test_unlearning_summary_leaves_out_methods_that_did_not_finish():
    finished = {
        "wall_s": 0.2,
        "client_compute_s": 0.1,
        "rounds": 1,
        "participations": 1,
        "bytes": 10,
        "speedup_wall": 50.0,
        "speedup_rounds": 30.0,
        "speedup_bytes": 100.0,
        "status": "complete",
        "error": None,
    }
    aborted = {**finished, "wall_s": 0.0003, "rounds": 0, "speedup_wall": 33000.0, "status": "aborted", "error": "client 0 offline"}
    summary = unlearning.summarise([aborted, finished, finished])
    assert summary["wall_s"] == 0.2 and summary["speedup_wall"] == 50.0  # the aborted repeat's 33000x is not a speedup
    assert summary["repeats"] == 3 and summary["repeats_finished"] == 2 and summary["unfinished"] == ["aborted: client 0 offline"]
    only_aborted = unlearning.summarise([aborted])
    assert only_aborted["speedup_wall"] is None and only_aborted["repeats_finished"] == 0
    targets = unlearning.targets_for({"retrain": {"wall_s": 10.0}, "iau-cached": only_aborted, "iau": summary}, 30, 0.1)
    assert targets[0]["met"] is None and "did not finish" in targets[0]["note"] and "client 0 offline" in targets[0]["note"]
    # iau: 50x against the required 15x; retrain 10 s over 1 round x 0.1 s poll gives a 100x ceiling.
    assert targets[1]["met"] is True and targets[1]["ceiling_from_poll_interval"] == pytest.approx(100.0)


def test_reliability_benchmark_miniature_survives_every_injected_fault(tmp_path):
    out = tmp_path / "reliability.json"
    code = reliability.main(
        ["--preset", "smoke", "--set", "model=mlp", "--set", "train-limit=300", "--set", "local-epochs=1", "--out", str(out)]
    )
    result = json.loads(out.read_text())
    assert code == 0
    assert_sane(result)
    table = result["fault_table"]
    assert table["status"] == "complete" and table["results_lost"] == 0
    assert table["config"]["num-clients"] == 5 and table["config"]["crash-client"] == 2
    kinds = {label.split(" (")[0] for label in table["rows"]}
    assert {"crash", "slow", "offline", "malicious"} <= kinds
    for label, row in table["rows"].items():
        assert row["injected"] >= 1 and row["survived"] == row["injected"], label
    assert table["rows"]["malicious"]["rejected"] == table["rows"]["malicious"]["injected"]  # rejected at the bound, every time
    rows = {r["variant"].split(",")[-1].strip(): r for r in result["norm_bound"]["rows"]}
    honest, unbounded = result["norm_bound"]["rows"][0], rows["no bound"]
    assert unbounded["param_change"] > 1000 * honest["param_change"]  # one 1e6-norm gradient swamps the update
    assert rows["clip at 5"]["clipped"] == [3] and rows["reject over 5 (+renormalise)"]["rejected"] == 1
    assert "| **total** |" in markdown.reliability(result)


@pytest.mark.ray
def test_memory_benchmark_miniature_on_ray_counts_fedunlearns_caches(tmp_path):
    # The one Ray-backed miniature (Ray's start costs ~15 s): a child process, Flower's simulation engine, worker RSS.
    out = tmp_path / "memory.json"
    code = memory.main(
        [
            "--clients",
            "3",
            "--examples",
            "8",
            "--rounds",
            "2",
            "--variants",
            "fedunlearn",
            "--data-root",
            str(tmp_path / "data"),
            "--out",
            str(out),
            "--timeout",
            "300",
        ]
    )
    result = json.loads(out.read_text())
    assert code == 0, result["scales"]
    assert_sane(result)
    entry = result["scales"][0]
    ours = entry["variants"]["fedunlearn"]
    assert_training_run(ours["runs"][0], clients=3, rounds=2, ray=True)
    assert ours["runs"][0]["grid_poll_interval_s"] == getattr(
        variants.fedunlearn_config(variants.Scale(3, 8, 2, "x")), "grid_poll_interval", None
    )
    caches = ours["caches"]
    # One float32 safetensors file per client: the gradient sum (P values) plus a header of a few hundred bytes.
    assert caches["client_cache_files"] == 3
    assert 3 * MCMAHAN_PARAMETERS * 4 < caches["client_cache_bytes"] < 3 * (MCMAHAN_PARAMETERS * 4 + 1024)
    assert caches["server_aggregate_cache_bytes"] == MCMAHAN_PARAMETERS * 8  # G_tot is kept in float64
    assert list(caches["phases"]) == ["discovery", "training", "caching (fill + upload)", "unlearn:iau-cached", "unlearn:iau"]
    assert caches["phases"]["unlearn:iau-cached"]["rounds"] == 2 and caches["phases"]["training"]["rounds"] == 2
    # Two 1000-client targets (all processes, driver), neither decided: 1000 clients were not asked for.
    assert [t["met"] for t in result["targets"]] == [None, None] and result["target"]["path"] == "fedunlearn"
    assert "3 clients x 8 examples" in markdown.memory(result)


def test_target_verdicts_say_by_how_much():
    assert (
        markdown.verdict({"target": "x at least 5x", "measured": 2.5, "required": 5.0, "met": False})
        == "MISSED by 2.00x: 2.5x (needs >= 5x)"
    )
    assert (
        markdown.verdict({"target": "within 1.25x", "measured": 2.5, "required": 1.25, "met": False})
        == "MISSED by 2.00x: 2.5x (needs <= 1.25x)"
    )
    assert (
        markdown.verdict({"target": "t", "measured": 3.0, "required": 1.0, "better": "higher", "met": True})
        == "met: 3x (needs >= 1x, 3.00x inside the target)"
    )
    assert (
        markdown.verdict({"target": "under 8 GB", "measured_bytes": 4e9, "required_bytes": 8e9, "met": True})
        == "met: 4.00 GB (needs <= 8.00 GB, 2.00x inside the target)"
    )
    assert markdown.verdict({"target": "t", "measured": None, "required": 5.0, "met": None}) == "not measured"


def test_report_renders_every_saved_result_as_markdown(tmp_path):
    saved = sorted(RESULTS_DIR.glob("*.json"))
    assert saved, f"no saved results under {RESULTS_DIR}"
    out = tmp_path / "tables.md"
    assert report.main(["--out", str(out)]) == 0
    text = out.read_text()
    for path in saved:
        result = json.loads(path.read_text())
        kind = markdown.kind_of(result)
        assert kind in markdown.RENDERERS, path
        assert f"## {kind.capitalize()}" in text and f"`benchmarks/results/{path.name}`" in text
        if result.get("date"):
            assert markdown.format_date(result["date"]) in text
    tables, current = [], []
    for line in [*text.splitlines(), ""]:  # every row of every table has as many cells as its header
        if line.startswith("|"):
            current.append(line.count("|"))
        elif current:
            tables.append(current)
            current = []
    assert tables and all(len(set(counts)) == 1 and len(counts) >= 3 for counts in tables), tables


def test_iau_ablation_miniature_writes_its_report(tmp_path, monkeypatch):
    """The ablation's grid in miniature: one preset, one seed, two variants, quick settings; the report has their rows."""
    from benchmarks import iau_ablation
    from strategies.methods import registry_scope

    report = tmp_path / "ablation.md"
    with registry_scope():  # the variants register as methods: keep them in this test
        code = iau_ablation.main(
            [
                "--presets",
                "smoke",
                "--seeds",
                "0",
                "--variants",
                "sgd-0.045,calibrated",
                "--quick",
                "--out",
                str(tmp_path / "runs"),
                "--report",
                str(report),
            ]
        )
    assert code == 0
    text = report.read_text()
    assert "| iau:sgd-0.045 |" in text and "| iau:calibrated |" in text and "| pga |" in text
    saved = json.loads((tmp_path / "runs" / "smoke-seed0.json").read_text())
    assert saved["models"]["iau:calibrated"]["unlearning"]["calibration"]  # client u chose the step length
    assert saved["models"]["iau:sgd-0.045"]["unlearning"]["steps"] == 1
