"""The broker topology as data: what to declare, with which arguments.

Retention and limits are parameters with laptop-sized defaults; ``declare``
turns a ``Topology`` into broker calls.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from broker_config.names import Names


@dataclass(frozen=True)
class Exchange:
    name: str
    type: str  # direct | fanout | topic


@dataclass(frozen=True)
class Queue:
    name: str
    arguments: dict[str, object] = field(default_factory=dict)

    @property
    def is_stream(self) -> bool:
        return self.arguments.get("x-queue-type") == "stream"


@dataclass(frozen=True)
class Binding:
    queue: str
    exchange: str
    routing_key: str = ""


@dataclass(frozen=True)
class Limits:
    """Arguments users may want to change; defaults suit a laptop."""

    task_delivery_limit: int = 5
    update_delivery_limit: int = 10
    update_log_max_age: str = "7D"
    update_log_max_bytes: int = 2 * 1024**3
    model_log_max_age: str = "30D"
    model_log_max_bytes: int = 1024**3
    dead_max_bytes: int = 1024**3  # the dead-letter queue's bound (a policy: fedq broker apply)


@dataclass(frozen=True)
class Topology:
    exchanges: tuple[Exchange, ...]
    queues: tuple[Queue, ...]
    bindings: tuple[Binding, ...]


def task_queue(names: Names, capability: str, limits: Limits = Limits()) -> Queue:
    return Queue(
        names.task_queue(capability),
        {
            "x-queue-type": "quorum",
            "x-delivery-limit": limits.task_delivery_limit,
            "x-dead-letter-exchange": names.dead_exchange,
        },
    )


def exchanges(names: Names) -> tuple[Exchange, ...]:
    """The namespace's exchanges, shared by its jobs (routing keys start with the job id)."""
    return (
        Exchange(names.tasks_exchange, "direct"),
        Exchange(names.results_exchange, "topic"),
        Exchange(names.models_exchange, "topic"),
        Exchange(names.workers_exchange, "topic"),
        Exchange(names.dead_exchange, "fanout"),
    )


def namespace_topology(names: Names, limits: Limits = Limits()) -> Topology:
    """What every job of the namespace shares: exchanges, the update and model logs, the dead queue."""
    queues = (
        Queue(
            names.update_log,
            {
                "x-queue-type": "stream",
                "x-max-age": limits.update_log_max_age,
                "x-max-length-bytes": limits.update_log_max_bytes,
            },
        ),
        Queue(
            names.model_log,
            {
                "x-queue-type": "stream",
                "x-max-age": limits.model_log_max_age,
                "x-max-length-bytes": limits.model_log_max_bytes,
            },
        ),
        Queue(names.dead_queue, {"x-queue-type": "quorum"}),
    )
    bindings = (
        Binding(names.update_log, names.results_exchange, "#"),
        Binding(names.model_log, names.models_exchange, "model.*"),
        Binding(names.dead_queue, names.dead_exchange),
    )
    return Topology(exchanges(names), queues, bindings)


def topology(
    names: Names, capabilities: tuple[str, ...] = ("cpu",), limits: Limits = Limits(), shards: int = 0
) -> Topology:
    """The namespace's shared part plus the job's own queues: a task queue per capability and
    the updates queue (single active consumer: a standby aggregator takes over). With ``shards``
    (edge aggregation), also each shard's updates queue and its edge's inbox, and the root's
    queue of partial aggregates."""
    shared = namespace_topology(names, limits)
    inputs = [(names.updates_queue, names.results_exchange, names.results_key)]
    inputs += [(names.shard_queue(i), names.results_exchange, names.update_key(i)) for i in range(shards)]
    if shards:
        inputs.append((names.partials_queue, names.results_exchange, names.partials_key))
    queues = [_single_consumer(name, names, limits) for name, _, _ in inputs]
    bindings = [Binding(q, ex, key) for q, ex, key in inputs]
    for i in range(shards):
        queues.append(Queue(names.edge_inbox(i), {"x-queue-type": "quorum", "x-single-active-consumer": True}))
        bindings.append(Binding(names.edge_inbox(i), names.models_exchange, Names.verdict_key(names.job, i)))
        bindings.append(Binding(names.edge_inbox(i), names.models_exchange, Names.model_key(names.job)))
    job = capability_topology(names, capabilities, limits)
    return Topology(
        shared.exchanges,
        (*job.queues, *queues, *shared.queues),
        (*job.bindings, *bindings, *shared.bindings),
    )


def _single_consumer(name: str, names: Names, limits: Limits) -> Queue:
    """An aggregator's input: one active consumer at a time (a standby takes over), a delivery
    limit, rejected messages to the dead-letter exchange."""
    return Queue(
        name,
        {
            "x-queue-type": "quorum",
            "x-single-active-consumer": True,
            "x-delivery-limit": limits.update_delivery_limit,
            "x-dead-letter-exchange": names.dead_exchange,
        },
    )


def coordinator_inbox(names: Names, idle_expiry_ms: int = 3_600_000) -> Queue:
    """A quorum queue per job, deleted by the broker after an hour without a consumer."""
    return Queue(names.coordinator_queue, {"x-queue-type": "quorum", "x-expires": idle_expiry_ms})


def capability_topology(names: Names, capabilities: tuple[str, ...], limits: Limits = Limits()) -> Topology:
    """The part a worker needs for its job's capabilities (a new capability's queue appears on
    join), with the exchanges its tasks come from and its hellos go to."""
    return Topology(
        exchanges(names),
        tuple(task_queue(names, cap, limits) for cap in capabilities),
        tuple(Binding(names.task_queue(cap), names.tasks_exchange, names.task_key(cap)) for cap in capabilities),
    )
