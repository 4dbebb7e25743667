"""ownmodel: a Flower ServerApp that trains with Flower's FedAvg, then unlearns client 0 with IAU-Fed (both protocols)."""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from fedunlearn.deletion import DeletionRequest  # unlearning
from ownmodel.task import BACKDOOR_CLIENT, Net, attack_success, load_test, test
from strategies import unlearning_strategy  # unlearning

app = ServerApp()
results: dict[str, dict[str, float]] = {}  # what the last run measured (read by the test)


def measure(name: str, arrays: ArrayRecord) -> None:
    """Test accuracy and the backdoor's attack success rate of a model."""
    model = Net()
    model.load_state_dict(arrays.to_torch_state_dict())
    x, y = load_test()
    results[name] = {"acc_test": test(model, x, y)[1], "backdoor_asr": attack_success(model, x, y)}
    print(f"{name:<10} test accuracy {results[name]['acc_test']:.3f}   backdoor ASR {results[name]['backdoor_asr']:.3f}")


@app.main()
def main(grid: Grid, context: Context) -> None:
    """FedAvg training, then client 0's withdrawal."""
    num_rounds = int(context.run_config.get("num-server-rounds", 10))
    num_clients = int(context.run_config.get("num-clients", 4))
    torch.manual_seed(0)
    strategy = FedAvg(fraction_train=1.0, fraction_evaluate=1.0)
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(Net().state_dict()),
        num_rounds=num_rounds,
        train_config=ConfigRecord({"lr": 0.05, "local-epochs": 2}),
    )
    measure("trained", result.arrays)

    unlearning = unlearning_strategy(grid, Net(), num_clients)  # unlearning: asks every client for its partition id
    unlearning.fill_caches(grid, result.arrays, upload=True)  # unlearning: each client caches its gradient (and uploads it)
    request = DeletionRequest(client=BACKDOOR_CLIENT)  # unlearning: client 0 withdraws all of its data
    forget_count = unlearning.directory.num_train[BACKDOOR_CLIENT]  # unlearning: |S|
    for protocol in ("fresh", "cached"):  # unlearning
        unlearned, report = unlearning.branch().unlearn(grid, result.arrays, request, forget_count, protocol=protocol)  # unlearning
        print(f"iau ({protocol}): {report.rounds} round(s), clients asked {report.clients_asked}")  # unlearning
        measure(protocol, unlearned)  # unlearning
