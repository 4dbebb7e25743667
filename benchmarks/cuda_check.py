"""Equality check of the vectorised cohort training (torch.func vmap) against training clients in turn, on a device.

    python -m benchmarks.cuda_check                      # on CUDA (exit 3 when there is no CUDA device)
    python -m benchmarks.cuda_check --device cpu --out /tmp/check.json   # the same check on the CPU

The unit tests compare vmap with the loop on the CPU only (tests/test_cohort.py); this is the same
comparison on the device the GPU benchmarks use, for every built-in vectorisable model and every
optimiser path (plain SGD, momentum with weight decay, gradient restriction, Adam), with clients of
unequal sizes (padded steps and batches) and one without data. Both sides run on the device; the CPU
loop is run as well, so the JSON also says how far the device's arithmetic is from the CPU's.
Tolerance: ATOL below (the CPU tests' 1e-5), plus a relative 1e-4 for the CUDA-vs-CPU comparison,
where cuDNN's convolution algorithms sum in other orders. Adam gets ADAM_ATOL_STEPS x lr instead: its
step m / (sqrt(v) + eps) is about lr in size whatever the gradient's, so where a convolution's gradient
is close to zero a rounding difference of 1e-8 in it moves that step by a visible fraction of lr
(measured on the CPU: 2.2e-5 for the cnn and 2.7e-4 for the McMahan CNN at lr 0.01, 4 steps, against
1e-7 for SGD); the check then says the two paths take the same steps to within a tenth of one. Exit 0 when every case is within its
tolerance, 1 when one is not, 3 when the device is absent. Writes benchmarks/results/cuda-check.json.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from fedunlearn.cohort import cohort_local_train, is_vectorisable
from fedunlearn.models import build_model
from fedunlearn.training import TrainSettings, local_train

from .common import RESULTS_DIR, envelope, write_json

ATOL = 1e-5  # vmap vs the loop on the same device: the CPU tests' tolerance
DEVICE_RTOL = 1e-4  # the device's loop vs the CPU's loop: other summation orders in cuDNN/cuBLAS
ADAM_ATOL_STEPS = 0.1  # Adam: a tenth of one step's size (lr), see the docstring
EXIT_NO_DEVICE = 3

SETTINGS = {
    "sgd": TrainSettings(epochs=2, lr=0.1, batch_size=8),
    "momentum-weight-decay": TrainSettings(epochs=2, lr=0.05, batch_size=8, momentum=0.9, weight_decay=0.01),
    "gradient-restriction": TrainSettings(epochs=1, lr=0.1, batch_size=8, gr_alpha=0.05),
    "adam": TrainSettings(epochs=2, lr=0.01, batch_size=8, optimizer="adam", weight_decay=0.01),
}
MODELS = {"mlp": (1, 8, 8), "cnn": (1, 8, 8), "mcmahan-cnn": (1, 28, 28)}
SIZES = (21, 8, 3, 17, 0, 30)  # unequal (padded steps and batches), one client without data


def _loop(
    model: torch.nn.Module, xs: list[torch.Tensor], ys: list[torch.Tensor], settings: TrainSettings, seeds: list[int]
) -> list[dict[str, torch.Tensor]]:
    """local_train for each client in turn from the same parameters (the reference)."""
    initial = copy.deepcopy(model.state_dict())
    states = []
    for x, y, seed in zip(xs, ys, seeds, strict=True):
        model.load_state_dict(initial)
        local_train(model, x, y, settings, torch.Generator().manual_seed(seed))
        states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    model.load_state_dict(initial)
    return states


def _max_diff(a: Sequence[Mapping[str, torch.Tensor]], b: Sequence[Mapping[str, torch.Tensor]]) -> tuple[float, float]:
    """(max absolute difference, max of |a - b| / (|b| + 1e-12)) over every client and tensor, on the CPU in float64."""
    abs_diff, rel_diff = 0.0, 0.0
    for sa, sb in zip(a, b, strict=True):
        for name in sb:
            ta, tb = sa[name].detach().cpu().double(), sb[name].detach().cpu().double()
            d = (ta - tb).abs()
            abs_diff = max(abs_diff, float(d.max()) if d.numel() else 0.0)
            rel_diff = max(rel_diff, float((d / (tb.abs() + 1e-12)).max()) if d.numel() else 0.0)
    return abs_diff, rel_diff


def check_case(model_name: str, settings_name: str, device: str, seed: int = 0) -> dict[str, Any]:
    """vmap on `device` vs the loop on `device`, and the loop on `device` vs the loop on the CPU, for one model and optimiser."""
    shape = MODELS[model_name]
    settings = SETTINGS[settings_name]
    torch.manual_seed(seed)
    cpu_model = build_model(model_name, shape, 10)
    gen = torch.Generator().manual_seed(seed + 1)
    xs = [torch.randn(n, *shape, generator=gen) for n in SIZES]
    ys = [torch.randint(0, 10, (n,), generator=gen) for n in SIZES]
    seeds = [11 + k for k in range(len(SIZES))]
    cpu_states = _loop(cpu_model, xs, ys, settings, seeds)

    dev_model = copy.deepcopy(cpu_model).to(device)
    dxs, dys = [x.to(device) for x in xs], [y.to(device) for y in ys]
    loop_states = _loop(dev_model, dxs, dys, settings, seeds)
    start = time.perf_counter()
    result = cohort_local_train(dev_model, dxs, dys, settings, [torch.Generator().manual_seed(s) for s in seeds], chunk_size=4)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    vmap_s = time.perf_counter() - start
    vmap_abs, _ = _max_diff(result.states, loop_states)
    device_abs, device_rel = _max_diff(loop_states, cpu_states)
    trained = any(not torch.equal(s[k].cpu(), v) for s in result.states for k, v in cpu_model.state_dict().items())
    atol = ADAM_ATOL_STEPS * settings.lr if settings.optimizer == "adam" else ATOL
    device_ok = device_abs <= atol or device_rel <= DEVICE_RTOL
    return {
        "model": model_name,
        "settings": settings_name,
        "device": device,
        "vectorised": result.vectorised,
        "vmap_vs_loop_max_abs": vmap_abs,
        "device_vs_cpu_max_abs": device_abs,
        "device_vs_cpu_max_rel": device_rel,
        "vmap_seconds": vmap_s,
        "trained": trained,
        "atol": atol,
        "ok": bool(result.vectorised and trained and vmap_abs <= atol and device_ok),
    }


def run_checks(device: str, models: tuple[str, ...] = tuple(MODELS)) -> list[dict[str, Any]]:
    """Every given built-in vectorisable model x every optimiser path on `device`."""
    cases = []
    for model_name in models:
        shape = MODELS[model_name]
        if not is_vectorisable(build_model(model_name, shape, 10)):
            continue
        for settings_name in SETTINGS:
            cases.append(check_case(model_name, settings_name, device))
    return cases


def main(argv: list[str] | None = None) -> int:
    """Run the checks, print one line per case, write the JSON; exit 0 / 1 (a case out of tolerance) / 3 (no device)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="torch device to check (default cuda)")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {','.join(MODELS)}")
    parser.add_argument("--out", default=None, help="JSON file (default benchmarks/results/cuda-check.json)")
    args = parser.parse_args(argv)
    models = tuple(m for m in args.models.split(",") if m)
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        print(f"cuda_check: --models {args.models}: unknown {', '.join(unknown)}; choose from {', '.join(MODELS)}", file=sys.stderr)
        return 2
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(
            f"cuda_check: --device {args.device}: torch {torch.__version__} sees no CUDA device; "
            "run it on the GPU machine (benchmarks/gpu.sh) or pass --device cpu",
            file=sys.stderr,
        )
        return EXIT_NO_DEVICE
    result = envelope(
        "cuda-check",
        {
            "device": args.device,
            "atol": ATOL,
            "adam_atol_steps": ADAM_ATOL_STEPS,
            "device_rtol": DEVICE_RTOL,
            "sizes": list(SIZES),
            "models": list(models),
        },
        argv,
    )
    if args.device.startswith("cuda"):
        result["device_name"] = torch.cuda.get_device_name(torch.device(args.device))
    result["cases"] = run_checks(args.device, models)
    result["ok"] = all(c["ok"] for c in result["cases"])
    for c in result["cases"]:
        print(
            f"{'ok  ' if c['ok'] else 'FAIL'} {c['model']:12s} {c['settings']:22s} vmap-vs-loop {c['vmap_vs_loop_max_abs']:.2e}  "
            f"{args.device}-vs-cpu {c['device_vs_cpu_max_abs']:.2e} (rel {c['device_vs_cpu_max_rel']:.1e})"
        )
    out = Path(args.out) if args.out else RESULTS_DIR / "cuda-check.json"
    write_json(out, result)
    print(f"wrote {out}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
