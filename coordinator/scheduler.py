"""The coordinator's scheduler: a state machine with no I/O, like ``aggregator.core``.

The service tells it what happened (hellos, receipts, versions adopted, accuracies), always
with the time ``now``, and asks it what to do; the answers are decisions the service carries
out (publish tasks, open or close a round, stop). Its persistent part is a ``CoordinatorState``.

- **The fleet gate.** Nothing goes out until ``min_workers`` live workers have said hello, or
  ``min_workers_wait`` seconds after the job started; from then on, for good. A resumed job that
  had handed out work (``t0`` set) does not wait again.
- **Async top-ups.** ``concurrency`` tasks in flight per capability (default: one per live
  worker), each live worker counted once, under the first of its capabilities the job uses.
- **Sync rounds.** One task per live worker on one version. A round ends when a newer version
  is adopted; at its deadline it is closed, then waits ``round_grace`` seconds for that version.
- **In flight.** A task leaves when it is answered (a receipt), applied (a version) or expired.
- **Stop rules**, in order: target accuracy, max versions, max updates, max seconds (0: off).
  Max seconds counts from the job's first task (``t0``), as ``seconds_to_accuracy`` does, so the
  wait for the fleet is not part of it; before the first task, from the latest the gate opens
  (``min_workers_wait`` after the start), so a job no worker ever joins still ends.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

from coordinator.config import CoordinatorConfig, Mode
from coordinator.registry import Registry, WorkerChange
from coordinator.state import CoordinatorState, InFlight
from shared.messages import Hello


class StopReason(StrEnum):
    TARGET_ACCURACY = "target_accuracy"
    MAX_VERSIONS = "max_versions"
    MAX_UPDATES = "max_updates"
    MAX_SECONDS = "max_seconds"


class Gate(StrEnum):
    WAITING = "waiting"  # fewer than min_workers live workers, and the wait is not over
    READY = "ready"  # opened just now: min_workers live workers said hello
    WITHOUT_FLEET = "without_fleet"  # opened just now: the wait ran out
    OPEN = "open"  # opened before (or a resumed job that had handed out work)


@dataclass(frozen=True)
class Fleet:
    gate: Gate
    have: int  # live workers
    need: int  # min_workers
    waited: float  # seconds since the job started

    @property
    def open(self) -> bool:
        return self.gate is not Gate.WAITING


@dataclass(frozen=True)
class Publish:
    """Publish ``count`` tasks for ``capability``, each living ``ttl`` seconds (``round`` -1: async)."""

    capability: str
    count: int
    ttl: float
    round: int = -1


@dataclass(frozen=True)
class OpenRound:
    """Announce round ``round`` of ``size`` tasks on ``version``, then publish ``tasks``."""

    round: int
    version: int
    size: int
    deadline: float
    tasks: tuple[Publish, ...]


@dataclass(frozen=True)
class CloseRound:
    """The round's deadline passed without a new version: tell the aggregator to fold what it has."""

    round: int
    version: int
    size: int
    deadline: float


@dataclass(frozen=True)
class Swept:
    tasks: int  # in-flight tasks past their deadline, forgotten
    workers: tuple[str, ...]  # workers not heard from within worker_timeout, forgotten


@dataclass
class _Round:
    number: int
    version: int
    size: int
    deadline: float
    grace_until: float | None = None  # set when closed


class Scheduler:
    def __init__(self, config: CoordinatorConfig, state: CoordinatorState, *, resumed: bool = False) -> None:
        self.config = config
        self.state = state
        self.resumed = resumed
        self.registry = Registry(config.worker_timeout)
        self.registry.restore(state.workers, state.orgs)
        self.updates_total = 0
        self._round: _Round | None = None

    @classmethod
    def begin(cls, config: CoordinatorConfig, saved: CoordinatorState | None, now: float) -> Scheduler:
        """A new job, or the interrupted one ``saved`` (the last ``coordinator.json``) describes."""
        if saved is not None and saved.resumable(config.job_id):
            return cls(config, saved.resumed(config.mode.value, config.min_workers, now), resumed=True)
        fresh = CoordinatorState(config.job_id, config.mode.value, now, config.min_workers)
        return cls(config, fresh)

    @property
    def version(self) -> int:
        """The latest version adopted (-1 before the first)."""
        v = self.state.latest_version
        return -1 if v is None else v

    @property
    def in_flight(self) -> dict[str, InFlight]:
        return self.state.in_flight

    # -- events -----------------------------------------------------------------------------
    def hello(self, hello: Hello, signer: str, now: float) -> WorkerChange:
        return self.registry.observe(hello, signer, now)

    def done(self, task_ids: Iterable[str]) -> int:
        """Tasks answered (a receipt) or applied (a version) leave the in-flight set; how many did."""
        return sum(self.state.in_flight.pop(tid, None) is not None for tid in task_ids)

    def adopt(self, version: int, updates_total: int) -> bool:
        """A stored version (checked by the service) becomes the latest; ``False`` if it is not newer."""
        if version <= self.version:
            return False
        self.state.latest_version = version
        self.updates_total = max(self.updates_total, updates_total)
        return True

    def evaluated(self, accuracy: float) -> bool:
        """A version's accuracy on the test set; whether it reaches the target (later ones do not count)."""
        self.state.last_accuracy = accuracy
        self.state.best_accuracy = max(self.state.best_accuracy, accuracy)
        return self.config.target_accuracy > 0 and accuracy >= self.config.target_accuracy

    def issued(
        self, task_id: str, capability: str, version: int, deadline: float, size: int, now: float
    ) -> None:
        """A task of ``size`` bytes on ``version`` is being published."""
        self.state.in_flight[task_id] = InFlight(capability, deadline, version)
        if self.state.t0 is None:
            self.state.t0 = now
        self.state.tasks_issued += 1
        self.state.bytes_down += size

    def sweep(self, now: float) -> Swept:
        """Forget tasks past their deadline and workers gone quiet."""
        expired = [tid for tid, f in self.state.in_flight.items() if f.deadline < now]
        for tid in expired:
            del self.state.in_flight[tid]
        return Swept(len(expired), tuple(self.registry.expire(now)))

    # -- decisions --------------------------------------------------------------------------
    def fleet(self, now: float) -> Fleet:
        """May tasks go out? (the gate in the module docstring)"""
        s = self.state
        have, need, waited = self.registry.live_count(now), self.config.min_workers, now - s.started
        if s.fleet_ready or s.t0 is not None:
            gate = Gate.OPEN
        elif have >= need:
            gate = Gate.READY
        elif waited >= self.config.min_workers_wait:
            gate = Gate.WITHOUT_FLEET
        else:
            gate = Gate.WAITING
        s.fleet_ready = gate is not Gate.WAITING
        return Fleet(gate, have, need, waited)

    def top_up(self, now: float) -> tuple[Publish, ...]:
        """Async mode, fleet open: what tasks bring each capability back to its concurrency."""
        c = self.config
        if c.mode is not Mode.ASYNC or self.state.stop_reason is not None or not self.state.fleet_ready:
            return ()
        out = []
        for cap, live in self.registry.primary_counts(c.capabilities, now).items():
            if live == 0:
                continue
            missing = (c.concurrency or live) - sum(
                1 for f in self.state.in_flight.values() if f.capability == cap
            )
            if missing > 0:
                out.append(Publish(cap, missing, c.task_ttl))
        return tuple(out)

    def round_step(self, now: float) -> OpenRound | CloseRound | None:
        """Sync mode: close the current round at its deadline; once it is over (a newer version,
        or the grace after closing ran out), open the next one if the fleet is open."""
        c = self.config
        if c.mode is not Mode.SYNC or self.stop(now) is not None:
            return None  # checked here too: the version that ends a round may be the job's last
        r = self._round
        if r is not None:
            if self.version == r.version:
                if r.grace_until is None:
                    if now < r.deadline:
                        return None
                    r.grace_until = now + c.round_grace
                    return CloseRound(r.number, r.version, r.size, r.deadline)
                if now < r.grace_until:
                    return None
            self._round = None
            self.state.in_flight.clear()  # the round is over: its late tasks no longer count
        if not self.state.fleet_ready:
            return None
        counts = self.registry.primary_counts(c.capabilities, now)
        size = sum(counts.values())
        if size == 0:
            return None
        self.state.round += 1
        r = self._round = _Round(self.state.round, self.version, size, now + c.round_timeout)
        ttl = c.round_timeout or c.task_ttl
        tasks = tuple(Publish(cap, n, ttl, r.number) for cap, n in counts.items() if n > 0)
        return OpenRound(r.number, r.version, size, r.deadline, tasks)

    @property
    def round_closed(self) -> bool:
        """A round is closed and waits for its version."""
        return self._round is not None and self._round.grace_until is not None

    def stop(self, now: float) -> StopReason | None:
        """The first stop rule that holds (and holds from then on); ``None`` to go on."""
        if self.state.stop_reason is not None:
            return StopReason(self.state.stop_reason)
        c, s = self.config, self.state
        reason = None
        if s.last_accuracy is not None and c.target_accuracy > 0 and s.last_accuracy >= c.target_accuracy:
            reason = StopReason.TARGET_ACCURACY
        elif c.max_versions and self.version >= c.max_versions:
            reason = StopReason.MAX_VERSIONS
        elif c.max_updates and self.updates_total >= c.max_updates:
            reason = StopReason.MAX_UPDATES
        elif c.max_seconds and now - self.clock_start >= c.max_seconds:
            reason = StopReason.MAX_SECONDS
        if reason is not None:
            s.stop_reason = reason.value
        return reason

    @property
    def clock_start(self) -> float:
        """Where ``max_seconds`` counts from: the first task, or until there is one, the end of
        the fleet wait."""
        s = self.state
        return s.t0 if s.t0 is not None else s.started + self.config.min_workers_wait

    def snapshot(self, now: float) -> CoordinatorState:
        """The state to write, with the reports filled in as of ``now``."""
        return dataclasses.replace(
            self.state,
            stopped=now,
            workers_live=self.registry.live_count(now),
            workers_seen=sorted(self.registry.workers),
            workers=self.registry.counts,
            orgs=dict(self.registry.orgs),
        )
