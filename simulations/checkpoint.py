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
        """The model stored under `name`, or None; a damaged file raises ConfigError naming it."""
        path = self.root / f"{name}.safetensors"
        if not path.exists():
            return None
        try:
            return ArrayRecord(OrderedDict(load_file(str(path))))
        except Exception as err:  # safetensors raises its own SafetensorError (and OSError) on a damaged file
            raise ConfigError(
                f"checkpoint {path} cannot be read ({type(err).__name__}: {err}); start again with --overwrite or another --out"
            ) from None

    def save_state(self, state: dict[str, Any]) -> None:
        """Store the JSON state."""
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / "state.json"
        tmp = path.with_name(".state.json.tmp")
        tmp.write_text(json.dumps(finite_or_none(state), indent=1))
        os.replace(tmp, path)

    def load_state(self) -> dict[str, Any] | None:
        """The JSON state, or None when there is no checkpoint; a damaged one raises ConfigError naming the file."""
        path = self.root / "state.json"
        if not path.exists():
            return None
        try:
            state = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ConfigError(
                f"checkpoint {path} cannot be read ({type(err).__name__}: {err}); start again with --overwrite or another --out"
            ) from None
        if not isinstance(state, dict) or not isinstance(state.get("round"), int) or not isinstance(state.get("config"), dict):
            raise ConfigError(
                f"checkpoint {path} is not a fedunlearn checkpoint (no 'round' and 'config'); start again with --overwrite or another --out"
            )
        return state


def differing_settings(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """The settings that change what is computed and differ between a checkpoint and now: key -> (saved, now)."""
    keys = sorted(k for k in set(saved) | set(current) if k not in RUNTIME_KEYS and saved.get(k) != current.get(k))
    return {k: (saved.get(k), current.get(k)) for k in keys}
