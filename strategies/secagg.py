"""Secure aggregation over the Message API: SecAgg+ (Bell et al. 2020) as four message rounds, and its client steps.

`secure_sum(grid, messages, ...)` runs any round whose replies carry a vector in their '{gradient}' record so the
server learns only the sum of those vectors: (1) setup: each client advertises two X25519 public keys; (2) share
keys: each client Shamir-shares its private mask seed b and its mask key sk1 among its neighbours (threshold t),
encrypted per recipient, and the server forwards the ciphertexts; (3) masked input collection: each client runs
the inner query (the plain round's handler), clips the vector to the norm bound, quantises it and adds its own mask
PRG(b) and the pairwise masks PRG(s_uv) that cancel in the sum; (4) unmasking: the clients still there send shares
of b for every client whose masked vector arrived and of sk1 for every client that dropped after sharing keys, and
the server removes what did not cancel. Each client shares with and masks against its k = 2 ceil(log2 n) + 1
neighbours on a shuffled ring (SecAgg+; k = n, SecAgg, up to 5 clients); every client must keep t of its neighbours
at every stage, else the round aborts.

Every stage goes through `strategies.rounds.ask_clients` (validation, the run's retries, recorded failures) and is
metered on its own (`stages`). The client's secrets between stages live in its node's `context.state`, as Flower's
`secaggplus_mod` keeps them: a node may be served by another worker process at the next stage (FLOWER_NOTES.md),
so worker memory would lose them; the state travels with the node, never in a message to the server.
The arithmetic is `fedunlearn.secagg`.
"""

from __future__ import annotations

import base64
import logging
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import decrypt, encrypt
from flwr.common.secure_aggregation.secaggplus_utils import share_keys_plaintext_concat, share_keys_plaintext_separate
from flwr.serverapp import Grid

from fedunlearn.costs import CostMeter
from fedunlearn.errors import InvalidReplyError, MissingRepliesError
from fedunlearn.secagg import (
    FIELD_DTYPE,
    Quantiser,
    SecAggSettings,
    agree,
    field_sum,
    key_pair,
    masked_input,
    neighbourhood_size,
    neighbourhoods,
    threshold_for,
    unmask,
)

from . import keys
from .directory import ClientDirectory
from .metered_grid import MeteredGrid
from .rounds import ask_clients
from .runtime import ClientHandler, ClientRuntime, partition_of, real, whole
from .validation import check_version, metrics_of, positive_count

if TYPE_CHECKING:
    from .iau_fed import IAUFed, UnlearningReport

logger = logging.getLogger("fedunlearn.secagg")

STAGES = ("setup", "share-keys", "collect-masked", "unmask")
MASKED_ARRAY = "masked"

__all__ = ["HANDLERS", "STAGES", "SecAggAbortedError", "SecureSum", "secure_caching", "secure_direction", "secure_sum"]


class SecAggAbortedError(MissingRepliesError):
    """Fewer than t clients answered a stage: the sum cannot be unmasked; `report` is what was recorded of it."""

    def __init__(self, message: str, report: dict[str, Any]) -> None:
        super().__init__(message)
        self.report = report


@dataclass
class SecureSum:
    """What a secure round gave the server: the sum of the vectors of `contributors`, and the inner replies' rest."""

    total: torch.Tensor  # float64, the dequantised sum over `contributors`
    accepted: dict[int, Any]  # the caller's parse of each contributor's reply (its vector removed)
    missing: list[int]  # asked, but not in the sum
    report: dict[str, Any] = field(default_factory=dict)


def _field(values: Any) -> ConfigRecord:
    """A ConfigRecord of `values`, leaving out empty lists (Flower cannot size them); readers default to []."""
    return ConfigRecord(cast(Any, {k: v for k, v in dict(values).items() if not (isinstance(v, list) and not v)}))


def _secagg(reply: Message) -> ConfigRecord:
    if keys.SECAGG not in reply.content.config_records:
        raise InvalidReplyError(f"reply from node {reply.metadata.src_node_id} has no '{keys.SECAGG}' record")
    return reply.content.config_records[keys.SECAGG]


def secure_sum(
    grid: Grid,
    messages: Sequence[Message],
    *,
    directory: ClientDirectory,
    phase: str,
    parse: Callable[[int, Message], Any],
    length: int,
    settings: SecAggSettings,
    scale: float = 1.0,
    retries: int = 0,
    timeout: float | None = None,
    rejected_log: list[dict[str, Any]] | None = None,
    failures_log: list[dict[str, Any]] | None = None,
) -> SecureSum:
    """Run `messages` (one inner query per client) as a SecAgg+ round; the server sees only the sum of their vectors.

    `parse(partition, reply)` validates the rest of an inner reply (counts, version); a reply it refuses is not summed.
    `length`: P, the vectors' length; each client clips its vector to L2 norm `settings.norm_bound * scale`.
    Raises SecAggAbortedError when a stage keeps fewer than t clients after the retries (nothing is unmasked).
    """
    partition_of_node = {nid: p for p, nid in directory.node_of.items()}
    inner = {partition_of_node[m.metadata.dst_node_id]: m for m in messages}
    participants = sorted(inner)
    n = len(participants)
    size = neighbourhood_size(n)
    order = list(participants)
    random.Random(os.urandom(8)).shuffle(order)  # who neighbours whom is public; shuffled as Flower's workflow does
    neighbours = neighbourhoods(order, size)
    threshold = threshold_for(settings.threshold, size)
    quantiser = Quantiser.for_clients(settings.norm_bound * scale, max(n, 1))
    session = os.urandom(8).hex()
    stage_meter = CostMeter()
    metered = MeteredGrid(grid, stage_meter)
    report: dict[str, Any] = {
        "participants": participants,
        "neighbours": size,
        "threshold": threshold,
        "bound": quantiser.bound,
        "levels": quantiser.levels,
        "step": quantiser.step,
        "field_bits": 32,
        "rounding": "nearest",
    }

    def close(status: str) -> dict[str, Any]:
        report["status"] = status
        report["stages"] = {name: cost.to_dict() for name, cost in stage_meter.phases.items()}
        return report

    def stage(
        name: str, to: list[int], content: Callable[[int], RecordDict], message_type: str, check: Callable[[int, Message], Any]
    ) -> dict[int, Any]:
        built = [Message(content(p), dst_node_id=directory.node_of[p], message_type=message_type) for p in to]
        with stage_meter.phase(name):
            outcome = ask_clients(
                metered,
                built,
                directory=directory,
                phase=f"{phase}:secagg-{name}",
                parse=check,
                retries=retries,
                timeout=timeout,
                rejected_log=rejected_log,
                failures_log=failures_log,
            )
        report.setdefault("answered", {})[name] = sorted(outcome.accepted)
        report["attempts"] = report.get("attempts", 0) + outcome.attempts
        report["retries"] = report.get("retries", 0) + outcome.retries
        report.setdefault("failures", []).extend(outcome.failures)
        report.setdefault("rejected", []).extend(outcome.rejected)
        alive = set(outcome.accepted)
        thin = [p for p in sorted(alive) if len(alive.intersection(neighbours[p])) < threshold]
        if len(alive) < threshold or thin:
            raise SecAggAbortedError(
                f"secure aggregation: {len(alive)} of {n} clients answered the {name} stage and client(s) "
                f"{thin} kept fewer than the threshold of {threshold} of their {size} neighbours (missing "
                f"{outcome.missing}): the sum cannot be unmasked",
                report=close("aborted"),
            )
        return outcome.accepted

    if n < 2:
        raise SecAggAbortedError(
            f"secure aggregation needs at least 2 clients, this round has {n}: a sum of one client is its vector", report=close("aborted")
        )

    def common(stage_name: str, **values: Any) -> dict[str, Any]:
        return {"session": session, "stage": stage_name, **values}

    # Stage 1: key advertisement.
    def check_keys(partition: int, reply: Message) -> tuple[bytes, bytes]:
        record = _secagg(reply)
        pk1, pk2 = record.get("pk1"), record.get("pk2")
        if not (isinstance(pk1, bytes) and isinstance(pk2, bytes) and len(pk1) == 32 and len(pk2) == 32 and pk1 != pk2):
            raise InvalidReplyError(f"client {partition}: the setup reply must hold two distinct 32-byte public keys")
        return pk1, pk2

    setup = common("setup", participants=participants, threshold=threshold)
    public = stage("setup", participants, lambda p: RecordDict({keys.SECAGG: _field(setup)}), keys.QUERY_SECAGG_SETUP, check_keys)
    advertised = sorted(public)
    all_keys = [k for p in advertised for k in public[p]]
    if len(set(all_keys)) != len(all_keys):
        raise SecAggAbortedError("secure aggregation: two clients advertised the same public key", report=close("aborted"))

    # Stage 2: share keys. Each client's reply: one ciphertext per other advertised neighbour.
    def around(p: int, alive: Any) -> list[int]:
        return [q for q in neighbours[p] if q in alive]

    def share_content(p: int) -> RecordDict:
        near = around(p, public)
        return RecordDict(
            {
                keys.SECAGG: _field(
                    common("share-keys", participants=near, pk1=[public[q][0] for q in near], pk2=[public[q][1] for q in near])
                )
            }
        )

    def check_shares(partition: int, reply: Message) -> dict[int, bytes]:
        record = _secagg(reply)
        dsts, cts = record.get("dsts"), record.get("ciphertexts")
        if not isinstance(dsts, list) or not isinstance(cts, list) or len(dsts) != len(cts):
            raise InvalidReplyError(f"client {partition}: the share-keys reply must hold equal lists 'dsts' and 'ciphertexts'")
        if sorted(cast(list[int], dsts)) != [q for q in around(partition, public) if q != partition]:
            raise InvalidReplyError(
                f"client {partition}: shares for {sorted(cast(list[int], dsts))}, expected its other advertised neighbours"
            )
        return dict(zip(cast(list[int], dsts), cast(list[bytes], cts), strict=True))

    ciphertexts = stage("share-keys", advertised, share_content, keys.QUERY_SECAGG_SHARE_KEYS, check_shares)
    sharing = sorted(ciphertexts)

    # Stage 3: masked input collection. The inner query's content travels with the forwarded ciphertexts.
    masked_total = np.zeros(length + 1, dtype=FIELD_DTYPE)

    def collect_content(p: int) -> RecordDict:
        content = RecordDict(dict(inner[p].content.items()))
        srcs = [q for q in around(p, ciphertexts) if q != p]
        content[keys.SECAGG] = _field(
            common(
                "collect-masked",
                srcs=srcs,
                ciphertexts=[ciphertexts[q][p] for q in srcs],
                bound=quantiser.bound,
                levels=quantiser.levels,
                inner_type=inner[p].metadata.message_type,
            )
        )
        return content

    def check_masked(partition: int, reply: Message) -> Any:
        _secagg(reply)
        record = reply.content.array_records.get(keys.SECAGG_MASKED)
        if record is None or list(record.keys()) != [MASKED_ARRAY]:
            raise InvalidReplyError(f"client {partition}: no masked vector ('{keys.SECAGG_MASKED}' record with one array)")
        array = record[MASKED_ARRAY]
        if array.dtype != "uint32" or tuple(array.shape) != (length + 1,):
            raise InvalidReplyError(
                f"client {partition}: masked vector of dtype {array.dtype} and shape {tuple(array.shape)}, expected uint32 ({length + 1},)"
            )
        vector = array.numpy()
        del reply.content[keys.SECAGG_MASKED]
        parsed = parse(partition, reply)  # refused: raises, and the masked vector is not summed
        masked_total[:] = field_sum([masked_total, vector])
        return parsed

    accepted = stage("collect-masked", sharing, collect_content, keys.QUERY_SECAGG_COLLECT, check_masked)
    contributors = sorted(accepted)
    dropped = [p for p in sharing if p not in accepted]

    # Stage 4: unmasking: each client is asked about its own neighbours.
    def unmask_lists(p: int) -> tuple[list[int], list[int]]:
        return around(p, accepted), [q for q in around(p, ciphertexts) if q not in accepted]

    def unmask_content(p: int) -> RecordDict:
        active, dead = unmask_lists(p)
        return RecordDict({keys.SECAGG: _field(common("unmask", active=active, dead=dead))})

    def check_unmask(partition: int, reply: Message) -> dict[int, bytes]:
        record = _secagg(reply)
        owners, shares = record.get("owners"), record.get("shares")
        if not isinstance(owners, list) or not isinstance(shares, list) or len(owners) != len(shares):
            raise InvalidReplyError(f"client {partition}: the unmask reply must hold equal lists 'owners' and 'shares'")
        expected = sorted(q for group in unmask_lists(partition) for q in group)
        if sorted(cast(list[int], owners)) != expected:
            raise InvalidReplyError(f"client {partition}: shares for {sorted(cast(list[int], owners))}, expected {expected}")
        return dict(zip(cast(list[int], owners), cast(list[bytes], shares), strict=True))

    revealed = stage("unmask", contributors, unmask_content, keys.QUERY_SECAGG_UNMASK, check_unmask)

    def secret_of(u: int) -> bytes:
        holders = around(u, revealed)[:threshold]  # t shares determine it; Lagrange over more only costs (O(k^2) per chunk)
        return combine_shares([revealed[q][u] for q in holders])

    own_seeds = [secret_of(p) for p in contributors]
    pairs = []
    for u in dropped:
        sk1 = secret_of(u)
        pairs += [(v, u, agree(sk1, public[v][0])) for v in around(u, accepted) if v != u]
    total = unmask(masked_total, own_seeds, pairs)
    vector = quantiser.dequantise_sum(total[:length], len(contributors))
    per_coordinate, l2 = quantiser.sum_error_bound(len(contributors), length)
    report.update(
        {
            "contributors": contributors,
            "dropped": dropped,
            "clipped": int(total[length]),
            "error_bound": {"per_coordinate": per_coordinate, "l2": l2},
        }
    )
    missing = [p for p in participants if p not in accepted]
    return SecureSum(torch.from_numpy(vector), accepted, missing, close("complete" if not missing else "partial"))


# ----- the IAU rounds under secure aggregation -----------------------------------------------------------------------
def _run(
    strategy: IAUFed, grid: Grid, messages: Sequence[Message], phase: str, parse: Callable[[int, Message], Any], scale: float
) -> SecureSum:
    """`secure_sum` under the strategy's policy (retries, timeout, the run's failure logs)."""
    secure = strategy.policy.secure
    assert secure is not None
    return secure_sum(
        grid,
        messages,
        directory=strategy.directory,
        phase=phase,
        parse=parse,
        length=strategy.layout.numel,
        settings=secure,
        scale=scale,
        retries=strategy.policy.retries,
        timeout=strategy.round_timeout,
        rejected_log=strategy.rejected,
        failures_log=strategy.failures,
    )


def secure_direction(strategy: IAUFed, grid: Grid, messages: Sequence[Message], version: str, report: UnlearningReport) -> torch.Tensor:
    """The fresh correction round through the secure sum: d is the sum itself; a client missing from it aborts."""

    def parse(partition: int, reply: Message) -> Message:
        stale_ok = strategy.allow_stale and bool(whole(metrics_of(reply).get(keys.CACHE_STALE, 0)))
        positive_count(reply)
        check_version(reply, version, stale_ok=stale_ok)
        return reply

    try:
        result = _run(strategy, grid, messages, "unlearn", parse, 1.0)
    except SecAggAbortedError as err:
        report.secure_aggregation.append(err.report)
        raise
    report.secure_aggregation.append(result.report)
    report.rounds += result.report["attempts"]
    report.retries += result.report["retries"]
    report.failures.extend(result.report["failures"])
    report.rejected.extend(result.report["rejected"])
    report.clients_asked = sorted(set(report.clients_asked) | set(result.report["participants"]))
    report.clients_answered = sorted(set(report.clients_answered) | set(result.accepted))
    strategy._note_cache_use(list(result.accepted.values()), report)
    if result.missing:
        report.missing_clients = sorted(set(report.missing_clients) | set(result.missing))
        raise SecAggAbortedError(
            f"client(s) {result.missing} are not in the secure sum after {strategy.policy.retries} retries: the "
            "direction needs every client (unlearn-policy=abort)",
            report=result.report,
        )
    report.direction_norm = float(result.total.norm())
    return result.total


def secure_caching(
    strategy: IAUFed, grid: Grid, messages: Sequence[Message], parse: Callable[[int, Message], Any]
) -> tuple[dict[int, Any], list[int], torch.Tensor, dict[str, Any]]:
    """The caching round's upload of G_tot through the secure sum: each client's G_k within B * max_k n_k."""
    scale = float(max(strategy.directory.num_train[p] for p in strategy.active_partitions()))
    result = _run(strategy, grid, messages, "caching", parse, scale)
    return result.accepted, result.missing, result.total, result.report


# ----- client side: one handler per stage ---------------------------------------------------------------------------
def _state(context: Context, session: str) -> ConfigRecord:
    state = context.state.config_records.get(keys.SECAGG_STATE)
    if state is None or state.get("session") != session:
        raise ValueError(f"secure aggregation: no state for session {session} on this node (it missed an earlier stage)")
    return state


def _config(msg: Message, stage: str) -> ConfigRecord:
    record = msg.content.config_records[keys.SECAGG]
    if record.get("stage") != stage:
        raise ValueError(f"secure aggregation: a {record.get('stage')!r} message reached the {stage!r} step")
    return record


def setup(runtime: ClientRuntime, msg: Message, context: Context) -> Message:
    """Stage 1: two fresh key pairs (sk1 for the pairwise masks, sk2 for encrypting shares); answer the public halves."""
    config = _config(msg, "setup")
    me = partition_of(context)
    participants = [whole(p) for p in cast(list[int], config["participants"])]
    if me not in participants:
        raise ValueError(f"secure aggregation: client {me} is not among the participants {participants}")
    sk1, pk1 = key_pair()
    sk2, pk2 = key_pair()
    context.state[keys.SECAGG_STATE] = ConfigRecord(
        {
            "session": str(config["session"]),
            "stage": "setup",
            "threshold": whole(config["threshold"]),
            "sk1": sk1,
            "pk1": pk1,
            "sk2": sk2,
            "pk2": pk2,
        }
    )
    return Message(RecordDict({keys.SECAGG: ConfigRecord({"pk1": pk1, "pk2": pk2})}), reply_to=msg)


def share_keys(runtime: ClientRuntime, msg: Message, context: Context) -> Message:
    """Stage 2: Shamir-share b (fresh) and sk1 among the advertised clients (t of them recover either); encrypt per recipient."""
    config = _config(msg, "share-keys")
    state = _state(context, str(config["session"]))
    me = partition_of(context)
    advertised = [whole(p) for p in cast(list[int], config["participants"])]
    pk1s, pk2s = cast(list[bytes], config["pk1"]), cast(list[bytes], config["pk2"])
    threshold = whole(state["threshold"])
    if len(advertised) < threshold:
        raise ValueError(f"secure aggregation: {len(advertised)} clients advertised keys, fewer than the threshold {threshold}")
    if me not in advertised or pk1s[advertised.index(me)] != state["pk1"] or pk2s[advertised.index(me)] != state["pk2"]:
        raise ValueError("secure aggregation: the server forwarded other public keys for this client than it advertised")
    if len(set(pk1s) | set(pk2s)) != 2 * len(advertised):
        raise ValueError("secure aggregation: two advertised public keys are equal")
    seed = os.urandom(32)
    seed_shares = create_shares(seed, threshold, len(advertised))
    key_shares = create_shares(cast(bytes, state["sk1"]), threshold, len(advertised))
    dsts, cts = [], []
    for index, other in enumerate(advertised):
        if other == me:
            continue
        key = base64.urlsafe_b64encode(agree(cast(bytes, state["sk2"]), pk2s[index]))
        dsts.append(other)
        cts.append(encrypt(key, share_keys_plaintext_concat(me, other, seed_shares[index], key_shares[index])))
    mine = advertised.index(me)
    state.update(
        {
            "stage": "share-keys",
            "seed": seed,
            "peers": advertised,
            "peer-pk1": list(pk1s),
            "peer-pk2": list(pk2s),
            "seed-share-owners": [me],
            "seed-shares": [seed_shares[mine]],
            "key-shares": [key_shares[mine]],
        }
    )
    context.state[keys.SECAGG_STATE] = state
    return Message(RecordDict({keys.SECAGG: ConfigRecord({"dsts": dsts, "ciphertexts": cts})}), reply_to=msg)


def _inner_handler(message_type: str) -> ClientHandler:
    from .client_app import evaluate
    from .methods.base import client_handlers

    handlers = {keys.EVALUATE: evaluate, **{f"query.{name}": h for name, h in client_handlers().items()}}
    if message_type not in handlers or message_type.startswith("query.secagg_"):
        raise ValueError(f"secure aggregation: no client step answers {message_type!r} inside the secure round")
    return handlers[message_type]


def collect(runtime: ClientRuntime, msg: Message, context: Context, inner: ClientHandler | None = None) -> Message:
    """Stage 3: keep the shares sent to this client, answer the inner query, and send its vector masked instead.

    `inner` answers the inner query (default: the registered step for its message type, as the plain round would).
    """
    config = _config(msg, "collect-masked")
    state = _state(context, str(config["session"]))
    me = partition_of(context)
    srcs = [whole(p) for p in cast(list[int], config["srcs"])]
    threshold = whole(state["threshold"])
    if len(srcs) + 1 < threshold:
        raise ValueError(f"secure aggregation: shares from {len(srcs)} other clients, the threshold is {threshold}")
    peers = [whole(p) for p in cast(list[int], state["peers"])]
    pk1s, pk2s = cast(list[bytes], state["peer-pk1"]), cast(list[bytes], state["peer-pk2"])
    owners, seed_shares, key_shares = [me], [cast(list[bytes], state["seed-shares"])[0]], [cast(list[bytes], state["key-shares"])[0]]
    for src, ciphertext in zip(srcs, cast(list[bytes], config["ciphertexts"]), strict=True):
        key = base64.urlsafe_b64encode(agree(cast(bytes, state["sk2"]), pk2s[peers.index(src)]))
        actual_src, dst, seed_share, key_share = share_keys_plaintext_separate(decrypt(key, ciphertext))
        if (actual_src, dst) != (src, me):
            raise ValueError(f"secure aggregation: a share from {actual_src} to {dst} was forwarded as from {src} to {me}")
        owners.append(src)
        seed_shares.append(seed_share)
        key_shares.append(key_share)
    answer = (inner or _inner_handler(str(config["inner_type"])))(runtime, msg, context)
    if answer.has_error() or keys.GRADIENT not in answer.content.array_records:
        return answer
    state = _state(context, str(config["session"]))  # the inner step may have written the node's state
    gradient = answer.content.array_records[keys.GRADIENT]
    named = {name: torch.from_numpy(np.asarray(gradient[name].numpy(), dtype=np.float64)) for name in runtime.layout.names}
    vector = runtime.layout.flatten(named).numpy()
    quantiser = Quantiser(real(config["bound"]), whole(config["levels"]))
    clipped_vector, clipped = quantiser.clip(vector)
    quantised = np.append(quantiser.quantise(clipped_vector), np.uint32(int(clipped)))  # the last slot counts clipped clients
    pairs = {src: agree(cast(bytes, state["sk1"]), pk1s[peers.index(src)]) for src in srcs}
    masked = masked_input(quantised, cast(bytes, state["seed"]), pairs, me)
    content = RecordDict({name: record for name, record in answer.content.items() if name != keys.GRADIENT})
    content[keys.SECAGG_MASKED] = ArrayRecord({MASKED_ARRAY: Array(masked)})
    content[keys.SECAGG] = ConfigRecord({"session": str(config["session"])})  # never whether it clipped: only the sum counts them
    state.update(
        {"stage": "collect-masked", "seed-share-owners": owners, "seed-shares": seed_shares, "key-shares": key_shares, "masked-with": srcs}
    )
    context.state[keys.SECAGG_STATE] = state
    return Message(content, reply_to=msg)


def unmask_shares(runtime: ClientRuntime, msg: Message, context: Context) -> Message:
    """Stage 4: shares of b for the clients whose masked vector arrived, of sk1 for those that dropped; never both of one client."""
    config = _config(msg, "unmask")
    state = _state(context, str(config["session"]))
    me = partition_of(context)
    active = [whole(p) for p in cast(list[int], config["active"])]
    dead = [whole(p) for p in cast(list[int], config.get("dead", []))]
    threshold = whole(state["threshold"])
    if set(active) & set(dead) or me not in active:
        raise ValueError(f"secure aggregation: active {active} and dropped {dead} overlap, or leave out this client {me}")
    if len(active) < threshold:
        raise ValueError(f"secure aggregation: {len(active)} clients active, fewer than the threshold {threshold}")
    revealed_seed = set(cast(list[int], state.get("revealed-seed", [])))
    revealed_key = set(cast(list[int], state.get("revealed-key", [])))
    if set(active) & revealed_key or set(dead) & revealed_seed:
        raise ValueError("secure aggregation: asked for both secrets of one client (its vector would be unmasked)")
    owners = [whole(p) for p in cast(list[int], state["seed-share-owners"])]
    missing = [p for p in (*active, *dead) if p not in owners]
    if missing:
        raise ValueError(f"secure aggregation: this client holds no shares of {missing}")
    seed_shares, key_shares = cast(list[bytes], state["seed-shares"]), cast(list[bytes], state["key-shares"])
    shares = [seed_shares[owners.index(p)] for p in active] + [key_shares[owners.index(p)] for p in dead]
    state.update({"stage": "unmask", "revealed-seed": sorted(revealed_seed | set(active))})
    if dead or revealed_key:
        state["revealed-key"] = sorted(revealed_key | set(dead))
    context.state[keys.SECAGG_STATE] = state
    return Message(RecordDict({keys.SECAGG: ConfigRecord({"owners": [*active, *dead], "shares": shares})}), reply_to=msg)


# Registered with IAU's handlers (strategies/methods/iau.py), so build_client_app and add_unlearning attach them.
HANDLERS = {
    keys.QUERY_SECAGG_SETUP.removeprefix("query."): setup,
    keys.QUERY_SECAGG_SHARE_KEYS.removeprefix("query."): share_keys,
    keys.QUERY_SECAGG_COLLECT.removeprefix("query."): collect,
    keys.QUERY_SECAGG_UNMASK.removeprefix("query."): unmask_shares,
}
