"""The topology as a RabbitMQ definitions file, for a broker that loads it at boot (compose.yaml).

``python -m broker_config.definitions > broker_config/definitions.json`` writes the committed
file (the default namespace, the ``cpu`` capability); a test checks that the file equals what
this code generates. Services still declare what they need at start, and a declaration equal to
a definition is a no-op. A broker that imports definitions at boot creates no default user, so
the file brings one, with a password meant for a laptop.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import sys
from collections.abc import Sequence
from typing import Any

from broker_config.names import Names
from broker_config.permissions import BrokerUser, only
from broker_config.topology import Limits, Topology, topology

DEMO_USER = "fedq"
DEMO_PASSWORD = "fedq"  # a laptop's demo broker; anything shared gets its own user (rabbitmqctl)


def password_hash(password: str, salt: bytes = b"fedq") -> str:
    """RabbitMQ's ``rabbit_password_hashing_sha256``: base64(salt + sha256(salt + password)), with a
    4-byte salt (fixed here, so that the committed file is reproducible)."""
    if len(salt) != 4:
        raise ValueError("RabbitMQ password salts are 4 bytes")
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode()).digest()).decode()


def user_entry(name: str, password: str, tags: Sequence[str] = (), salt: bytes | None = None) -> dict[str, Any]:
    """A user of a definitions document (a random salt unless given)."""
    return {
        "name": name,
        "password_hash": password_hash(password, secrets.token_bytes(4) if salt is None else salt),
        "hashing_algorithm": "rabbit_password_hashing_sha256",
        "tags": list(tags),
    }


def access(users: Sequence[tuple[BrokerUser, str]], vhost: str = "/") -> dict[str, Any]:
    """The users, permissions and topic permissions of ``users`` (each with its password)."""
    return {
        "users": [user_entry(u.name, password) for u, password in users],
        "permissions": [
            {
                "user": u.name,
                "vhost": vhost,
                "configure": u.permission.configure,
                "write": u.permission.write,
                "read": u.permission.read,
            }
            for u, _ in users
        ],
        "topic_permissions": [
            {"user": u.name, "vhost": vhost, "exchange": t.exchange, "write": t.write, "read": t.read}
            for u, _ in users
            for t in u.topics
        ],
    }


def policies(names: Names, limits: Limits | None = None, vhost: str = "/") -> list[dict[str, Any]]:
    """Policies ``fedq broker apply`` sets: the dead-letter queue is bounded (a hostile party that
    gets many messages rejected must not fill the broker's disk: past the bound, the oldest dead
    letters go first)."""
    limits = limits or Limits()
    return [
        {
            "vhost": vhost,
            "name": f"{names.namespace}.dead-bound",
            "pattern": only(names.dead_queue),
            "apply-to": "queues",
            "priority": 0,
            "definition": {"max-length-bytes": limits.dead_max_bytes, "overflow": "drop-head"},
        }
    ]


def definitions(
    topo: Topology, vhost: str = "/", user: str = DEMO_USER, password: str = DEMO_PASSWORD
) -> dict[str, Any]:
    """A definitions document: one administrator, one vhost, and the topology's exchanges, queues
    and bindings, with the arguments fedq declares them with."""
    return {
        "users": [user_entry(user, password, ("administrator",), salt=b"fedq")],
        "vhosts": [{"name": vhost}],
        "permissions": [{"user": user, "vhost": vhost, "configure": ".*", "write": ".*", "read": ".*"}],
        "exchanges": [
            {
                "name": ex.name,
                "vhost": vhost,
                "type": ex.type,
                "durable": True,
                "auto_delete": False,
                "internal": False,
                "arguments": {},
            }
            for ex in topo.exchanges
        ],
        "queues": [
            {
                "name": q.name,
                "vhost": vhost,
                "durable": True,
                "auto_delete": False,
                "arguments": dict(q.arguments),
            }
            for q in topo.queues
        ],
        "bindings": [
            {
                "source": b.exchange,
                "vhost": vhost,
                "destination": b.queue,
                "destination_type": "queue",
                "routing_key": b.routing_key,
                "arguments": {},
            }
            for b in topo.bindings
        ],
    }


def render(doc: dict[str, Any]) -> str:
    return json.dumps(doc, indent=2) + "\n"


COMPOSE_JOB = "demo"  # the job compose.yaml runs (FEDQ_JOB)


def default_definitions() -> str:
    """What ``broker_config/definitions.json`` holds: the default namespace, with the queues of
    compose.yaml's job for the ``cpu`` capability (other jobs' queues appear as they start)."""
    return render(definitions(topology(Names(job=COMPOSE_JOB), ("cpu",))))


if __name__ == "__main__":
    sys.stdout.write(default_definitions())
