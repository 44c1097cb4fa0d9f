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
import sys
from typing import Any

from broker_config.names import Names
from broker_config.topology import Topology, topology

DEMO_USER = "fedq"
DEMO_PASSWORD = "fedq"  # a laptop's demo broker; anything shared gets its own user (rabbitmqctl)


def password_hash(password: str, salt: bytes = b"fedq") -> str:
    """RabbitMQ's ``rabbit_password_hashing_sha256``: base64(salt + sha256(salt + password)), with a
    4-byte salt (fixed here, so that the committed file is reproducible)."""
    if len(salt) != 4:
        raise ValueError("RabbitMQ password salts are 4 bytes")
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode()).digest()).decode()


def definitions(
    topo: Topology, vhost: str = "/", user: str = DEMO_USER, password: str = DEMO_PASSWORD
) -> dict[str, Any]:
    """A definitions document: one administrator, one vhost, and the topology's exchanges, queues
    and bindings, with the arguments fedq declares them with."""
    return {
        "users": [
            {
                "name": user,
                "password_hash": password_hash(password),
                "hashing_algorithm": "rabbit_password_hashing_sha256",
                "tags": ["administrator"],
            }
        ],
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
