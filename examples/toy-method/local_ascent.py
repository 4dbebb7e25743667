"""A toy client-side unlearning method in one file: the withdrawing client ascends its own loss for a few epochs.

What docs/adding-a-method.md describes, shown whole: settings that travel with one `to_record` / `from_record`
pair, the client step (registered as `query.local_ascent`), the server step (one round through the reply
pipeline), registered once. Importing this file makes `--methods local-ascent` valid and puts its handler on
every ClientApp built afterwards (`build_client_app`, `add_unlearning`); tests/test_toy_method.py runs it.
Not a good method (nothing keeps the model useful): a demonstration of the plumbing.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from fedunlearn.deletion import forget_indices
from strategies import keys
from strategies.methods import MethodContext, MethodOutcome, WireSettings, register, storage
from strategies.rounds import ask_clients, require_reply
from strategies.runtime import ClientRuntime, own_request, partition_of, reply
from strategies.validation import metrics_of

NAME = "local-ascent"
QUERY = "local_ascent"  # Flower handler names follow Python's identifier rules


@dataclass(frozen=True)
class LocalAscentSettings(WireSettings):
    """Full-batch gradient ascent steps on the forget set."""

    lr: float = 0.05
    epochs: int = 3

    WIRE = {"lr": keys.LR, "epochs": keys.EPOCHS}


def ascend(runtime: ClientRuntime, msg: Message, context: Context) -> Message:
    """query.local_ascent: client u raises its loss on S and sends its model back."""
    request = own_request(msg.content.config_records[keys.CONFIG], partition_of(context))
    settings = LocalAscentSettings.from_record(msg.content.config_records[keys.CONFIG])
    runtime.load(msg.content.array_records[keys.ARRAYS])
    x, y = runtime.arrays_xy(forget_indices(runtime.data, request))
    optimizer = torch.optim.SGD(runtime.model.parameters(), lr=settings.lr)
    runtime.model.train()
    for _ in range(settings.epochs):
        optimizer.zero_grad()
        (-F.cross_entropy(runtime.model(x), y)).backward()
        optimizer.step()
    state = OrderedDict((k, v.detach().cpu()) for k, v in runtime.model.state_dict().items())
    return reply(msg, {keys.NUM_EXAMPLES: len(y)}, {keys.ARRAYS: ArrayRecord(state)})


@register(
    NAME, "toy: the withdrawing client ascends its loss on its forget set; its model replaces the global one", handlers={QUERY: ascend}
)
def local_ascent(ctx: MethodContext) -> MethodOutcome:
    """One round with client u alone; its model is the unlearned one."""
    config = ConfigRecord({keys.REQUEST: json.dumps(asdict(ctx.request))})
    config.update(LocalAscentSettings().to_record())
    message = Message(
        RecordDict({keys.ARRAYS: ctx.arrays, keys.CONFIG: config}),
        dst_node_id=ctx.strategy.directory.node_of[ctx.request.client],
        message_type=f"query.{QUERY}",
    )

    def parse(partition: int, answer: Message) -> ArrayRecord:
        metrics_of(answer)
        return answer.content.array_records[keys.ARRAYS]

    outcome = ask_clients(
        ctx.grid,
        [message],
        directory=ctx.strategy.directory,
        phase="unlearn",
        parse=parse,
        retries=ctx.cfg.unlearn_retries,
        timeout=ctx.cfg.round_timeout,
    )
    return MethodOutcome(require_reply(outcome, ctx.request.client, NAME), details={"unlearning": outcome.to_dict(), "storage": storage()})
