"""ownmodel: a Flower ClientApp (the quickstart's), plus the unlearning handlers."""

from __future__ import annotations

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from ownmodel.task import Net, load_data, load_partition
from ownmodel.task import test as test_fn
from ownmodel.task import train as train_fn
from strategies import add_unlearning  # unlearning

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the model on local data."""
    model = Net()
    model.load_state_dict(msg.content.array_records["arrays"].to_torch_state_dict())
    partition_id, num_partitions = int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    trainloader, _ = load_data(partition_id, num_partitions)
    config = msg.content.config_records["config"]
    train_loss = train_fn(model, trainloader, int(str(config["local-epochs"])), float(str(config["lr"])))
    metrics = MetricRecord({"train_loss": train_loss, "num-examples": len(trainloader.dataset)})  # type: ignore[arg-type]
    return Message(content=RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the model on local held-out data."""
    model = Net()
    model.load_state_dict(msg.content.array_records["arrays"].to_torch_state_dict())
    partition_id, num_partitions = int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    _, (x, y) = load_partition(partition_id, num_partitions)
    loss, accuracy = test_fn(model, x, y)
    metrics = MetricRecord({"eval_loss": loss, "eval_acc": accuracy, "num-examples": len(y)})
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)


add_unlearning(app, Net, load_partition)  # unlearning: cache fill at evaluate, the gradient queries, every method's client step
