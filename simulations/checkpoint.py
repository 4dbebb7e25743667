"""Checkpoints of an experiment so `--resume DIR` continues an interrupted run to the same result.

What is saved, under DIR/checkpoint/: the global model after every k-th training round (safetensors),
the model each finished method produced, and a JSON state (rounds done, curves, costs so far, results
so far, the configuration). No RNG state is needed: every random choice in a run (client sampling,
local shuffles, initial weights, data split) is a pure function of (seed, round, client), so the
resumed rounds draw exactly what the uninterrupted run would have drawn. Client caches are not
saved: they are refilled by the caching round, which is cheap and deterministic.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord
from safetensors.torch import load_file, save_file

from fedunlearn.errors import ConfigError

from .results import finite_or_none

# Settings that change how a run is shown or scheduled, not what it computes: they may differ on resume.
RUNTIME_KEYS = {"verbose", "ray-address", "num-cpus-per-client", "num-gpus-per-client", "round-timeout", "checkpoint-every"}
RUNTIME_KEYS |= {"tracking", "tracking-uri", "tracking-experiment"}  # where the run is also logged (older checkpoints lack them)


class Checkpoints:
    """DIR/checkpoint: model snapshots by name and one JSON state, each written atomically."""

    def __init__(self, out_dir: str | Path) -> None:
        self.root = Path(out_dir) / "checkpoint"

    def save_arrays(self, name: str, arrays: ArrayRecord) -> None:
        """Store a model under `name` (replacing the previous one)."""
        self.root.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in arrays.to_torch_state_dict().items()}
        path = self.root / f"{name}.safetensors"
        tmp = path.with_name(f".{path.name}.tmp")
        save_file(state, str(tmp))
        os.replace(tmp, path)

    def load_arrays(self, name: str) -> ArrayRecord | None:
        """The model stored under `name`, or None."""
        path = self.root / f"{name}.safetensors"
        if not path.exists():
            return None
        return ArrayRecord(OrderedDict(load_file(str(path))))

    def save_state(self, state: dict[str, Any]) -> None:
        """Store the JSON state."""
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / "state.json"
        tmp = path.with_name(".state.json.tmp")
        tmp.write_text(json.dumps(finite_or_none(state), indent=1))
        os.replace(tmp, path)

    def load_state(self) -> dict[str, Any] | None:
        """The JSON state, or None when there is no checkpoint."""
        path = self.root / "state.json"
        return json.loads(path.read_text()) if path.exists() else None


def check_same_experiment(saved: dict[str, Any], current: dict[str, Any]) -> None:
    """Refuse to resume with settings that change what is computed (names every differing key)."""
    differing = sorted(k for k in set(saved) | set(current) if k not in RUNTIME_KEYS and saved.get(k) != current.get(k))
    if differing:
        detail = ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs now {current.get(k)!r}" for k in differing)
        raise ConfigError(f"cannot resume: the checkpoint was made with other settings ({detail}); "
                          "resume with the same settings (the saved ones are in DIR/results.json) or start a new --out")
