"""The CPU-side pieces of the GPU checks (benchmarks/gpu.sh, benchmarks/cuda_check.py): a GPU is not lent here."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from benchmarks import cuda_check

ROOT = Path(__file__).resolve().parents[1]


def test_the_equality_check_passes_on_the_cpu_and_writes_every_case(tmp_path):
    out = tmp_path / "check.json"
    assert cuda_check.main(["--device", "cpu", "--models", "mlp", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["ok"] is True
    assert [c["settings"] for c in result["cases"]] == list(cuda_check.SETTINGS)  # every optimiser path, in order
    for case in result["cases"]:
        assert case["vectorised"] and case["trained"]
        assert case["vmap_vs_loop_max_abs"] <= case["atol"]
        assert case["device_vs_cpu_max_abs"] == 0.0  # the "device" is the CPU itself: the same loop, bit for bit


def test_the_equality_check_fails_when_vmap_computes_something_else(tmp_path, monkeypatch):
    real = cuda_check.cohort_local_train

    def off_by_a_step(*args, **kwargs):  # what a wrong vmap path would return: every parameter moved by 1e-3
        result = real(*args, **kwargs)
        for state in result.states:
            for tensor in state.values():
                tensor.add_(1e-3)
        return result

    monkeypatch.setattr(cuda_check, "cohort_local_train", off_by_a_step)
    out = tmp_path / "check.json"
    assert cuda_check.main(["--device", "cpu", "--models", "mlp", "--out", str(out)]) == 1
    assert not any(c["ok"] for c in json.loads(out.read_text())["cases"])


def test_the_equality_check_refuses_a_missing_device_and_unknown_models(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert cuda_check.main(["--device", "cuda"]) == cuda_check.EXIT_NO_DEVICE
    assert "no CUDA device" in capsys.readouterr().err
    assert cuda_check.main(["--device", "cpu", "--models", "mlp,lenet"]) == 2
    assert "unknown lenet" in capsys.readouterr().err


def _gpu_sh(tmp_path, **env):
    return subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu.sh")],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "GPU_SH_RESULTS": str(tmp_path), **env},
    )


def test_gpu_sh_plans_every_step_inside_its_budget(tmp_path):
    proc = _gpu_sh(tmp_path, GPU_SH_DRY_RUN="1")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "gpu-summary.json").read_text())
    assert [s["step"] for s in summary["steps"]] == ["cuda-check", "training-100", "training-1000", "memory-1000"]
    assert summary["budget_s"] == 480  # the 8 minutes
    assert sum(s["limit_s"] for s in summary["steps"]) <= summary["budget_s"]  # the limits alone fit the budget


def test_gpu_sh_skips_what_no_longer_fits_a_small_budget(tmp_path):
    proc = _gpu_sh(tmp_path, GPU_SH_DRY_RUN="1", GPU_SH_BUDGET_S="30")
    assert proc.returncode == 0, proc.stderr
    steps = {s["step"]: s for s in json.loads((tmp_path / "gpu-summary.json").read_text())["steps"]}
    assert steps["cuda-check"]["status"] == "dry-run" and steps["cuda-check"]["limit_s"] == 30
    # each needs more than 30 s (its minimum): skipped and recorded, not started to be killed half-way
    assert {steps[name]["status"] for name in ("training-100", "training-1000", "memory-1000")} == {"skipped"}
    assert all(s["limit_s"] <= 30 for s in steps.values())


def test_gpu_sh_without_cuda_runs_nothing_and_says_so(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    proc = _gpu_sh(tmp_path)
    assert proc.returncode == 3
    assert "no CUDA device" in proc.stderr
    assert not (tmp_path / "gpu-summary.json").exists()
