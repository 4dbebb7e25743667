"""The ClientApp: FedAvg training, evaluation that fills the gradient cache, and every registered method's client steps.

Handlers are thin: they read the message, call the math in `fedunlearn`, and write the reply. Everything heavy
(data, model, cache store) is resident per worker process in `strategies.runtime.ClientRuntime`. The core handlers
(info, train, evaluate) are here; each method's own handlers are in its file under `strategies/methods/` and are
attached from the registry, so this module names no method. `strategies.library.add_unlearning` attaches the same
handlers to a user's own ClientApp.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch
from flwr.app import ArrayRecord, Context, Message
from flwr.clientapp import ClientApp

from fedunlearn.cache import GradientCache, exclusion_digest
from fedunlearn.deletion import excluded_indices, kept_indices
from fedunlearn.gradients import gradient_sum
from fedunlearn.training import local_train

from . import keys
from .methods import client_handlers
from .runtime import ClientHandler, ClientRuntime, ClientSpec, incoming, partition_of, reply, train_seed, train_settings_from

__all__ = [
    "Bound",
    "ClientRuntime",
    "ClientSpec",
    "attach_handlers",
    "build_client_app",
    "evaluate",
    "info",
    "train",
    "train_seed",
    "train_settings_from",
]


def info(runtime: ClientRuntime, msg: Message, context: Context) -> Message:
    """query.info: which partition this node serves and how many examples it holds (node ids are random per run)."""
    pid = partition_of(context)
    return reply(
        msg,
        {
            keys.PARTITION_ID: pid,
            keys.NUM_TRAIN: len(runtime.data.client_train[pid]),
            keys.NUM_HELDOUT: len(runtime.data.client_heldout[pid]),
        },
    )


def train(runtime: ClientRuntime, msg: Message, context: Context) -> Message:
    """train: local epochs on the examples the ledger leaves this client."""
    served = incoming(msg, context)
    pid, config = served.partition, served.config
    indices = kept_indices(runtime.data, pid, served.ledger)
    runtime.load(msg.content.array_records[keys.ARRAYS])
    generator = torch.Generator().manual_seed(train_seed(config, pid))
    x, y = runtime.arrays_xy(indices)
    loss = local_train(runtime.model, x, y, train_settings_from(config), generator)
    state = OrderedDict((k, v.detach().cpu()) for k, v in runtime.model.state_dict().items())
    return reply(
        msg, {keys.NUM_EXAMPLES: len(indices), keys.TRAIN_LOSS: loss, keys.COMPUTE_S: served.elapsed()}, {keys.ARRAYS: ArrayRecord(state)}
    )


def evaluate(runtime: ClientRuntime, msg: Message, context: Context) -> Message:
    """evaluate: held-out loss and accuracy; with cache-fill also the gradient cache (uploaded with cache-upload)."""
    served = incoming(msg, context)
    pid, config = served.partition, served.config
    runtime.load(msg.content.array_records[keys.ARRAYS])
    model = runtime.model
    model.eval()
    hx, hy = runtime.data.client_heldout_arrays(pid)
    with torch.no_grad():
        logits = model(hx.to(runtime.device))
        eval_loss = float(torch.nn.functional.cross_entropy(logits, hy.to(runtime.device)))
        eval_acc = float((logits.argmax(1).cpu() == hy).float().mean())
    metrics: dict[str, float | int] = {keys.NUM_EXAMPLES: len(hy), keys.EVAL_LOSS: eval_loss, keys.EVAL_ACC: eval_acc}
    arrays: dict[str, ArrayRecord] = {}
    if bool(config.get(keys.CACHE_FILL, False)):
        ledger = served.ledger
        indices = kept_indices(runtime.data, pid, ledger)
        scope = exclusion_digest(excluded_indices(runtime.data, pid, ledger))
        x, y = runtime.arrays_xy(indices)
        # The forward pass that yields the training loss also yields the cache: one pass, add the backward.
        flat, loss_sum, correct = gradient_sum(model, x, y)
        runtime.store.put(pid, GradientCache(flat, len(indices), str(config[keys.MODEL_VERSION]), scope))
        metrics.update(
            {
                keys.TRAIN_LOSS: loss_sum / max(len(indices), 1),
                keys.TRAIN_ACC: correct / max(len(indices), 1),
                keys.GRADIENT_COUNT: len(indices),
                keys.CACHE_BYTES: runtime.store.client_bytes(pid),
            }
        )
        if bool(config.get(keys.CACHE_UPLOAD, False)):
            arrays[keys.GRADIENT] = runtime.gradient_record(flat, str(config.get(keys.GRADIENT_DTYPE, "float32")))
    metrics[keys.COMPUTE_S] = served.elapsed()
    return reply(msg, metrics, arrays, version=str(config[keys.MODEL_VERSION]) if keys.MODEL_VERSION in config else None)


def _spec_from_context(context: Context, overrides: Mapping[str, Any] | None = None) -> ClientSpec:
    """Build a ClientSpec from a `flwr run` run_config (keys as in the CLI); `overrides` win over it."""
    from fedunlearn.config import build_config

    from .app_config import client_spec_for, default_cache_dir

    settings = {k: v for k, v in context.run_config.items()}
    return client_spec_for(build_config(file_settings=settings, overrides=dict(overrides or {})), default_cache_dir(context.run_id))


class Bound:
    """A handler bound to how its node finds its runtime (a picklable callable: Flower pickles the app per message)."""

    def __init__(self, handler: ClientHandler, runtime_for: Any) -> None:
        self.handler = handler
        self.runtime_for = runtime_for

    def __call__(self, msg: Message, context: Context) -> Message:
        return self.handler(self.runtime_for(context), msg, context)


def attach_handlers(app: ClientApp, runtime_for: Any) -> ClientApp:
    """Register every registered method's client handlers on `app` (`query.<name>`), resolving the runtime per message."""
    for query, handler in client_handlers().items():
        app.query(query)(Bound(handler, runtime_for))
    return app


class _SpecRuntime:
    """The runtime of a node: from a fixed ClientSpec, or from the Flower run config (then `overrides`)."""

    def __init__(self, spec: ClientSpec | None, overrides: Mapping[str, Any]) -> None:
        self.spec = spec
        self.overrides = dict(overrides)

    def __call__(self, context: Context) -> ClientRuntime:
        return ClientRuntime.get(self.spec if self.spec is not None else _spec_from_context(context, self.overrides))


def build_client_app(spec: ClientSpec | None = None, overrides: Mapping[str, Any] | None = None) -> ClientApp:
    """The fedunlearn ClientApp; `spec=None` reads its settings from the Flower run config (then `overrides`)."""
    if spec is not None and overrides:
        raise ValueError("build_client_app: give either spec or overrides, not both (a spec already fixes every setting)")
    app = ClientApp()
    runtime_for = _SpecRuntime(spec, overrides or {})
    app.query(keys.QUERY_INFO.removeprefix("query."))(Bound(info, runtime_for))
    app.train()(Bound(train, runtime_for))
    app.evaluate()(Bound(evaluate, runtime_for))
    return attach_handlers(app, runtime_for)
