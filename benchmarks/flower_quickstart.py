"""Baseline (a): a plain Flower app written the way Flower's PyTorch quickstart writes it.

As in `examples/quickstart-pytorch` (Message API): every `train` call builds a fresh model, loads the
received weights, builds this partition's DataLoader (per-item `ToTensor` + `Normalize` transforms,
80/20 split, shuffle) and trains with SGD; the dataset object itself is cached once per worker process
(the quickstart's global `fds`). The server is Flower's own `flwr.serverapp.strategy.FedAvg`.

Differences from the quickstart, each needed for a like-for-like timing: the model is the McMahan CNN
(`fedunlearn.models.build_model("mcmahan-cnn", ...)`) instead of its CIFAR `Net`; the data is the
synthetic MNIST of `benchmarks.data` read with torchvision's `MNIST`; batch size, epochs, lr and the
data folder travel in the train config, because `run_config` is empty under `run_simulation`; no
evaluation round (fraction_evaluate=0), so only training is timed.
"""

from __future__ import annotations

import math
import time

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from torch.utils.data import DataLoader, Subset

from fedunlearn.models import build_model
from strategies.wire import as_float, as_int

from .data import HELDOUT_FRACTION

MODEL = "mcmahan-cnn"
INPUT_SHAPE = (1, 28, 28)
NUM_CLASSES = 10

app = ClientApp()

_dataset = None  # cached once per worker process, like the quickstart's `fds`
_dataset_root: str | None = None


def Net() -> torch.nn.Module:  # noqa: N802 - named as in the quickstart
    """The model every baseline trains (McMahan et al.'s CNN)."""
    return build_model(MODEL, INPUT_SHAPE, NUM_CLASSES)


def load_data(partition_id: int, num_partitions: int, batch_size: int, data_dir: str) -> tuple[DataLoader, DataLoader]:
    """This partition's train and test DataLoaders, built anew on every call as the quickstart does."""
    from torchvision.datasets import MNIST
    from torchvision.transforms import Compose, Normalize, ToTensor

    global _dataset, _dataset_root
    if _dataset is None or _dataset_root != data_dir:
        _dataset = MNIST(root=data_dir, train=True, download=False, transform=Compose([ToTensor(), Normalize((0.5,), (0.5,))]))
        _dataset_root = data_dir
    size = len(_dataset) // num_partitions  # IID, contiguous shards (flwr-datasets' IidPartitioner)
    partition = torch.arange(partition_id * size, (partition_id + 1) * size)
    # Divide data on each node: 80% train, 20% test (the quickstart's train_test_split(test_size=0.2, seed=42))
    order = partition[torch.randperm(size, generator=torch.Generator().manual_seed(42))]
    num_test = math.ceil(HELDOUT_FRACTION * size)
    trainloader = DataLoader(Subset(_dataset, order[num_test:].tolist()), batch_size=batch_size, shuffle=True)
    testloader = DataLoader(Subset(_dataset, order[:num_test].tolist()), batch_size=batch_size)
    return trainloader, testloader


def train_fn(net: torch.nn.Module, trainloader: DataLoader, epochs: int, lr: float, momentum: float, device: torch.device) -> float:
    """Train the model on the training set (the quickstart's `train`)."""
    net.to(device)
    criterion = torch.nn.CrossEntropyLoss().to(device)
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum)
    net.train()
    running_loss = 0.0
    for _ in range(epochs):
        for images, labels in trainloader:
            images, labels = images.to(device), labels.to(device)
            optimizer.zero_grad()
            loss = criterion(net(images), labels)
            loss.backward()
            optimizer.step()
            running_loss += loss.item()
    return running_loss / max(epochs * len(trainloader), 1)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the model on local data."""
    start = time.perf_counter()
    model = Net()
    model.load_state_dict(msg.content.array_records["arrays"].to_torch_state_dict())
    device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    model.to(device)

    config = msg.content.config_records["config"]
    partition_id = int(context.node_config["partition-id"])
    num_partitions = int(context.node_config["num-partitions"])
    trainloader, _ = load_data(partition_id, num_partitions, as_int(config["batch-size"]), str(config["data-dir"]))
    train_loss = train_fn(model, trainloader, as_int(config["local-epochs"]), as_float(config["lr"]), as_float(config["momentum"]), device)

    # torch types Dataset without __len__ (its map-style datasets have one; this MNIST does)
    num_examples = len(trainloader.dataset)  # type: ignore[arg-type]
    metrics: dict[str, int | float | list[int] | list[float]] = {
        "train_loss": train_loss,
        "num-examples": num_examples,
        "torch-threads": torch.get_num_threads(),
        "compute-s": time.perf_counter() - start,
    }
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": MetricRecord(metrics)})
    return Message(content=content, reply_to=msg)


def initial_arrays(seed: int) -> ArrayRecord:
    """The global model's starting weights (seeded, so every baseline starts alike)."""
    torch.manual_seed(seed)
    return ArrayRecord(Net().state_dict())


def train_config(batch_size: int, epochs: int, lr: float, momentum: float, data_dir: str) -> ConfigRecord:
    """What every train message carries."""
    return ConfigRecord({"batch-size": batch_size, "local-epochs": epochs, "lr": lr, "momentum": momentum, "data-dir": data_dir})


def run_rounds(strategy: FedAvg, grid: Grid, arrays: ArrayRecord, config: ConfigRecord, num_rounds: int, timeout: float) -> ArrayRecord:
    """The quickstart ServerApp's body: `strategy.start(...)`."""
    return strategy.start(grid=grid, initial_arrays=arrays, train_config=config, num_rounds=num_rounds, timeout=timeout).arrays
