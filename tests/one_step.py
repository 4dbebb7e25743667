"""The single-step IAU settings the pooled-reference tests check (sgd or adam, one step, lambda 1).

The defaults of IAUSettings are the measured best variant (normalised, two steps, lambda 3); the tests
that compare the distributed update with a hand-written single step pin the rule they check here, and
tests/test_iau_steps.py checks the multi-step rules against their own reference.
"""

from __future__ import annotations

from typing import Any

from fedunlearn.iau import IAUSettings

ONE_STEP = {"step_rule": "sgd", "steps": 1, "correction_weight": 1.0}
# The same for an ExperimentConfig (no repair rounds: the update alone).
ONE_STEP_CONFIG = {"iau_step_rule": "sgd", "iau_steps": 1, "iau_correction_weight": 1.0, "iau_repair_rounds": 0}


def one_step(**settings: Any) -> IAUSettings:
    """IAUSettings with the single-step defaults, overridden by `settings`."""
    return IAUSettings(**{**ONE_STEP, **settings})
