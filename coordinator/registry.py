"""Live workers per capability, from the workers' own hellos and heartbeats. No I/O."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from shared.messages import Hello
from shared.org import received_org

TASK_COUNT_MAX = 10**9  # the most tasks a hello's count (or a worker's total) may say


def _task_count(n: object) -> int:
    """A task count from the network: an int from 0 to ``TASK_COUNT_MAX`` (anything else is 0)."""
    if isinstance(n, bool) or not isinstance(n, int):
        return 0
    return min(max(n, 0), TASK_COUNT_MAX)


class WorkerChange(StrEnum):
    """What a hello changed: a worker joined (or came back), left, or was only seen again."""

    JOINED = "joined"
    SEEN = "seen"
    LEFT = "left"


@dataclass
class WorkerInfo:
    worker_id: str
    capabilities: tuple[str, ...]
    key_fingerprint: str
    last_seen: float
    first_seen: float
    counts: dict[str, int] = field(default_factory=dict)


class Registry:
    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.workers: dict[str, WorkerInfo] = {}
        self.counts: dict[str, dict[str, int]] = {}  # task counts per worker over all its restarts
        self.orgs: dict[str, str] = {}  # the organisation each worker says it belongs to (--org)
        self._base: dict[str, dict[str, int]] = {}
        self._last: dict[str, dict[str, int]] = {}

    def restore(self, counts: dict[str, dict[str, int]], orgs: dict[str, str]) -> None:
        """Take back what a saved state held, with the checks a hello's figures get: counts within
        bounds, orgs that pass --org's check (a state file written before the checks may hold others)."""
        for wid, c in counts.items():
            self.counts[wid] = {k: _task_count(v) for k, v in c.items()}
        self.orgs.update({wid: org for wid, raw in orgs.items() if (org := received_org(raw))})

    def observe(self, hello: Hello, signer: str, now: float) -> WorkerChange:
        """Record a hello; what it changed."""
        self._count(hello)
        if org := received_org(hello.org):  # self-declared: kept as the worker's claim, for fedq cost
            self.orgs[hello.worker_id] = org
        if hello.state == "down":
            return WorkerChange.LEFT if self.workers.pop(hello.worker_id, None) else WorkerChange.SEEN
        info = self.workers.get(hello.worker_id)
        if info is None or info.last_seen < now - self.timeout:
            self.workers[hello.worker_id] = WorkerInfo(hello.worker_id, hello.capabilities, signer, now, now)
            return WorkerChange.JOINED
        info.last_seen = now
        info.capabilities = hello.capabilities
        info.key_fingerprint = signer
        return WorkerChange.SEEN

    def _count(self, hello: Hello) -> None:
        now = {
            "received": _task_count(hello.tasks_received),
            "completed": _task_count(hello.tasks_completed),
            "expired": _task_count(hello.tasks_expired),
            "redelivered": _task_count(hello.tasks_redelivered),
        }
        wid = hello.worker_id
        last = self._last.get(wid, {})
        base = self._base.setdefault(wid, dict.fromkeys(now, 0))
        if any(now[k] < last.get(k, 0) for k in now):  # the worker restarted: its counters did too
            for k in now:
                base[k] = _task_count(base[k] + last.get(k, 0))
        self._last[wid] = now
        self.counts[wid] = {k: _task_count(base[k] + now[k]) for k in now}

    def expire(self, now: float) -> list[str]:
        gone = [w for w, info in self.workers.items() if info.last_seen < now - self.timeout]
        for w in gone:
            del self.workers[w]
        return gone

    def live_count(self, now: float) -> int:
        """Live workers, whatever their capabilities."""
        return sum(1 for info in self.workers.values() if info.last_seen >= now - self.timeout)

    def live(self, capability: str, now: float) -> list[WorkerInfo]:
        return [
            info
            for info in self.workers.values()
            if capability in info.capabilities and info.last_seen >= now - self.timeout
        ]

    def primary_counts(self, capabilities: tuple[str, ...], now: float) -> dict[str, int]:
        """Each live worker counted once, under the first of its capabilities the job uses."""
        counts = dict.fromkeys(capabilities, 0)
        for info in self.workers.values():
            if info.last_seen < now - self.timeout:
                continue
            for cap in info.capabilities:
                if cap in counts:
                    counts[cap] += 1
                    break
        return counts
