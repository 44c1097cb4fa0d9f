"""Who may do what on the broker: a user per role, its permissions derived from the same names the
topology declares (no I/O here; ``fedq broker apply`` writes them).

RabbitMQ grants each user three regular expressions per vhost, matched against exchange and queue
names: *configure* (declare, delete), *write* (publish to an exchange, bind a queue) and *read*
(consume, get, purge; be the source of a binding). Passive declares need none of them, so every
role may still ask whether a queue exists and how deep it is.

| role        | configure               | write                          | read                                  |
|-------------|-------------------------|--------------------------------|---------------------------------------|
| coordinator | its inbox, its hello queue | tasks, results (rounds), dead, its queues (to bind) | its queues, models, workers (binding sources) |
| aggregator  | nothing                 | models (versions, receipts, verdicts), dead, results (partials) | the job's updates, shard, partials and edge inbox queues |
| worker      | nothing                 | results (updates), workers (hellos), dead | its capabilities' task queues |
| observer    | nothing                 | nothing                        | the update and model logs (streams)   |

Every role that consumes may write to the dead-letter exchange: a rejected message is set aside
with its reason by whoever rejects it. Reading a queue also lets a user purge it (RabbitMQ ties
both to *read*): a worker can empty its own capability's task queue, nothing else.

The broker also checks the AMQP ``user_id`` property against the connection's user, so a message
that carries one names its publisher's broker account; ``publisher_problem`` compares that account
with the worker id a signed update or hello speaks for.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

from broker_config.names import Names


class BrokerRole(StrEnum):
    COORDINATOR = "coordinator"
    AGGREGATOR = "aggregator"
    WORKER = "worker"
    OBSERVER = "observer"


@dataclass(frozen=True)
class Permission:
    """One user's three patterns on the vhost."""

    configure: str
    write: str
    read: str


NOTHING = "^$"


def only(*names: str, prefixes: tuple[str, ...] = ()) -> str:
    """A pattern matching exactly ``names`` (and names starting with ``prefixes``); ``^$`` for none."""
    parts = [re.escape(n) for n in names] + [re.escape(p) + ".*" for p in prefixes]
    return f"^({'|'.join(parts)})$" if parts else NOTHING


@dataclass(frozen=True)
class TopicPermission:
    """Routing keys a user may publish with on one topic exchange (RabbitMQ's topic authorisation):
    the namespace's exchanges are shared by its jobs, so an account of one job writes only its
    job's keys."""

    exchange: str
    write: str
    read: str = ".*"


@dataclass(frozen=True)
class BrokerUser:
    """A broker account of one role in one job (the observer's: of the namespace)."""

    name: str
    role: BrokerRole
    permission: Permission
    worker_id: str = ""
    topics: tuple[TopicPermission, ...] = ()


def user_name(names: Names, role: BrokerRole, worker_id: str = "") -> str:
    """``<ns>.<job>.coordinator``, ``<ns>.<job>.aggregator``, ``<ns>.<job>.worker.<id>``, ``<ns>.observer``."""
    if role is BrokerRole.OBSERVER:
        return f"{names.namespace}.observer"
    if role is BrokerRole.WORKER:
        if not worker_id:
            raise ValueError("a worker's broker user needs its worker id")
        return f"{names.namespace}.{names.job}.worker.{worker_id}"
    return f"{names.namespace}.{names.job}.{role}"


def permission(names: Names, role: BrokerRole, capabilities: tuple[str, ...] = ("cpu",)) -> Permission:
    """What ``role`` may configure, write and read in the job ``names`` names."""
    n = names
    if role is BrokerRole.COORDINATOR:
        own, listen = (n.coordinator_queue,), (n.listener_prefix,)  # its inbox, its hello queue
        return Permission(
            configure=only(*own, prefixes=listen),
            write=only(n.tasks_exchange, n.results_exchange, n.dead_exchange, *own, prefixes=listen),
            read=only(*own, n.models_exchange, n.workers_exchange, prefixes=listen),
        )
    if role is BrokerRole.AGGREGATOR:  # a single aggregator, an edge (partials to results) or the root
        inputs = only(n.updates_queue, n.partials_queue, prefixes=(n.shard_queue(0)[:-1], n.edge_inbox(0)[:-1]))
        return Permission(NOTHING, only(n.models_exchange, n.dead_exchange, n.results_exchange), inputs)
    if role is BrokerRole.WORKER:
        return Permission(
            NOTHING,
            only(n.results_exchange, n.workers_exchange, n.dead_exchange),
            only(*(n.task_queue(c) for c in capabilities)),
        )
    return Permission(NOTHING, NOTHING, only(n.update_log, n.model_log))


def topic_permissions(names: Names, role: BrokerRole) -> tuple[TopicPermission, ...]:
    """The routing keys of ``names``'s job that ``role`` publishes with on the topic exchanges."""
    job = re.escape(names.job)
    if role is BrokerRole.COORDINATOR:
        return (TopicPermission(names.results_exchange, f"^{job}$"),)
    if role is BrokerRole.AGGREGATOR:
        return (
            TopicPermission(names.models_exchange, f"^((model|receipt)\\.{job}|verdict\\.{job}\\.[0-9]+)$"),
            TopicPermission(names.results_exchange, f"^{job}\\.partials$"),
        )
    if role is BrokerRole.WORKER:
        return (
            TopicPermission(names.results_exchange, f"^{job}(\\.shard\\.[0-9]+)?$"),
            TopicPermission(names.workers_exchange, f"^{job}$"),
        )
    return ()


def job_users(
    names: Names, capabilities: tuple[str, ...], workers: Mapping[str, tuple[str, ...]]
) -> tuple[BrokerUser, ...]:
    """The job's accounts: coordinator, aggregator, the namespace's observer and one per worker in
    ``workers`` (worker id -> the capabilities whose task queues it may read; empty: all the job's)."""
    roles = (BrokerRole.COORDINATOR, BrokerRole.AGGREGATOR, BrokerRole.OBSERVER)
    users = [
        BrokerUser(
            user_name(names, r), r, permission(names, r, capabilities), topics=topic_permissions(names, r)
        )
        for r in roles
    ]
    worker = BrokerRole.WORKER
    for wid, own in workers.items():
        users.append(
            BrokerUser(
                user_name(names, worker, wid),
                worker,
                permission(names, worker, own or capabilities),
                wid,
                topic_permissions(names, worker),
            )
        )
    return tuple(users)


def publisher_problem(names: Names, user_id: str | None, worker_id: str, required: bool) -> str:
    """Why a worker's message (an update or a hello, signed for ``worker_id``) may not have come from
    the broker account ``user_id`` the broker vouched for ('' when it may).

    An account of the namespace must be that worker's own account in this job: another worker's,
    another job's, or another role's never speaks for a worker. An account outside the namespace
    is an operator's (an administrator, e.g. requeueing a dead letter) and passes. A message with no
    ``user_id`` passes unless ``required`` (a worker that leaves it out cannot be told apart)."""
    if not user_id:
        return "the message names no broker user (user_id), and this service requires one" if required else ""
    if not user_id.startswith(f"{names.namespace}."):
        return ""
    if worker_id and user_id == user_name(names, BrokerRole.WORKER, worker_id):
        return ""
    return f"broker user {user_id!r} is not worker {worker_id!r}'s account in job {names.job}"
