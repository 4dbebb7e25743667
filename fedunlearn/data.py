"""Federated datasets: loading, client partitioning, held-out splits and the backdoor used to test unlearning."""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

__all__ = [
    "DATASET_NAMES",
    "PARTITIONS",
    "DataSpec",
    "DatasetStore",
    "FederatedData",
    "load_federated_data",
    "partition_dirichlet",
    "partition_iid",
    "select_forget_subset",
    "stamp_trigger",
]

DATASET_NAMES: tuple[str, ...] = ("digits", "mnist", "fashion-mnist", "cifar10")
PARTITIONS: tuple[str, ...] = ("iid", "dirichlet")
FORGET_SAMPLES: tuple[str, ...] = ("poisoned", "random")

# Known up front so DataSpec can validate backdoor_target and trigger_size without loading anything.
_NUM_CLASSES: dict[str, int] = {"digits": 10, "mnist": 10, "fashion-mnist": 10, "cifar10": 10}
_INPUT_SHAPES: dict[str, tuple[int, int, int]] = {
    "digits": (1, 8, 8),
    "mnist": (1, 28, 28),
    "fashion-mnist": (1, 28, 28),
    "cifar10": (3, 32, 32),
}
# Used when data_dir is None; matches the /data/ entry of .gitignore.
DEFAULT_DATA_DIR = "data"
# Resampling bound for the Dirichlet partition: large enough that feasible settings practically
# always succeed, small enough that infeasible ones fail within a fraction of a second.
_DIRICHLET_MAX_TRIES = 1000


def _is_int(value: object) -> bool:
    """Whether value is a genuine integer (bool excluded)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    """Whether value is a finite real number (bool excluded)."""
    return (
        isinstance(value, (int, float, np.integer, np.floating))
        and not isinstance(value, bool)
        and math.isfinite(float(value))
    )


@dataclass(frozen=True)
class DataSpec:
    """Everything that determines a federated dataset; equal specs give bit-identical data."""

    dataset: str = "digits"
    data_dir: str | None = None
    download: bool = False
    num_clients: int = 10
    partition: str = "iid"
    alpha: float = 0.5
    heldout_fraction: float = 0.2
    test_fraction: float = 0.2
    train_limit: int | None = None
    seed: int = 0
    backdoor_client: int | None = 0
    backdoor_fraction: float = 0.8
    backdoor_target: int = 0
    trigger_size: int = 3
    input_noise: float = 0.0
    # Membership-inference shadows: examples of `shadow_pool` (global indices into the train split, clean: never poisoned)
    # train only where listed in `shadow_in`, each with the client that holds it (train or held-out); the rest are left out.
    shadow_pool: tuple[int, ...] = ()
    shadow_in: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        """Reject invalid settings with a message naming the field, the value and the fix."""
        if self.dataset not in DATASET_NAMES:
            allowed = ", ".join(repr(n) for n in DATASET_NAMES)
            raise ValueError(f"dataset={self.dataset!r}: must be one of {allowed}")
        if self.data_dir is not None and not isinstance(self.data_dir, (str, Path)):
            raise ValueError(f"data_dir={self.data_dir!r}: must be a folder path (str) or None")
        if not isinstance(self.download, bool):
            raise ValueError(f"download={self.download!r}: must be True or False")
        if not _is_int(self.num_clients) or self.num_clients < 2:
            raise ValueError(f"num_clients={self.num_clients!r}: must be an integer >= 2")
        if self.partition not in PARTITIONS:
            allowed = ", ".join(repr(p) for p in PARTITIONS)
            raise ValueError(f"partition={self.partition!r}: must be one of {allowed}")
        if not _is_real(self.alpha) or self.alpha <= 0:
            raise ValueError(f"alpha={self.alpha!r}: alpha must be > 0 (finite; smaller = more label skew)")
        if not _is_real(self.heldout_fraction) or not 0 < self.heldout_fraction < 1:
            raise ValueError(
                f"heldout_fraction={self.heldout_fraction!r}: must be strictly between 0 and 1"
            )
        if not _is_real(self.test_fraction) or not 0 < self.test_fraction < 1:
            raise ValueError(f"test_fraction={self.test_fraction!r}: must be strictly between 0 and 1")
        # Every client needs at least one train and one held-out example.
        if self.train_limit is not None and (
            not _is_int(self.train_limit) or self.train_limit < 2 * self.num_clients
        ):
            raise ValueError(
                f"train_limit={self.train_limit!r}: must be None or an integer >= 2 * num_clients "
                f"(= {2 * self.num_clients})"
            )
        # numpy's SeedSequence and sklearn's random_state both accept this range.
        if not _is_int(self.seed) or not 0 <= self.seed < 2**32:
            raise ValueError(f"seed={self.seed!r}: must be an integer in [0, 2**32)")
        if self.backdoor_client is not None and (
            not _is_int(self.backdoor_client) or not 0 <= self.backdoor_client < self.num_clients
        ):
            raise ValueError(
                f"backdoor_client={self.backdoor_client!r}: must be None (no backdoor) or an integer "
                f"in [0, num_clients) = [0, {self.num_clients})"
            )
        if not _is_real(self.backdoor_fraction) or not 0 <= self.backdoor_fraction <= 1:
            raise ValueError(f"backdoor_fraction={self.backdoor_fraction!r}: must be in [0, 1]")
        num_classes = _NUM_CLASSES[self.dataset]
        if not _is_int(self.backdoor_target) or not 0 <= self.backdoor_target < num_classes:
            raise ValueError(
                f"backdoor_target={self.backdoor_target!r}: must be a class index in "
                f"[0, {num_classes}) for dataset {self.dataset!r}"
            )
        if not _is_real(self.input_noise) or self.input_noise < 0:
            raise ValueError(f"input_noise={self.input_noise!r}: must be a finite std >= 0 (0 = none)")
        if not all(_is_int(i) and i >= 0 for i in self.shadow_pool) or not set(self.shadow_in) <= set(self.shadow_pool):
            raise ValueError("shadow_pool must be train-split indices >= 0 and shadow_in a subset of it")
        _, height, width = _INPUT_SHAPES[self.dataset]
        side = min(height, width)
        if not _is_int(self.trigger_size) or not 1 <= self.trigger_size <= side:
            raise ValueError(
                f"trigger_size={self.trigger_size!r}: must be an integer in [1, {side}] "
                f"for {self.dataset!r} ({height}x{width} images)"
            )

    @property
    def num_classes(self) -> int:
        """Number of classes of the dataset."""
        return _NUM_CLASSES[self.dataset]

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """Shape (C, H, W) of one input of the dataset."""
        return _INPUT_SHAPES[self.dataset]


@dataclass
class FederatedData:
    """A dataset split into clients, with per-client held-out data, a clean test set and a backdoor."""

    x_train: torch.Tensor = field(repr=False)
    y_train: torch.Tensor = field(repr=False)
    y_train_clean: torch.Tensor = field(repr=False)
    poisoned: torch.Tensor = field(repr=False)
    x_test: torch.Tensor = field(repr=False)
    y_test: torch.Tensor = field(repr=False)
    client_train: list[torch.Tensor] = field(repr=False)
    client_heldout: list[torch.Tensor] = field(repr=False)
    num_classes: int
    input_shape: tuple[int, int, int]
    spec: DataSpec

    @property
    def num_clients(self) -> int:
        """Number of clients."""
        return len(self.client_train)

    def _check_client(self, client: int) -> None:
        """Raise ValueError when client is not a valid client id."""
        if not _is_int(client) or not 0 <= client < self.num_clients:
            raise ValueError(f"client={client!r}: must be an integer in [0, {self.num_clients})")

    def client_train_arrays(self, client: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Training inputs and (possibly poisoned) labels of one client."""
        self._check_client(client)
        idx = self.client_train[client]
        return self.x_train[idx], self.y_train[idx]

    def client_heldout_arrays(self, client: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Held-out (never trained on, never poisoned) inputs and labels of one client."""
        self._check_client(client)
        idx = self.client_heldout[client]
        return self.x_train[idx], self.y_train[idx]

    def num_train(self, client: int) -> int:
        """Number of training examples of one client."""
        self._check_client(client)
        return int(self.client_train[client].numel())

    def triggered_test(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Test inputs whose true label differs from the backdoor target, trigger stamped, labelled target."""
        target = self.spec.backdoor_target
        keep = self.y_test != target
        x = stamp_trigger(self.x_test[keep], self.spec.trigger_size)
        y = torch.full((x.shape[0],), target, dtype=torch.int64)
        return x, y


def stamp_trigger(x: torch.Tensor, size: int, value: float = 1.0) -> torch.Tensor:
    """Copy of x with the bottom-right size x size patch of every channel set to value."""
    if x.dim() < 2:
        raise ValueError(f"x has shape {tuple(x.shape)}: needs at least 2 dims (..., H, W)")
    height, width = x.shape[-2], x.shape[-1]
    if not _is_int(size) or not 1 <= size <= min(height, width):
        raise ValueError(f"size={size!r}: must be an integer in [1, {min(height, width)}]")
    out = x.clone()
    out[..., height - size :, width - size :] = value
    return out


def partition_iid(num_examples: int, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffle range(num_examples) and deal it into num_clients parts whose sizes differ by at most 1."""
    if not _is_int(num_clients) or num_clients < 1:
        raise ValueError(f"num_clients={num_clients!r}: must be an integer >= 1")
    if not _is_int(num_examples) or num_examples < num_clients:
        raise ValueError(
            f"num_examples={num_examples!r}: must be an integer >= num_clients ({num_clients}) "
            "so that no client is empty"
        )
    perm = rng.permutation(num_examples)
    return [part.astype(np.int64) for part in np.array_split(perm, num_clients)]


def partition_dirichlet(
    labels: np.ndarray,
    num_clients: int,
    alpha: float,
    rng: np.random.Generator,
    min_size: int = 2,
) -> list[np.ndarray]:
    """Split example indices into clients with per-class Dirichlet(alpha) shares (label skew)."""
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels has shape {labels.shape}: must be 1-D")
    if not _is_int(num_clients) or num_clients < 1:
        raise ValueError(f"num_clients={num_clients!r}: must be an integer >= 1")
    if not _is_real(alpha) or alpha <= 0:
        raise ValueError(f"alpha={alpha!r}: alpha must be > 0")
    if not _is_int(min_size) or min_size < 0:
        raise ValueError(f"min_size={min_size!r}: must be an integer >= 0")
    if labels.size < num_clients * min_size:
        raise ValueError(
            f"{labels.size} examples cannot give each of num_clients={num_clients} clients "
            f"min_size={min_size} examples: use fewer clients"
        )
    # Shuffle each class once; only the proportions are resampled, which keeps retries cheap.
    class_indices = [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    for _ in range(_DIRICHLET_MAX_TRIES):
        cuts = []
        sizes = np.zeros(num_clients, dtype=np.int64)
        for idx in class_indices:
            proportions = rng.dirichlet(np.full(num_clients, float(alpha)))
            bounds = (np.cumsum(proportions) * idx.size).astype(np.int64)[:-1]
            cuts.append(bounds)
            sizes += np.diff(np.concatenate(([0], bounds, [idx.size])))
        if sizes.min() >= min_size:
            parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
            for idx, bounds in zip(class_indices, cuts):
                for client, chunk in enumerate(np.split(idx, bounds)):
                    parts[client].append(chunk)
            return [np.sort(np.concatenate(p)).astype(np.int64) for p in parts]
    raise ValueError(
        f"partition_dirichlet: after {_DIRICHLET_MAX_TRIES} draws some client still had fewer than "
        f"min_size={min_size} examples; alpha={alpha} is too small for num_clients={num_clients} "
        f"with {labels.size} examples: raise alpha, use fewer clients, or use more data"
    )


def _load_digits(spec: DataSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Digits as float32 (N,1,8,8) in [0,1], with a seeded stratified train/test split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = (bunch.images.astype(np.float32) / 16.0)[:, None, :, :]
    y = bunch.target.astype(np.int64)
    train_idx, test_idx = train_test_split(
        np.arange(y.size), test_size=spec.test_fraction, stratify=y, random_state=spec.seed
    )
    # Sorting gives a canonical order that does not depend on sklearn's internal shuffling.
    train_idx, test_idx = np.sort(train_idx), np.sort(test_idx)
    return x[train_idx], y[train_idx], x[test_idx], y[test_idx]


def _load_torchvision(spec: DataSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A torchvision dataset's official train/test splits as float32 (N,C,H,W) in [0,1]."""
    import torchvision.datasets as tvd

    classes = {"mnist": tvd.MNIST, "fashion-mnist": tvd.FashionMNIST, "cifar10": tvd.CIFAR10}
    cls = classes[spec.dataset]
    root = Path(spec.data_dir if spec.data_dir is not None else DEFAULT_DATA_DIR)
    splits = []
    for train in (True, False):
        try:
            ds = cls(root=str(root), train=train, download=spec.download)
        except RuntimeError as err:
            if spec.download:
                raise
            raise FileNotFoundError(
                f"{spec.dataset} not found in folder {str(root.resolve())!r} and download=False: "
                f"pass download=True (CLI flag --download) to fetch it, or point --data-dir at a "
                f"folder that holds it"
            ) from err
        # Whole-array conversion instead of per-item transforms: orders of magnitude faster.
        data = np.asarray(ds.data)
        if data.ndim == 3:  # MNIST-style (N, H, W)
            data = data[:, None, :, :]
        else:  # CIFAR-style (N, H, W, C)
            data = data.transpose(0, 3, 1, 2)
        x = np.ascontiguousarray(data, dtype=np.float32) / np.float32(255.0)
        y = np.asarray(ds.targets, dtype=np.int64)
        splits.append((x, y))
    (x_train, y_train), (x_test, y_test) = splits
    return x_train, y_train, x_test, y_test


def load_federated_data(spec: DataSpec) -> FederatedData:
    """Build the federated dataset described by spec (deterministic: same spec, same tensors)."""
    if spec.dataset == "digits":
        x_train, y_train, x_test, y_test = _load_digits(spec)
    else:
        x_train, y_train, x_test, y_test = _load_torchvision(spec)

    # Independent streams per step, so e.g. changing the backdoor does not change the partition.
    # spawn(5)[:4] equals spawn(4): the noise stream leaves the others (and every earlier dataset) unchanged.
    limit_ss, partition_ss, heldout_ss, backdoor_ss, noise_ss = np.random.SeedSequence(spec.seed).spawn(5)
    if spec.input_noise > 0:  # a harder task on the same images: few examples carry the fit, so membership shows
        noise = np.random.default_rng(noise_ss)
        x_train = (x_train + noise.normal(0.0, spec.input_noise, x_train.shape)).astype(np.float32)
        x_test = (x_test + noise.normal(0.0, spec.input_noise, x_test.shape)).astype(np.float32)

    if spec.train_limit is not None and spec.train_limit < y_train.size:
        keep = np.sort(
            np.random.default_rng(limit_ss).choice(y_train.size, size=spec.train_limit, replace=False)
        )
        x_train, y_train = x_train[keep], y_train[keep]

    if y_train.size < 2 * spec.num_clients:
        raise ValueError(
            f"num_clients={spec.num_clients}: {y_train.size} training examples cannot give every "
            f"client one train and one held-out example; use fewer clients"
        )

    partition_rng = np.random.default_rng(partition_ss)
    if spec.partition == "iid":
        parts = partition_iid(y_train.size, spec.num_clients, partition_rng)
    else:
        parts = partition_dirichlet(y_train, spec.num_clients, spec.alpha, partition_rng, min_size=2)

    heldout_rng = np.random.default_rng(heldout_ss)
    client_train: list[np.ndarray] = []
    client_heldout: list[np.ndarray] = []
    for part in parts:
        n = part.size
        if n >= 2:
            n_held = min(max(round(spec.heldout_fraction * n), 1), n - 1)
        else:
            n_held = 0
        perm = heldout_rng.permutation(part)
        client_heldout.append(np.sort(perm[:n_held]))
        client_train.append(np.sort(perm[n_held:]))

    y_clean = y_train.copy()
    poisoned = np.zeros(y_train.size, dtype=bool)
    if spec.backdoor_client is not None:
        # Only examples whose true label is not the target are poisoned (Halimi et al.): relabelling a target-class
        # example to the target changes nothing, and would count as a "backdoor" example it is not.
        own = client_train[spec.backdoor_client]
        own = own[y_train[own] != spec.backdoor_target]
        k = round(spec.backdoor_fraction * own.size)
        chosen = np.sort(np.random.default_rng(backdoor_ss).choice(own, size=k, replace=False))
        poisoned[chosen] = True
    if spec.shadow_pool:
        client_train, client_heldout = _swap_shadow_pool(client_train, client_heldout, spec, poisoned)

    x_t = torch.from_numpy(np.ascontiguousarray(x_train, dtype=np.float32))
    y_t = torch.from_numpy(y_train.astype(np.int64))
    poisoned_t = torch.from_numpy(poisoned)
    if poisoned.any():
        x_t[poisoned_t] = stamp_trigger(x_t[poisoned_t], spec.trigger_size, 1.0)
        y_t[poisoned_t] = spec.backdoor_target

    return FederatedData(
        x_train=x_t,
        y_train=y_t,
        y_train_clean=torch.from_numpy(y_clean.astype(np.int64)),
        poisoned=poisoned_t,
        x_test=torch.from_numpy(np.ascontiguousarray(x_test, dtype=np.float32)),
        y_test=torch.from_numpy(y_test.astype(np.int64)),
        client_train=[torch.from_numpy(p.astype(np.int64)) for p in client_train],
        client_heldout=[torch.from_numpy(p.astype(np.int64)) for p in client_heldout],
        num_classes=spec.num_classes,
        input_shape=tuple(int(s) for s in x_train.shape[1:]),  # type: ignore[arg-type]
        spec=spec,
    )


def _swap_shadow_pool(client_train: list[np.ndarray], client_heldout: list[np.ndarray], spec: DataSpec,
                      poisoned: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Each client trains on its examples outside the shadow pool plus the pool examples it holds that are in `shadow_in`."""
    pool = np.asarray(spec.shadow_pool, dtype=np.int64)
    inside = np.asarray(spec.shadow_in, dtype=np.int64)
    if poisoned[pool].any():
        raise ValueError("shadow_pool holds poisoned examples: membership candidates must be clean")
    trains, helds = [], []
    for train, held in zip(client_train, client_heldout):
        mine = np.union1d(train, held)
        trains.append(np.union1d(np.setdiff1d(train, pool), np.intersect1d(mine, inside)).astype(np.int64))
        helds.append(np.setdiff1d(held, inside).astype(np.int64))
    return trains, helds


def select_forget_subset(
    data: FederatedData, client: int, samples: str, fraction: float, seed: int
) -> torch.Tensor:
    """Sorted int64 global indices of a client's forget set for sample-level deletion."""
    data._check_client(client)
    own = data.client_train[client]
    if samples == "poisoned":
        chosen = own[data.poisoned[own]]
        if chosen.numel() == 0:
            raise ValueError(
                f"samples='poisoned': client {client} has no poisoned training examples "
                f"(backdoor_client={data.spec.backdoor_client!r}, "
                f"backdoor_fraction={data.spec.backdoor_fraction!r}); pick the backdoor client "
                f"or use samples='random'"
            )
        return torch.sort(chosen).values.to(torch.int64)
    if samples == "random":
        if not _is_real(fraction) or not 0 < fraction <= 1:
            raise ValueError(f"fraction={fraction!r}: must be in (0, 1] for samples='random'")
        if not _is_int(seed) or seed < 0:
            raise ValueError(f"seed={seed!r}: must be an integer >= 0")
        n = int(own.numel())
        k = min(max(round(fraction * n), 1), n)
        pick = np.random.default_rng(seed).choice(n, size=k, replace=False)
        return torch.sort(own[torch.from_numpy(pick)]).values.to(torch.int64)
    allowed = ", ".join(repr(s) for s in FORGET_SAMPLES)
    raise ValueError(f"samples={samples!r}: must be one of {allowed}")


class DatasetStore:
    """Per-process cache of loaded federated datasets, keyed by DataSpec.

    It exists because simulation worker processes live for the whole run while the client
    closure is re-pickled with every message: data must not travel inside the closure, and
    reloading it per message would dominate the cost, so each process loads a spec once here.
    """

    _cache: ClassVar[dict[DataSpec, FederatedData]] = {}
    # One lock for all specs: loads are rare and holding it during a load stops two threads
    # from loading the same spec twice.
    _lock: ClassVar[threading.Lock] = threading.Lock()

    @classmethod
    def get(cls, spec: DataSpec) -> FederatedData:
        """The federated data for spec, loaded on first request in this process."""
        with cls._lock:
            data = cls._cache.get(spec)
            if data is None:
                data = load_federated_data(spec)
                cls._cache[spec] = data
            return data

    @classmethod
    def drop(cls, spec: DataSpec) -> None:
        """Forget one cached dataset (shadow runs load one each)."""
        with cls._lock:
            cls._cache.pop(spec, None)

    @classmethod
    def clear(cls) -> None:
        """Forget every cached dataset in this process."""
        with cls._lock:
            cls._cache.clear()
