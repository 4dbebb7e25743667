"""A band of retrained models (NeurIPS 2023 unlearning challenge, arXiv 2406.09073): each metric's natural spread.

"As good as retraining" is read as "inside the spread of several retrainings with other seeds",
not as "close to one retrained model": two retrainings already differ.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

__all__ = ["band_stats", "versus_band"]


def band_stats(samples: Iterable[Mapping[str, float | None]], keys: Iterable[str]) -> dict[str, dict[str, float]]:
    """Per key: mean, sample std (ddof 1; 0 for one value), min, max and n over the samples that hold a finite value."""
    rows = list(samples)
    out: dict[str, dict[str, float]] = {}
    for key in keys:
        values = [float(v) for row in rows if isinstance(v := row.get(key), (int, float)) and math.isfinite(float(v))]
        if not values:
            continue
        n = len(values)
        mean = sum(values) / n
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
        out[key] = {"mean": mean, "std": std, "min": min(values), "max": max(values), "n": n}
    return out


def versus_band(
    values: Mapping[str, float | None], band: Mapping[str, Mapping[str, float]], distances: Iterable[str] = ()
) -> dict[str, dict[str, float | bool | None]]:
    """Per band key: the value, its distance from the band mean in band-std units (z), and whether it lies in [min, max].

    For the `distances` keys (distances to the reference retrain) only the upper end counts: a model closer to
    the reference than two retrainings are to each other is inside. z is None when the band has no spread
    (std 0) and the value differs from it: no finite number of standard deviations describes that; `inside`
    still answers.
    """
    one_sided = set(distances)
    out: dict[str, dict[str, float | bool | None]] = {}
    for key, stats in band.items():
        value = values.get(key)
        if not isinstance(value, (int, float)) or not math.isfinite(float(value)):
            continue
        value = float(value)
        diff = value - stats["mean"]
        if stats["std"] > 0:
            z: float | None = diff / stats["std"]
        else:
            z = 0.0 if diff == 0 else None
        low = float("-inf") if key in one_sided else stats["min"]
        out[key] = {"value": value, "z": z, "inside": bool(low <= value <= stats["max"])}
    return out
