"""The coordinator's registry of live workers (pure)."""

from __future__ import annotations

from coordinator.registry import Registry
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
