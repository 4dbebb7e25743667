"""An in-process Grid that calls a ClientApp directly: fast tests of whole ServerApps without Ray.

Each node gets its own Context with `partition-id` set, as the simulation engine does;
messages are copied on the way in and out so no object is shared between server and client.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from uuid import uuid4

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.supercore.task_identity import TaskIdentity

from .grid_wrapper import GridWrapper

SERVER_NODE_ID = 1


class LocalGrid(GridWrapper):
    """Runs `client_app` for `num_nodes` nodes in this process; nodes in `offline` never answer.

    `capture_errors=True` turns an exception raised by the ClientApp into an error reply, as the
    simulation engine does (the default lets it propagate, so a test sees the real traceback).
    """

    # Every reply exists once its message is pushed: a streamed round (strategies/streaming.py) has nothing to wait for.
    answers_at_push = True

    def __init__(self, client_app: ClientApp, num_nodes: int, run_id: int = 1, seed: int = 0, capture_errors: bool = False) -> None:
        super().__init__(None)  # answers itself: the wrapper's interface boilerplate, no grid to pass to
        TaskIdentity.run_id = run_id
        TaskIdentity.node_id = SERVER_NODE_ID
        TaskIdentity.task_id = 1
        self.client_app = client_app
        self.node_ids = [1000 + 7919 * (i + 1) + seed for i in range(num_nodes)]
        self.contexts = {
            nid: Context(
                run_id=run_id, node_id=nid, node_config={"partition-id": i, "num-partitions": num_nodes}, state=RecordDict(), run_config={}
            )
            for i, nid in enumerate(self.node_ids)
        }
        self._replies: dict[str, Message] = {}
        self.offline: set[int] = set()
        self.capture_errors = capture_errors

    def get_node_ids(self) -> Iterable[int]:
        """All node ids, online or not (as the SuperLink lists registered nodes)."""
        return list(self.node_ids)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Run the ClientApp on each message now; offline nodes never answer."""
        ids = []
        for msg in messages:
            msg_id = str(uuid4())
            msg.metadata.__dict__["_message_id"] = msg_id
            ids.append(msg_id)
            nid = msg.metadata.dst_node_id
            if nid in self.offline:
                continue
            incoming = Message(copy.deepcopy(msg.content), nid, msg.metadata.message_type, group_id=msg.metadata.group_id)
            incoming.metadata.__dict__["_message_id"] = msg_id
            try:
                reply = self.client_app(incoming, self.contexts[nid])
            except Exception as err:  # noqa: BLE001 - mirrors the engine: the node answers with an error
                if not self.capture_errors:
                    raise
                reply = Message(Error(code=2, reason=f"{type(err)}:<'{err}'>"), reply_to=incoming)  # 2: CLIENT_APP_RAISED_EXCEPTION
            reply = Message(copy.deepcopy(reply.content), reply_to=msg) if not reply.has_error() else reply
            reply.metadata.__dict__["_src_node_id"] = nid
            self._replies[msg_id] = reply
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Replies available for these ids."""
        return [self._replies.pop(i) for i in list(message_ids) if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Push then pull once (everything ran synchronously)."""
        return self.pull_messages(self.push_messages(messages))
