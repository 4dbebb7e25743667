"""Checks that need the machine or the data, done in the driver before Ray or any training starts.

The configuration itself is validated when it is built (fedunlearn.config); what is left here depends on
what this machine holds: the dataset's files, the devices asked for. Each failure is one ConfigError that
names the key, the value and the fix, so the command line exits 2 in seconds instead of after Ray started
and every client failed on its own.
"""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import torch

from fedunlearn.config import FIELD_NAMES, ExperimentConfig
from fedunlearn.data import DatasetStore, DataSpec, FederatedData
from fedunlearn.errors import ConfigError

# The files torchvision reads for each dataset, relative to --data-dir (torchvision's own layout: what --download writes).
TORCHVISION_FILES = {
    "mnist": ("MNIST/raw", ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")),
    "fashion-mnist": (
        "FashionMNIST/raw",
        ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
    ),
    "cifar10": (
        "cifar-10-batches-py",
        ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch", "batches.meta"),
    ),
}
# What a reader of garbage files raises (torchvision asserts on the MNIST header; pickle fails on CIFAR's batches).
_UNREADABLE = (AssertionError, ValueError, RuntimeError, OSError, EOFError, IndexError, KeyError, TypeError, pickle.UnpicklingError)
_SNAKE_KEY = re.compile(r"\b(" + "|".join(sorted(FIELD_NAMES, key=len, reverse=True)) + r")=")


def kebab_keys(message: str) -> str:
    """The data layer names its settings in snake_case: name them as the CLI does (num_clients= -> num-clients=)."""
    return _SNAKE_KEY.sub(lambda m: m.group(1).replace("_", "-") + "=", message)


def missing_dataset_files(spec: DataSpec) -> tuple[Path, list[str]]:
    """The folder torchvision reads `spec.dataset` from, and the files it needs that are not there (digits needs none)."""
    if spec.dataset not in TORCHVISION_FILES:
        return Path("."), []
    from fedunlearn.data import DEFAULT_DATA_DIR

    sub, names = TORCHVISION_FILES[spec.dataset]
    folder = Path(spec.data_dir if spec.data_dir is not None else DEFAULT_DATA_DIR) / sub
    return folder, [name for name in names if not (folder / name).is_file()]


def idx_file_problem(path: Path) -> str | None:
    """What is wrong with an MNIST-style IDX file, from its 16-byte header and its size (None: it looks right).

    The header says the element type, the dimensions and their sizes; the size on disk must match. Reading
    it costs a few bytes, so garbage is named before torchvision (and the whole file) is ever loaded.
    """
    images = "images" in path.name
    with open(path, "rb") as handle:
        header = handle.read(16 if images else 8)
    expected_magic = 0x00000803 if images else 0x00000801  # unsigned bytes, 3 or 1 dimensions
    if len(header) < (16 if images else 8):
        return f"is {len(header)} bytes long, shorter than an IDX header"
    magic = int.from_bytes(header[:4], "big")
    if magic != expected_magic:
        return f"starts with 0x{magic:08x}, not the IDX {'image' if images else 'label'} magic number 0x{expected_magic:08x}"
    dims = [int.from_bytes(header[4 + 4 * i : 8 + 4 * i], "big") for i in range(3 if images else 1)]
    size = len(header) + (dims[0] * dims[1] * dims[2] if images else dims[0])
    actual = path.stat().st_size
    if actual != size:
        return f"holds {actual} bytes where its header ({' x '.join(map(str, dims))}) needs {size}"
    return None


def check_data(spec: DataSpec) -> FederatedData:
    """Load the federated data once, here in the driver (the run reuses it), or raise ConfigError saying what is missing.

    Covers: the data folder holds the dataset (else the missing files and how to get them), the files are
    readable (garbage is named as such), and the split fits (num-clients vs the examples, Dirichlet draws,
    trigger size): what load_federated_data checks, turned into a configuration error before Ray starts.
    """
    key = f"--dataset {spec.dataset} --data-dir {spec.data_dir}" if spec.data_dir is not None else f"--dataset {spec.dataset}"
    if spec.data_dir is not None and Path(spec.data_dir).exists() and not Path(spec.data_dir).is_dir():
        raise ConfigError(
            f"data-dir={spec.data_dir!r}: is a file, not a folder; point --data-dir at the folder that holds "
            f"{TORCHVISION_FILES.get(spec.dataset, ('',))[0] or 'the dataset'}"
        )
    folder, missing = missing_dataset_files(spec)
    if missing and not spec.download:
        raise ConfigError(
            f"{key}: {folder} lacks {', '.join(missing)}; add --download to fetch the dataset there "
            f"(torchvision, needs the internet once), or copy torchvision's files into {folder}"
        )
    if not missing and spec.dataset in ("mnist", "fashion-mnist"):
        for name in TORCHVISION_FILES[spec.dataset][1]:
            problem = idx_file_problem(folder / name)
            if problem:
                raise ConfigError(
                    f"{key}: {folder / name} {problem}: it is not {spec.dataset}'s file (truncated or another "
                    f"format); delete {folder} and fetch it again with --download"
                )
    try:
        return DatasetStore.get(spec)
    except ConfigError as err:  # the data layer's own refusals (e.g. a plug-in loader's data): keys as the CLI spells them
        raise ConfigError(kebab_keys(str(err))) from None
    except FileNotFoundError as err:  # e.g. --download failed: the data layer's message says what to do
        raise ConfigError(f"{key}: {kebab_keys(str(err))}") from None
    except ValueError as err:
        if _SNAKE_KEY.search(str(err)) or spec.dataset not in TORCHVISION_FILES:  # the split: too many clients, Dirichlet draws
            raise ConfigError(kebab_keys(str(err))) from None
        raise _unreadable(key, folder, spec, err) from None
    except _UNREADABLE as err:
        raise _unreadable(key, folder, spec, err) from None


def _unreadable(key: str, folder: Path, spec: DataSpec, err: BaseException) -> ConfigError:
    detail = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
    return ConfigError(
        f"{key}: the files in {folder} could not be read ({detail}); they are not {spec.dataset}'s "
        f"files (truncated or another format): delete {folder} and fetch it again with --download"
    )


def check_devices(cfg: ExperimentConfig) -> None:
    """The devices and Ray resources asked for exist here (a private Ray instance only sees this machine)."""
    if cfg.device.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(cfg.device.split(":", 1)[1]) if ":" in cfg.device else 0
        if index >= count:
            raise ConfigError(
                f"device={cfg.device!r}: this machine has {count} CUDA device{'s' if count != 1 else ''} visible to torch; "
                "use --device cpu or auto" + (f", or cuda:0 to cuda:{count - 1}" if count else "")
            )
    if cfg.ray_address != "local":
        return  # a cluster's resources are the cluster's: Flower reports an actor pool that does not fit
    cpus = os.cpu_count() or 1
    if cfg.num_cpus_per_client > cpus:
        raise ConfigError(
            f"num-cpus-per-client={cfg.num_cpus_per_client}: this machine has {cpus} CPUs, so no client actor "
            f"would fit; use at most {cpus} (1 is the default)"
        )
    if cfg.num_gpus_per_client > 0:
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if gpus == 0:
            raise ConfigError(
                f"num-gpus-per-client={cfg.num_gpus_per_client}: no GPU visible here, so no client actor would fit; "
                "use 0 (the default) or run on a GPU machine"
            )
        if cfg.num_gpus_per_client > gpus:
            raise ConfigError(
                f"num-gpus-per-client={cfg.num_gpus_per_client}: this machine has {gpus} GPU{'s' if gpus != 1 else ''}; "
                "use a share of at most that (0.25 = four actors per GPU)"
            )
