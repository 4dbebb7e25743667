"""Shared fixtures: a small federated experiment served in-process by LocalGrid (no Ray)."""

from __future__ import annotations

import os

import pytest
import torch

# Tiny models: thread start-up costs more than it saves, and the 2-core CI machine is shared with Ray workers.
torch.set_num_threads(1)

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture
def small_cfg():
    """Digits, 4 IID clients, an MLP, client 1 backdoored: seconds to train, enough to be non-trivial."""
    from fedunlearn.config import build_config

    return build_config(
        "default",
        overrides={
            "num_clients": 4,
            "rounds": 2,
            "local_epochs": 1,
            "model": "mlp",
            "forget_client": 1,
            "train_limit": 600,
            "cache_dtype": "float64",
            # the pooled references check one sgd step (tests/one_step.py)
            "iau_step_rule": "sgd",
            "iau_steps": 1,
            "iau_correction_weight": 1.0,
            "iau_repair_rounds": 0,
        },
    )
