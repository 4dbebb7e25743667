"""Good and bad plug-ins for tests: model factories and dataset loaders named `tests.plugin_zoo:NAME`.

Importable as `tests.plugin_zoo` from the repository root (PYTHONPATH=., as the Ray workers of a test run see it).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

NUM_CLASSES = 3
SHAPE = (1, 6, 6)
NUM_TRAIN, NUM_TEST = 240, 60


class TinyNet(nn.Module):
    """A user's own network, written the way Flower's quickstart writes its Net."""

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int) -> None:
        super().__init__()
        channels, height, width = input_shape
        self.conv = nn.Conv2d(channels, 4, kernel_size=3, padding=1)
        self.head = nn.Linear(4 * height * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x)).flatten(1))


def tiny_net(input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """The factory: FACTORY(input_shape, num_classes) -> nn.Module."""
    return TinyNet(input_shape, num_classes)


def _blobs(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Three classes, each a bright row (0, 2 or 4) on noise: learnable in a round or two."""
    rng = np.random.default_rng(seed)
    n = NUM_TRAIN + NUM_TEST
    y = rng.integers(0, NUM_CLASSES, size=n)
    x = rng.uniform(0.0, 0.3, size=(n, *SHAPE)).astype(np.float32)
    x[np.arange(n), 0, 2 * y, :] = 1.0
    return x[:NUM_TRAIN], y[:NUM_TRAIN], x[NUM_TRAIN:], y[NUM_TRAIN:]


def blobs_loader(data_dir: str | None, download: bool, seed: int):
    """A good loader: the train split as numpy arrays, the test split as a torch Dataset (both forms of the contract)."""
    x_train, y_train, x_test, y_test = _blobs(0)  # the data itself does not depend on the run's seed
    test = TensorDataset(torch.from_numpy(x_test), torch.from_numpy(y_test))
    return (x_train, y_train), test, NUM_CLASSES


def blobs_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """What blobs_loader returns, as arrays (the tests' independent reference)."""
    return _blobs(0)


# ----- bad factories -----------------------------------------------------------------------
NOT_CALLABLE = 42


def returns_list(input_shape, num_classes):
    return [nn.Linear(4, num_classes)]


def wrong_output(input_shape, num_classes):
    channels, height, width = input_shape
    return nn.Sequential(nn.Flatten(), nn.Linear(channels * height * width, num_classes + 1))


def fixed_input(input_shape, num_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(10, num_classes))  # ignores the input shape


class _IntegerModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.zeros(4, dtype=torch.int64), requires_grad=False)


def int_params(input_shape, num_classes):
    return _IntegerModel()


def raises(input_shape, num_classes):
    raise RuntimeError("this factory is broken")


# ----- bad loaders -------------------------------------------------------------------------
def _good() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    return _blobs(0)


def float_labels(data_dir, download, seed):
    x, y, xt, yt = _good()
    return (x, y.astype(np.float32)), (xt, yt), NUM_CLASSES


def labels_out_of_range(data_dir, download, seed):
    x, y, xt, yt = _good()
    y = y.copy()
    y[0] = NUM_CLASSES
    return (x, y), (xt, yt), NUM_CLASSES


def negative_labels(data_dir, download, seed):
    x, y, xt, yt = _good()
    yt = yt.copy()
    yt[3] = -1
    return (x, y), (xt, yt), NUM_CLASSES


def int_inputs(data_dir, download, seed):
    x, y, xt, yt = _good()
    return (torch.from_numpy((x * 255).astype(np.uint8)), torch.from_numpy(y)), (xt, yt), NUM_CLASSES


def nan_inputs(data_dir, download, seed):
    x, y, xt, yt = _good()
    x = x.copy()
    x[5, 0, 1, 1] = np.nan
    return (x, y), (xt, yt), NUM_CLASSES


def two_items(data_dir, download, seed):
    x, y, xt, yt = _good()
    return (x, y), (xt, yt)


def mismatched_shapes(data_dir, download, seed):
    x, y, xt, yt = _good()
    return (x, y), (xt[:, :, :5, :5], yt), NUM_CLASSES


def grey_without_channel(data_dir, download, seed):
    x, y, xt, yt = _good()
    return (x[:, 0], y), (xt[:, 0], yt), NUM_CLASSES


def length_mismatch(data_dir, download, seed):
    x, y, xt, yt = _good()
    return (x, y[:-1]), (xt, yt), NUM_CLASSES


def old_signature(data_dir):
    return blobs_loader(data_dir, False, 0)
