"""Federated datasets: loading, client partitioning, held-out splits and the backdoor used to test unlearning.

A dataset is a built-in name or a user loader `PKG.MODULE:LOADER` (the contract is in `LOADER_CONTRACT`
and docs/data-and-models.md); either way the arrays then go through the same steps: seeded subset,
partition over clients by a flwr-datasets partitioner, per-client held-out split, backdoor, noise, shadows.
"""

from __future__ import annotations

import math
import threading
import warnings
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from .errors import ConfigError
from .plugins import is_plugin_path, load_callable

__all__ = [
    "CLASS_ASSIGNMENTS",
    "DATASET_NAMES",
    "LOADER_CONTRACT",
    "PARTITIONS",
    "DataSpec",
    "DatasetStore",
    "FederatedData",
    "load_federated_data",
    "partition_labels",
    "select_forget_subset",
    "stamp_trigger",
]

DATASET_NAMES: tuple[str, ...] = ("digits", "mnist", "fashion-mnist", "cifar10")
# Each is a flwr-datasets partitioner (IidPartitioner, DirichletPartitioner, PathologicalPartitioner, ShardPartitioner).
PARTITIONS: tuple[str, ...] = ("iid", "dirichlet", "pathological", "shard")
CLASS_ASSIGNMENTS: tuple[str, ...] = ("random", "deterministic", "first-deterministic")
FORGET_SAMPLES: tuple[str, ...] = ("poisoned", "random")
LOADER_CONTRACT = (
    "a function LOADER(data_dir: str | None, download: bool, seed: int) -> (train, test, num_classes), "
    "each split a pair (x float (N, C, H, W), y int (N,)) or a torch Dataset of (x, y) items"
)
# Every client needs one example to train on and one held out.
MIN_CLIENT_EXAMPLES = 2

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


def _is_int(value: object) -> bool:
    """Whether value is a genuine integer (bool excluded)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    """Whether value is a finite real number (bool excluded)."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool) and math.isfinite(float(value))


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
    # Partitioner parameters (flwr-datasets names in brackets): dirichlet [min_partition_size, self_balancing],
    # pathological [num_classes_per_partition, class_assignment_mode], shard [num_shards_per_partition, shard_size].
    min_partition_size: int = MIN_CLIENT_EXAMPLES
    self_balancing: bool = False
    classes_per_client: int = 2
    # flwr-datasets' default is "random", which can leave classes (and their examples) in no client.
    class_assignment: str = "first-deterministic"
    shards_per_client: int = 2
    shard_size: int = 0
    # Membership-inference shadows: examples of `shadow_pool` (global indices into the train split, clean: never poisoned)
    # train only where listed in `shadow_in`, each with the client that holds it (train or held-out); the rest are left out.
    shadow_pool: tuple[int, ...] = ()
    shadow_in: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        """Reject invalid settings with a message naming the field, the value and the fix."""
        if self.dataset not in DATASET_NAMES and not is_plugin_path(self.dataset):
            allowed = ", ".join(repr(n) for n in DATASET_NAMES)
            raise ConfigError(f"dataset={self.dataset!r}: must be one of {allowed}, or PKG.MODULE:LOADER naming {LOADER_CONTRACT}")
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
        self._check_partitioner()
        if not _is_real(self.heldout_fraction) or not 0 < self.heldout_fraction < 1:
            raise ValueError(f"heldout_fraction={self.heldout_fraction!r}: must be strictly between 0 and 1")
        if not _is_real(self.test_fraction) or not 0 < self.test_fraction < 1:
            raise ValueError(f"test_fraction={self.test_fraction!r}: must be strictly between 0 and 1")
        # Every client needs at least one train and one held-out example.
        if self.train_limit is not None and (not _is_int(self.train_limit) or self.train_limit < 2 * self.num_clients):
            raise ValueError(f"train_limit={self.train_limit!r}: must be None or an integer >= 2 * num_clients (= {2 * self.num_clients})")
        # numpy's SeedSequence and sklearn's random_state both accept this range.
        if not _is_int(self.seed) or not 0 <= self.seed < 2**32:
            raise ValueError(f"seed={self.seed!r}: must be an integer in [0, 2**32)")
        if self.backdoor_client is not None and (not _is_int(self.backdoor_client) or not 0 <= self.backdoor_client < self.num_clients):
            raise ValueError(
                f"backdoor_client={self.backdoor_client!r}: must be None (no backdoor) or an integer "
                f"in [0, num_clients) = [0, {self.num_clients})"
            )
        if not _is_real(self.backdoor_fraction) or not 0 <= self.backdoor_fraction <= 1:
            raise ValueError(f"backdoor_fraction={self.backdoor_fraction!r}: must be in [0, 1]")
        if not _is_int(self.backdoor_target) or self.backdoor_target < 0:
            raise ValueError(f"backdoor_target={self.backdoor_target!r}: must be a class index >= 0")
        if not _is_real(self.input_noise) or self.input_noise < 0:
            raise ValueError(f"input_noise={self.input_noise!r}: must be a finite std >= 0 (0 = none)")
        if not all(_is_int(i) and i >= 0 for i in self.shadow_pool) or not set(self.shadow_in) <= set(self.shadow_pool):
            raise ValueError("shadow_pool must be train-split indices >= 0 and shadow_in a subset of it")
        if not _is_int(self.trigger_size) or self.trigger_size < 1:
            raise ValueError(f"trigger_size={self.trigger_size!r}: must be an integer >= 1")
        if self.dataset in DATASET_NAMES:  # a plug-in dataset's classes and shape are checked once it is loaded
            self.check_fits(_NUM_CLASSES[self.dataset], _INPUT_SHAPES[self.dataset])

    def _check_partitioner(self) -> None:
        """The partitioner's own parameters (what depends on the data is checked when partitioning)."""
        if self.partition not in PARTITIONS:
            allowed = ", ".join(repr(p) for p in PARTITIONS)
            raise ValueError(f"partition={self.partition!r}: must be one of {allowed}")
        if not _is_int(self.min_partition_size) or self.min_partition_size < MIN_CLIENT_EXAMPLES:
            raise ValueError(
                f"min_partition_size={self.min_partition_size!r}: must be an integer >= {MIN_CLIENT_EXAMPLES} "
                "(every client trains on one example and holds one out)"
            )
        if not isinstance(self.self_balancing, bool):
            raise ValueError(f"self_balancing={self.self_balancing!r}: must be True or False")
        if not _is_int(self.classes_per_client) or self.classes_per_client < 1:
            raise ValueError(f"classes_per_client={self.classes_per_client!r}: must be an integer >= 1")
        if self.class_assignment not in CLASS_ASSIGNMENTS:
            allowed = ", ".join(repr(c) for c in CLASS_ASSIGNMENTS)
            raise ValueError(f"class_assignment={self.class_assignment!r}: must be one of {allowed}")
        if not _is_int(self.shards_per_client) or self.shards_per_client < 1:
            raise ValueError(f"shards_per_client={self.shards_per_client!r}: must be an integer >= 1")
        if not _is_int(self.shard_size) or self.shard_size < 0:
            raise ValueError(
                f"shard_size={self.shard_size!r}: must be an integer >= 0 (0 = the train split cut into "
                "num_clients * shards_per_client equal shards)"
            )

    def check_fits(self, num_classes: int, input_shape: tuple[int, ...]) -> None:
        """The settings that depend on the dataset's classes and image size (for a plug-in dataset: once loaded)."""
        if self.backdoor_target >= num_classes:
            raise ConfigError(
                f"backdoor_target={self.backdoor_target!r}: must be a class index in [0, {num_classes}) for dataset {self.dataset!r}"
            )
        height, width = input_shape[-2], input_shape[-1]
        side = min(height, width)
        if self.trigger_size > side:
            raise ConfigError(
                f"trigger_size={self.trigger_size!r}: must be an integer in [1, {side}] for {self.dataset!r} ({height}x{width} images)"
            )
        if self.partition == "pathological" and self.classes_per_client > num_classes:
            raise ConfigError(
                f"classes_per_client={self.classes_per_client}: dataset {self.dataset!r} has {num_classes} "
                f"classes; use at most {num_classes}"
            )

    @property
    def num_classes(self) -> int:
        """Number of classes of a built-in dataset (a plug-in dataset's: `FederatedData.num_classes`, once loaded)."""
        if self.dataset not in _NUM_CLASSES:
            raise ValueError(
                f"dataset={self.dataset!r}: a plug-in dataset's classes are known once it is loaded (FederatedData.num_classes)"
            )
        return _NUM_CLASSES[self.dataset]

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """Shape (C, H, W) of one input of a built-in dataset (a plug-in dataset's: `FederatedData.input_shape`)."""
        if self.dataset not in _INPUT_SHAPES:
            raise ValueError(
                f"dataset={self.dataset!r}: a plug-in dataset's input shape is known once it is loaded (FederatedData.input_shape)"
            )
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


def _partitioner(spec: DataSpec, seed: int) -> Any:
    """The flwr-datasets partitioner `spec.partition` with the spec's parameters, seeded by `seed`."""
    # Imported here: `datasets` and pyarrow take seconds to import, paid only by a process that partitions.
    from flwr_datasets import partitioner as fp

    n = spec.num_clients
    if spec.partition == "iid":
        return fp.IidPartitioner(num_partitions=n)
    if spec.partition == "dirichlet":
        return fp.DirichletPartitioner(
            num_partitions=n,
            partition_by="label",
            alpha=float(spec.alpha),
            min_partition_size=spec.min_partition_size,
            self_balancing=spec.self_balancing,
            shuffle=True,
            seed=seed,
        )
    if spec.partition == "pathological":
        return fp.PathologicalPartitioner(
            num_partitions=n,
            partition_by="label",
            num_classes_per_partition=spec.classes_per_client,
            class_assignment_mode=spec.class_assignment,
            shuffle=True,
            seed=seed,
        )
    return fp.ShardPartitioner(
        num_partitions=n,
        partition_by="label",
        num_shards_per_partition=spec.shards_per_client,
        shard_size=spec.shard_size or None,
        keep_incomplete_shard=False,
        shuffle=True,
        seed=seed,
    )


def _partition_settings(spec: DataSpec) -> str:
    """The partition options in force, as the CLI spells them (for error messages)."""
    extra = {
        "iid": "",
        "dirichlet": f", alpha={spec.alpha}, min-partition-size={spec.min_partition_size}, self-balancing={spec.self_balancing}",
        "pathological": f", classes-per-client={spec.classes_per_client}, class-assignment={spec.class_assignment}",
        "shard": f", shards-per-client={spec.shards_per_client}, shard-size={spec.shard_size}",
    }[spec.partition]
    return f"partition={spec.partition} (num-clients={spec.num_clients}{extra})"


def partition_labels(labels: np.ndarray, spec: DataSpec, seed: int | None = None) -> list[np.ndarray]:
    """Client index sets for `labels` from flwr-datasets' partitioner `spec.partition`, from local data only.

    The labels become a `datasets.Dataset` built in memory (columns `label` and `index`), its rows in a
    seeded random order as flwr-datasets' FederatedDataset shuffles before partitioning (IidPartitioner cuts
    the rows in order, so without it an ordered dataset would give each client a block of classes), and
    assigned to the partitioner: nothing is downloaded. Each returned part is sorted int64 row indices into `labels`.
    Shard and pathological partitions can leave rows in no client (the last incomplete shards; classes
    no client drew); every client gets at least `MIN_CLIENT_EXAMPLES` rows or ConfigError says how to fix it.
    `seed` defaults to `spec.seed`; the shuffle and the partitioner draw from two streams derived from it.
    From `PARTITION_CACHE_FROM` clients on, the parts are read from (or written to) a file keyed by the labels, the
    partition options, the seed and the library versions: the first process on a machine computes them.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels has shape {labels.shape}: must be 1-D")
    if labels.size < MIN_CLIENT_EXAMPLES * spec.num_clients:
        raise ConfigError(
            f"num_clients={spec.num_clients}: {labels.size} training examples cannot give every client "
            f"{MIN_CLIENT_EXAMPLES} (one to train on, one held out); use fewer clients"
        )
    seed = spec.seed if seed is None else seed
    cache = _partition_cache_file(labels, spec, seed)
    if cache is not None:
        cached = _read_partition_cache(cache, spec.num_clients)
        if cached is None and _partition_in_child(labels, spec, seed, cache):
            cached = _read_partition_cache(cache, spec.num_clients)
        if cached is not None:
            return cached
    parts = _partition_labels(labels, spec, seed)
    if cache is not None:
        _write_partition_cache(cache, parts)
    return parts


# Partitioning calls flwr-datasets' load_partition once per client (about 20 ms each): at 10,000 clients that is
# minutes, paid by the driver and again by every Ray worker that loads the data. From this many clients on, the
# parts are kept in a file keyed by everything they depend on, so the first process on a machine computes them and
# the others read them. FEDUNLEARN_PARTITION_CACHE: the folder (default: <temp>/fedunlearn-partitions), or "off".
PARTITION_CACHE_FROM = 1000
PARTITION_CACHE_VERSION = 1  # raise when partition_labels changes what it returns for the same inputs


def _partition_cache_file(labels: np.ndarray, spec: DataSpec, seed: int) -> Path | None:
    import hashlib
    import os
    import tempfile

    setting = os.environ.get("FEDUNLEARN_PARTITION_CACHE", "")
    if spec.num_clients < PARTITION_CACHE_FROM or setting.lower() == "off":
        return None
    from importlib.metadata import version  # not `import datasets`: a process that reads the file never pays its 190 MB

    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(labels.astype(np.int64)).tobytes())
    key = f"{PARTITION_CACHE_VERSION}|{_partition_settings(spec)}|seed={seed}|flwr-datasets={version('flwr-datasets')}|datasets={version('datasets')}"
    digest.update(key.encode())
    folder = Path(setting) if setting else Path(tempfile.gettempdir()) / "fedunlearn-partitions"
    return folder / f"parts-{spec.num_clients}-{digest.hexdigest()[:24]}.npz"


def _read_partition_cache(path: Path, num_clients: int) -> list[np.ndarray] | None:
    """The cached parts, or None when the file is missing or unreadable (then they are computed again)."""
    try:
        with np.load(path) as stored:
            flat, offsets = stored["flat"], stored["offsets"]
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile):
        return None
    if offsets.shape != (num_clients + 1,) or int(offsets[-1]) != flat.size:
        return None
    return [flat[offsets[i] : offsets[i + 1]].astype(np.int64) for i in range(num_clients)]


def _write_partition_cache(path: Path, parts: list[np.ndarray]) -> None:
    """Write atomically (a temporary file renamed), so a process reading at the same time sees all of it or nothing."""
    import os

    offsets = np.concatenate([[0], np.cumsum([p.size for p in parts])]).astype(np.int64)
    flat = np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
        np.savez(temporary, flat=flat, offsets=offsets)
        os.replace(temporary, path)
    except OSError:  # a read-only or full temp folder: the parts are still returned, only not kept
        pass


def _partition_in_child(labels: np.ndarray, spec: DataSpec, seed: int, path: Path) -> bool:
    """Partition in a short-lived Python process that writes the file: this process never imports `datasets`
    (190 MB of RSS, kept for the process's life; at 1000 clients two Ray workers and the driver paid it). False when
    the child failed (then the caller partitions here, and raises the partitioner's own error if there is one)."""
    import os
    import pickle
    import subprocess
    import sys
    import tempfile

    if os.environ.get("FEDUNLEARN_PARTITION_CHILD"):  # already the child: partition here
        return False
    with tempfile.TemporaryDirectory(prefix="fedunlearn-partition-") as tmp:
        job = Path(tmp) / "job.pkl"
        job.write_bytes(pickle.dumps((labels, spec, seed, str(path))))
        code = "import pickle, sys; from fedunlearn.data import _partition_child; _partition_child(sys.argv[1])"
        env = {**os.environ, "FEDUNLEARN_PARTITION_CHILD": "1"}
        done = subprocess.run([sys.executable, "-c", code, str(job)], env=env, capture_output=True, check=False)
    return done.returncode == 0


def _partition_child(job: str) -> None:
    """The child of `_partition_in_child`: partition and write the file."""
    import pickle

    labels, spec, seed, path = pickle.loads(Path(job).read_bytes())
    _write_partition_cache(Path(path), _partition_labels(labels, spec, seed))


def _partition_labels(labels: np.ndarray, spec: DataSpec, seed: int) -> list[np.ndarray]:
    from datasets import Dataset

    shuffle_seed, partitioner_seed = (int(s) for s in np.random.SeedSequence(seed).generate_state(2))
    # The permutation is applied here rather than by Dataset.shuffle: the same order, without an indices mapping
    # that every partition's select would compose (2x slower at 100 clients).
    order = np.random.default_rng(shuffle_seed).permutation(labels.size)
    table = Dataset.from_dict({"label": labels[order].astype(np.int64), "index": order.astype(np.int64)})
    partitioner = _partitioner(spec, partitioner_seed)
    partitioner.dataset = table
    try:
        with warnings.catch_warnings():
            # DirichletPartitioner warns at every resampling before it gives up (then it raises, handled below).
            warnings.filterwarnings("ignore", message=".*min_partition_size.*")
            # pyarrow's deprecation notice inside datasets' sort (ShardPartitioner): not ours, not the user's.
            warnings.filterwarnings("ignore", message=".*null_placement.*", category=FutureWarning)
            # `[:]` in numpy format reads the column as one array; np.asarray over a `datasets` Column formats it
            # row by row (60,000 rows: 40 s against 0.1 s, measured under load).
            parts = [
                np.sort(np.asarray(partitioner.load_partition(i).with_format("numpy")[:]["index"], dtype=np.int64).reshape(-1))
                for i in range(spec.num_clients)
            ]
    except (ValueError, IndexError) as err:
        raise ConfigError(
            f"{_partition_settings(spec)} cannot split {labels.size} examples: flwr-datasets says: {' '.join(str(err).split())}"
        ) from None
    sizes = [p.size for p in parts]
    if min(sizes) < MIN_CLIENT_EXAMPLES:
        fix = {
            "iid": "use fewer clients",
            "dirichlet": "raise --alpha or --min-partition-size, or use fewer clients",
            "pathological": "raise --classes-per-client, try --class-assignment deterministic, or use fewer clients",
            "shard": "lower --shards-per-client or --shard-size, or use fewer clients",
        }[spec.partition]
        raise ConfigError(
            f"{_partition_settings(spec)}: client {int(np.argmin(sizes))} got {min(sizes)} examples, every client "
            f"needs at least {MIN_CLIENT_EXAMPLES} (one to train on, one held out); {fix}"
        )
    return parts


def _as_numpy(value: Any, what: str) -> np.ndarray:
    """A tensor, array or array-like as a numpy array (floating tensors as float32: numpy has no bfloat16)."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        return (value.float() if value.is_floating_point() else value).numpy()
    if isinstance(value, np.ndarray):
        return value
    type_name = type(value).__name__
    if type_name in ("Image", "JpegImageFile", "PngImageFile"):  # PIL images, without importing PIL
        raise ConfigError(f"{what} is a PIL image: give the torchvision dataset transform=torchvision.transforms.ToTensor()")
    try:
        return np.asarray(value)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{what} is a {type_name} that is not array-like ({err}); return tensors or numpy arrays") from None


def _dataset_arrays(split: Any, prefix: str) -> tuple[np.ndarray, np.ndarray]:
    """A map-style torch Dataset of (x, y) items as stacked arrays (one pass over the items)."""
    try:
        n = len(split)
    except TypeError:
        raise ConfigError(f"{prefix} is a torch Dataset without len(): return a map-style Dataset (len and [i]) or a pair (x, y)") from None
    xs, ys = [], []
    for i in range(n):
        item = split[i]
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            keys = f" with keys {sorted(item)}" if isinstance(item, dict) else ""
            raise ConfigError(f"{prefix} item {i} is a {type(item).__name__}{keys}: items must be (x, y) pairs")
        xs.append(_as_numpy(item[0], f"{prefix} item {i}: x"))
        ys.append(_as_numpy(item[1], f"{prefix} item {i}: y"))
    if not xs:
        return np.zeros((0,), np.float32), np.zeros((0,), np.int64)
    shapes = {x.shape for x in xs}
    if len(shapes) > 1:
        raise ConfigError(f"{prefix} items have inputs of several shapes {sorted(shapes)[:3]}: every x must have the same (C, H, W)")
    return np.stack(xs), np.stack([np.asarray(y).reshape(()) if np.asarray(y).size == 1 else np.asarray(y) for y in ys])


def _split_arrays(split: Any, prefix: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """One split returned by a loader as checked float32 inputs (N, C, H, W) and int64 labels in [0, num_classes)."""
    if isinstance(split, torch.utils.data.Dataset):
        x, y = _dataset_arrays(split, prefix)
    elif isinstance(split, (tuple, list)) and len(split) == 2:
        x, y = _as_numpy(split[0], f"{prefix}: x"), _as_numpy(split[1], f"{prefix}: y")
    else:
        raise ConfigError(f"{prefix} is a {type(split).__name__}: each split must be a pair (x, y) or a torch Dataset of (x, y) items")
    if x.ndim != 4:
        hint = "; grey images (N, H, W) need a channel axis: x[:, None]" if x.ndim == 3 else ""
        raise ConfigError(f"{prefix}: x has shape {x.shape}: expected (N, C, H, W){hint}")
    if x.shape[0] == 0:
        raise ConfigError(f"{prefix}: no examples (x has shape {x.shape})")
    if x.dtype.kind != "f":
        raise ConfigError(f"{prefix}: x has dtype {x.dtype}: inputs must be floating point, e.g. x.float() / 255 for 8-bit images")
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise ConfigError(
            f"{prefix}: y has shape {y.shape}, x has {x.shape[0]} examples: y must be one label per example, shape ({x.shape[0]},)"
        )
    if y.dtype.kind not in "iu":
        raise ConfigError(f"{prefix}: y has dtype {y.dtype}: labels must be integers (class indices), e.g. y.long()")
    bad = (y < 0) | (y >= num_classes)
    if bad.any():
        raise ConfigError(
            f"{prefix}: {int(bad.sum())} labels outside [0, {num_classes}) (min {int(y.min())}, max {int(y.max())}): "
            "labels must be class indices 0 .. num_classes - 1; remap them or return the right num_classes"
        )
    finite = np.isfinite(x)
    if not finite.all():
        raise ConfigError(f"{prefix}: x holds {int(x.size - finite.sum())} NaN or infinite values: clean or drop those examples")
    return np.ascontiguousarray(x, dtype=np.float32), y.astype(np.int64)


def _load_plugin(spec: DataSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """Call the user's loader `spec.dataset` and check what it returns against LOADER_CONTRACT."""
    loader = load_callable("dataset", spec.dataset, LOADER_CONTRACT)
    prefix = f"dataset={spec.dataset!r}"
    try:
        result = loader(data_dir=spec.data_dir, download=spec.download, seed=spec.seed)
    except ConfigError:
        raise
    except Exception as err:  # the user's loader failed: one line, with the arguments it was given
        raise ConfigError(
            f"{prefix}: LOADER(data_dir={spec.data_dir!r}, download={spec.download}, seed={spec.seed}) raised "
            f"{type(err).__name__}: {' '.join(str(err).split())}; it must be {LOADER_CONTRACT}"
        ) from None
    if not isinstance(result, Sequence) or isinstance(result, (str, bytes)) or len(result) != 3:
        got = f"{len(result)} items" if isinstance(result, Sequence) else f"a {type(result).__name__}"
        raise ConfigError(f"{prefix}: the loader returned {got}; return (train, test, num_classes)")
    train, test, num_classes = result
    if not _is_int(num_classes) or num_classes < 2:
        raise ConfigError(f"{prefix}: num_classes={num_classes!r}: must be an integer >= 2 (the loader's third return value)")
    x_train, y_train = _split_arrays(train, f"{prefix} train split", int(num_classes))
    x_test, y_test = _split_arrays(test, f"{prefix} test split", int(num_classes))
    if x_train.shape[1:] != x_test.shape[1:]:
        raise ConfigError(
            f"{prefix}: train inputs have shape {x_train.shape[1:]}, test inputs {x_test.shape[1:]}: both splits "
            "must hold inputs of the same (C, H, W)"
        )
    return x_train, y_train, x_test, y_test, int(num_classes)


def _load_digits(spec: DataSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Digits as float32 (N,1,8,8) in [0,1], with a seeded stratified train/test split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = (bunch.images.astype(np.float32) / 16.0)[:, None, :, :]
    y = bunch.target.astype(np.int64)
    train_idx, test_idx = train_test_split(np.arange(y.size), test_size=spec.test_fraction, stratify=y, random_state=spec.seed)
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
    if is_plugin_path(spec.dataset):
        x_train, y_train, x_test, y_test, num_classes = _load_plugin(spec)
        spec.check_fits(num_classes, x_train.shape[1:])
    elif spec.dataset == "digits":
        x_train, y_train, x_test, y_test = _load_digits(spec)
        num_classes = spec.num_classes
    else:
        x_train, y_train, x_test, y_test = _load_torchvision(spec)
        num_classes = spec.num_classes

    # Independent streams per step, so e.g. changing the backdoor does not change the partition.
    # spawn(5)[:4] equals spawn(4): the noise stream leaves the others (and every earlier dataset) unchanged.
    limit_ss, partition_ss, heldout_ss, backdoor_ss, noise_ss = np.random.SeedSequence(spec.seed).spawn(5)
    if spec.input_noise > 0:  # a harder task on the same images: few examples carry the fit, so membership shows
        noise = np.random.default_rng(noise_ss)
        x_train = (x_train + noise.normal(0.0, spec.input_noise, x_train.shape)).astype(np.float32)
        x_test = (x_test + noise.normal(0.0, spec.input_noise, x_test.shape)).astype(np.float32)

    if spec.train_limit is not None and spec.train_limit < y_train.size:
        keep = np.sort(np.random.default_rng(limit_ss).choice(y_train.size, size=spec.train_limit, replace=False))
        x_train, y_train = x_train[keep], y_train[keep]

    if y_train.size < MIN_CLIENT_EXAMPLES * spec.num_clients:
        raise ConfigError(
            f"num_clients={spec.num_clients}: {y_train.size} training examples cannot give every "
            f"client one train and one held-out example; use fewer clients"
        )

    parts = partition_labels(y_train, spec, seed=int(partition_ss.generate_state(1)[0]))
    assigned = np.sort(np.concatenate(parts))
    if assigned.size < y_train.size:
        # Rows no client received (shard's incomplete shards, classes pathological left undrawn) leave the train
        # split, so that every train example belongs to exactly one client, as with the other partitioners.
        x_train, y_train = x_train[assigned], y_train[assigned]
        parts = [np.searchsorted(assigned, p).astype(np.int64) for p in parts]

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
        num_classes=num_classes,
        input_shape=tuple(int(s) for s in x_train.shape[1:]),  # type: ignore[arg-type]
        spec=spec,
    )


def _swap_shadow_pool(
    client_train: list[np.ndarray], client_heldout: list[np.ndarray], spec: DataSpec, poisoned: np.ndarray
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Each client trains on its examples outside the shadow pool plus the pool examples it holds that are in `shadow_in`."""
    pool = np.asarray(spec.shadow_pool, dtype=np.int64)
    inside = np.asarray(spec.shadow_in, dtype=np.int64)
    if poisoned[pool].any():
        raise ValueError("shadow_pool holds poisoned examples: membership candidates must be clean")
    trains, helds = [], []
    for train, held in zip(client_train, client_heldout, strict=True):
        mine = np.union1d(train, held)
        trains.append(np.union1d(np.setdiff1d(train, pool), np.intersect1d(mine, inside)).astype(np.int64))
        helds.append(np.setdiff1d(held, inside).astype(np.int64))
    return trains, helds


def select_forget_subset(data: FederatedData, client: int, samples: str, fraction: float, seed: int) -> torch.Tensor:
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
