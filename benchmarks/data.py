"""Synthetic 28x28 data stored as MNIST files, so every benchmarked path loads it the way it would load MNIST.

MNIST itself is not available offline here. Timing does not depend on pixel values, so the benchmarks
use scikit-learn's digits (8x8, shipped with scikit-learn) upsampled to 28x28, sampled with replacement
and written in MNIST's idx format: torchvision's `MNIST` (the plain Flower app), fedunlearn's
`--dataset mnist --data-dir` loader and the single-process loop all read the same files.
"""

from __future__ import annotations

import json
import math
import os
import struct
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

HELDOUT_FRACTION = 0.2  # each client's split, as in Flower's quickstart (80/20) and fedunlearn's default
TEST_EXAMPLES = 1000  # the central test split fedunlearn's loader expects (not used for timing)
IMAGE_SIDE = 28

DESCRIPTION = (
    "synthetic: scikit-learn digits (8x8) upsampled to 28x28 with torch.nn.functional.interpolate "
    "(bilinear), sampled with replacement, stored as MNIST idx files; timing does not depend on content"
)


def partition_size(examples: int) -> int:
    """Examples a client must hold so that `examples` remain for training after its 20% held-out split.

    Both splits in use agree on it: fedunlearn holds out round(0.2 n) (at least 1), the quickstart
    style app ceil(0.2 n); the smallest n where both leave exactly `examples` is returned.
    """
    if examples < 1:
        raise ValueError(f"examples={examples}: must be >= 1")
    for n in range(examples + 1, 2 * examples + 3):
        fedunlearn_held = min(max(round(HELDOUT_FRACTION * n), 1), n - 1)
        quickstart_held = math.ceil(HELDOUT_FRACTION * n)
        if n - fedunlearn_held == examples and n - quickstart_held == examples:
            return n
    raise ValueError(
        f"examples={examples}: no client size leaves exactly {examples} training examples after a 20% "
        f"held-out split in both apps; use a multiple of 4 (e.g. {4 * max(1, round(examples / 4))})"
    )


@dataclass(frozen=True)
class SyntheticMnist:
    """Where the synthetic dataset lives and what it holds."""

    root: str
    num_train: int
    num_test: int
    seed: int

    def to_dict(self) -> dict[str, object]:
        """Plain dict for the results file."""
        return {**asdict(self), "description": DESCRIPTION}


def _write_idx(path: Path, array: np.ndarray) -> None:
    """MNIST's idx format: magic (0x0803 images / 0x0801 labels), sizes big-endian, then uint8 data."""
    magic = 0x00000800 | array.ndim
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", s) for s in array.shape)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())
    os.replace(tmp, path)


def upsampled_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 digits as uint8 (N, 28, 28) images and their labels."""
    import torch
    from sklearn.datasets import load_digits

    bunch = load_digits()
    small = torch.from_numpy(bunch.images.astype(np.float32) / 16.0)[:, None]
    large = torch.nn.functional.interpolate(small, size=(IMAGE_SIDE, IMAGE_SIDE), mode="bilinear", align_corners=False)
    images = (large[:, 0].clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    return images, bunch.target.astype(np.uint8)


def prepare(num_clients: int, examples: int, seed: int = 0, root: str | Path | None = None) -> SyntheticMnist:
    """Write (once) a synthetic MNIST with num_clients x partition_size(examples) training images; return where."""
    num_train = num_clients * partition_size(examples)
    base = Path(root) if root is not None else Path(tempfile.gettempdir()) / "fedunlearn-bench-data"
    folder = base / f"synthetic-mnist-{num_train}-{TEST_EXAMPLES}-seed{seed}"
    raw = folder / "MNIST" / "raw"
    marker = folder / "synthetic.json"
    info = SyntheticMnist(str(folder), num_train, TEST_EXAMPLES, seed)
    if marker.exists():
        return info
    raw.mkdir(parents=True, exist_ok=True)
    images, labels = upsampled_digits()
    rng = np.random.default_rng(seed)
    for prefix, count in (("train", num_train), ("t10k", TEST_EXAMPLES)):
        pick = rng.integers(0, len(labels), size=count)
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", images[pick])
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels[pick])
    marker.write_text(json.dumps(info.to_dict(), indent=2) + "\n")
    return info
