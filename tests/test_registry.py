"""The coordinator's registry of live workers (pure)."""

from __future__ import annotations

from dataclasses import replace

from coordinator.registry import TASK_COUNT_MAX, Registry
from tests.support.messages import a_hello


def test_join_heartbeat_leave_and_timeout() -> None:
    r = Registry(timeout=10)
    assert r.observe(a_hello("a", ("cpu",)), "fp", now=0) == "joined"
    assert r.observe(a_hello("a", ("cpu",)), "fp", now=5) == "seen"
    assert r.observe(a_hello("b", ("cpu", "gpu")), "fp", now=5) == "joined"
    assert {w.worker_id for w in r.live("cpu", now=6)} == {"a", "b"}
    assert [w.worker_id for w in r.live("gpu", now=6)] == ["b"]
    assert r.observe(a_hello("b", ("cpu",), "down"), "fp", now=7) == "left"
    assert [w.worker_id for w in r.live("cpu", now=8)] == ["a"]
    assert r.expire(now=16) == ["a"]
    assert r.live("cpu", now=16) == []
    assert r.observe(a_hello("a", ("cpu",)), "fp", now=17) == "joined"


def test_primary_counts_count_each_worker_once() -> None:
    r = Registry(timeout=10)
    r.observe(a_hello("a", ("cpu",)), "fp", now=0)
    r.observe(a_hello("b", ("gpu", "cpu")), "fp", now=0)
    r.observe(a_hello("c", ("lowmem",)), "fp", now=0)
    assert r.primary_counts(("cpu", "gpu"), now=1) == {"cpu": 1, "gpu": 1}
    assert r.primary_counts(("cpu",), now=1) == {"cpu": 2}
    assert r.primary_counts(("cpu",), now=20) == {"cpu": 0}


def test_hello_task_counts_are_clamped_where_received() -> None:
    r = Registry(timeout=10)
    r.observe(a_hello("a", tasks_received=3, tasks_expired=-7, tasks_redelivered=10**30), "fp", now=0)
    assert r.counts["a"] == {"received": 3, "completed": 0, "expired": 0, "redelivered": TASK_COUNT_MAX}
    for n in range(3):  # "restarts" that each claim the most: the total stays within the bound
        r.observe(a_hello("a", tasks_redelivered=0), "fp", now=n + 1)
        r.observe(a_hello("a", tasks_redelivered=TASK_COUNT_MAX), "fp", now=n + 1)
    assert 0 <= r.counts["a"]["redelivered"] <= TASK_COUNT_MAX and r.counts["a"]["expired"] == 0


def test_an_org_that_fails_the_check_is_dropped_where_received() -> None:
    r = Registry(timeout=10)
    r.observe(a_hello("a"), "fp", now=0)
    r.observe(replace(a_hello("a"), org=" hosp-a "), "fp", now=1)
    assert r.orgs == {"a": "hosp-a"}
    for bad in ("x" * 65, "a\nb", "\x1b[2J"):
        assert r.observe(replace(a_hello("a"), org=bad), "fp", now=2) == "seen"
    r.observe(replace(a_hello("b"), org="y" * 10_000), "fp", now=2)
    assert r.orgs == {"a": "hosp-a"} and "b" in r.counts and [w.worker_id for w in r.live("cpu", now=3)] == ["a", "b"]


def test_a_saved_state_is_taken_back_with_the_checks_a_hello_gets() -> None:
    """coordinator.json written before the checks (or by hand) may hold any figure or label."""
    registry = Registry(10.0)
    registry.restore(
        {"w1": {"expired": -5, "redelivered": 10**30, "completed": 3}},
        {"w1": "hospital-3", "w2": "bank\x1b[2J", "w3": "x" * 10_000},
    )
    assert registry.counts == {"w1": {"expired": 0, "redelivered": TASK_COUNT_MAX, "completed": 3}}
    assert registry.orgs == {"w1": "hospital-3"}
