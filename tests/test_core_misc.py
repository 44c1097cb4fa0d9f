"""The rest of the pure core: data partitions, settings, broker names and topology, flat models."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import msgpack
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from broker_config.names import Names, check_token
from broker_config.topology import Limits, capability_topology, topology
from shared.app import PartitionSpec
from shared.errors import ConfigError, StoreError
from shared.partition import dirichlet_partition, load_partition_file, parse_partition
from shared.settings import Settings, env_name, known_env_names, split_capabilities
from shared.tensors import FlatModel, ModelSpec, TensorSpec
from tests.support.tiny import LinearApp

# ---------------------------------------------------------------- partitions

LABELS = np.repeat(np.arange(10), 100)  # 1000 samples, 10 classes of 100


def test_dirichlet_partition_equal_disjoint_valid() -> None:
    parts = dirichlet_partition(LABELS, 7, 0.5, seed=42)
    assert len(parts) == 7
    assert all(len(p) == 1000 // 7 for p in parts)  # 142 each, the remainder is unused
    flat = [i for p in parts for i in p]
    assert len(flat) == len(set(flat))  # disjoint
    assert all(0 <= i < 1000 for i in flat)
    assert all(p == sorted(p) for p in parts)
    assert all(type(i) is int for i in flat)


def test_dirichlet_partition_is_deterministic_per_seed() -> None:
    assert dirichlet_partition(LABELS, 5, 0.3, seed=1) == dirichlet_partition(LABELS, 5, 0.3, seed=1)
    assert dirichlet_partition(LABELS, 5, 0.3, seed=1) != dirichlet_partition(LABELS, 5, 0.3, seed=2)


def test_dirichlet_alpha_controls_label_skew() -> None:
    def mean_majority_share(alpha: float) -> float:
        # 20 shares of 50: a share may come from a single class of 100
        parts = dirichlet_partition(LABELS, 20, alpha, seed=3)
        return float(np.mean([np.bincount(LABELS[p], minlength=10).max() / len(p) for p in parts]))

    skewed, iid = mean_majority_share(0.05), mean_majority_share(1000.0)
    assert skewed > 0.6  # most of a share comes from one class
    assert iid < 0.3  # about 1/10 of each class (the max of 10 counts of ~5 is noisy)
    assert skewed > 2 * iid


def test_dirichlet_partition_edge_cases() -> None:
    labels = np.array([3, 7, 7, 9, 9, 9])  # non-contiguous class ids
    parts = dirichlet_partition(labels, 6, 1.0, seed=0)
    assert sorted(i for p in parts for i in p) == list(range(6))  # one sample each, all used
    assert dirichlet_partition(labels, 1, 1.0, seed=0) == [list(range(6))]


@pytest.mark.parametrize(("count", "alpha"), [(0, 0.5), (-1, 0.5), (1001, 0.5), (3, 0.0), (3, -1.0)])
def test_dirichlet_partition_rejects(count: int, alpha: float) -> None:
    with pytest.raises(ConfigError):
        dirichlet_partition(LABELS, count, alpha, seed=0)


@pytest.mark.parametrize(("text", "expected"), [("3/10", (3, 10)), ("0/1", (0, 1)), (" 2 / 5 ", (2, 5))])
def test_parse_partition(text: str, expected: tuple[int, int]) -> None:
    assert parse_partition(text) == expected


@pytest.mark.parametrize(
    "text", ["", "3", "10/10", "11/10", "1/0", "0/0", "-1/3", "a/b", "1/2/3", "1.5/3", "1 of 3"]
)
def test_parse_partition_rejects(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_partition(text)


def test_load_partition_file(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    path.write_text(json.dumps([[0, 2], [1, 3, 4]]))
    assert load_partition_file(path, 2, 5) == [[0, 2], [1, 3, 4]]


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (None, "cannot read partition file"),  # missing file
        ("not json", "cannot read partition file"),
        ('{"0": [1]}', "must hold a JSON list of index lists"),
        ("[1, 2]", "must hold a JSON list of index lists"),
        ("[[0], [1], [2]]", "has 3 partitions, the job has 2 workers"),
        ("[[0]]", "has 1 partitions, the job has 2 workers"),
        ("[[0], []]", "partition 1 is empty"),
        ("[[0], [5]]", "partition 1 holds index 5, outside the 5 samples (0..4)"),
        ("[[0], [-1]]", "partition 1 holds the negative index -1"),
        ("[[0], [1.5]]", "partition 1 holds 1.5, not an integer index"),
        ('[[0], ["1"]]', "partition 1 holds '1', not an integer index"),
        ("[[0], [null]]", "partition 1 holds None, not an integer index"),
        ("[[0], [true]]", "partition 1 holds True, not an integer index"),
        ("[[0, 2], [1, 2]]", "index 2 is in partitions 0 and 1"),  # overlapping
        ("[[0, 1], [4, 3, 0]]", "index 0 is in partitions 0 and 1"),
        ("[[0, 3, 3], [1]]", "partition 0 holds index 3 more than once"),
    ],
    ids=repr,
)
def test_load_partition_file_names_the_file_and_the_problem(
    tmp_path: Path, content: str | None, problem: str
) -> None:
    path = tmp_path / "p.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError) as caught:
        load_partition_file(path, 2, 5)
    assert str(path) in str(caught.value) and problem in str(caught.value)


def test_a_worker_beyond_the_partition_files_lists_is_refused(tmp_path: Path) -> None:
    """The worker's own list must be in the file: an index past its lists is a ConfigError, not an
    IndexError (nor, for a negative one, another worker's list)."""
    path = tmp_path / "p.json"
    path.write_text(json.dumps([[0, 2], [1, 3, 4]]))
    assert load_partition_file(path, 2, 5, 1) == [[0, 2], [1, 3, 4]]
    app = LinearApp()
    assert len(app.load_partition(PartitionSpec(1, 2, file=str(path)))[1]) == 3
    for index in (2, -1):
        with pytest.raises(ConfigError, match=r"has 2 partitions: there is no partition") as caught:
            app.load_partition(PartitionSpec(index, 2, file=str(path)))
        assert str(path) in str(caught.value)


# ---------------------------------------------------------------- settings


def test_settings_defaults_without_env() -> None:
    s = Settings.from_env({})
    assert s == Settings()
    assert s.amqp_url.startswith("amqp://") and s.buffer == 10 and s.max_norm is None


def test_settings_from_env_parses_types() -> None:
    env = {
        "FEDQ_AMQP_URL": "amqp://u:p@host:5673/vh",
        "FEDQ_BUFFER": "7",
        "FEDQ_ALPHA": "0.25",
        "FEDQ_LOG_JSON": "yes",
        "FEDQ_MAX_NORM": "2.5",
        "FEDQ_MODE": "sync",
        "FEDQ_UNRELATED": "ignored",
        "fedq_buffer": "99",  # names are case-sensitive
    }
    s = Settings.from_env(env)
    assert s.amqp_url == "amqp://u:p@host:5673/vh"
    assert s.buffer == 7 and type(s.buffer) is int
    assert s.alpha == 0.25
    assert s.log_json is True
    assert s.max_norm == 2.5
    assert s.mode == "sync"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("1", True),
        ("true", True),
        ("ON", True),
        ("0", False),
        ("no", False),
        (" off ", False),
        ("auto", None),
    ],
)
def test_settings_bool_and_optional(value: str, expected: bool | None) -> None:
    assert Settings.from_env({"FEDQ_LOG_JSON": value}).log_json is expected


@pytest.mark.parametrize("value", ["", "none", "None", "auto"])
def test_settings_optional_float_none(value: str) -> None:
    assert Settings.from_env({"FEDQ_MAX_NORM": value}).max_norm is None


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("FEDQ_BUFFER", "ten"),
        ("FEDQ_BUFFER", "1.5"),
        ("FEDQ_BUFFER", ""),
        ("FEDQ_BLOCK", "1e3"),
        ("FEDQ_ALPHA", "half"),
        ("FEDQ_LOG_JSON", "maybe"),
        ("FEDQ_MAX_NORM", "big"),
    ],
)
def test_settings_bad_values_are_config_errors(key: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({key: value})
    assert key in str(info.value)


def test_settings_overrides_win_over_env() -> None:
    env = {"FEDQ_BUFFER": "7", "FEDQ_JOB": "from-env"}
    s = Settings.from_env(env, buffer=3, job=None)  # None means "flag not given"
    assert s.buffer == 3 and s.job == "from-env"
    with pytest.raises(ConfigError):
        Settings.from_env(env, bufer=3)


def test_settings_reads_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDQ_NAMESPACE", "from-os")
    monkeypatch.setenv("FEDQ_THREADS", "3")
    s = Settings.from_env()
    assert s.namespace == "from-os" and s.threads == 3


def test_known_env_names() -> None:
    names = known_env_names()
    assert "FEDQ_AMQP_URL" in names and "FEDQ_MAX_NORM" in names and "FEDQ_BUFFER" in names
    assert env_name("amqp_url") == "FEDQ_AMQP_URL"
    assert len(names) == len(Settings.__dataclass_fields__)
    assert all(n.startswith("FEDQ_") and n == n.upper() for n in names)


def test_settings_derived_paths() -> None:
    s = Settings(job="j1", keys_dir="/k")
    assert s.out_dir == Path(".fedq/jobs/j1")
    assert s.trusted_dir == Path("/k/trusted")
    assert s.key_path("worker") == Path("/k/worker.key")
    assert s.coordinator_key_path == Path("/k/coordinator.pub")
    t = Settings(out="/o", trusted_keys="/t", key_file="/x.key", coordinator_key="/c.pub")
    assert (t.out_dir, t.trusted_dir, t.key_path("worker"), t.coordinator_key_path) == (
        Path("/o"),
        Path("/t"),
        Path("/x.key"),
        Path("/c.pub"),
    )


def test_capabilities() -> None:
    assert Settings(capabilities=" cpu, gpu ,,").capability_list == ("cpu", "gpu")
    for bad in ("", " , ", ","):
        with pytest.raises(ConfigError):
            split_capabilities(bad)


# ---------------------------------------------------------------- names and topology


def test_names_under_a_namespace() -> None:
    n = Names("t-abc")
    assert n.tasks_exchange == "t-abc.tasks"
    assert n.task_queue("gpu") == "t-abc.job.default.tasks.gpu"
    assert n.task_key("gpu") == "default.gpu"
    assert n.results_exchange == "t-abc.results" and n.results_key == "default"
    assert n.updates_queue == "t-abc.job.default.updates"
    assert n.update_log == "t-abc.updates.log"
    assert n.models_exchange == "t-abc.models"
    assert n.model_log == "t-abc.models.log"
    assert n.workers_exchange == "t-abc.workers" and n.hello_key == "default"
    assert n.coordinator_queue == "t-abc.job.default.coordinator"
    assert n.dead_exchange == "t-abc.dead" and n.dead_queue == "t-abc.dead"
    assert Names().tasks_exchange == "fedq.tasks"
    assert Names.model_key("job-1") == "model.job-1"
    assert Names.receipt_key("job_1") == "receipt.job_1"


def test_each_job_has_its_own_queues_and_keys_but_shares_the_namespace() -> None:
    a, b = Names("ns", "a"), Names("ns", "b")
    assert a.task_queue("cpu") != b.task_queue("cpu") and a.task_key("cpu") != b.task_key("cpu")
    assert a.updates_queue != b.updates_queue and a.results_key != b.results_key
    assert a.coordinator_queue != b.coordinator_queue and a.hello_key != b.hello_key
    for shared in ("tasks_exchange", "results_exchange", "workers_exchange", "update_log", "dead_queue"):
        assert getattr(a, shared) == getattr(b, shared)
    assert a.for_job("b") == b
    # no job's queue can be mistaken for a shared one, whatever the job is called
    for job in ("log", "updates", "coordinator", "tasks", "dead", "job"):
        j = Names("ns", job)
        shared_names = {j.update_log, j.model_log, j.dead_queue}
        assert not {j.updates_queue, j.coordinator_queue, j.task_queue("cpu")} & shared_names
        assert j.job_of_queue(j.updates_queue) == job and j.job_of_queue(j.task_queue("x")) == job
    assert a.job_of_queue(a.update_log) is None and a.job_of_queue(a.dead_queue) is None


def test_topology_routes_each_job_to_its_own_queues_and_every_update_to_the_log() -> None:
    from shared.transport.memory import topic_matches

    topo = topology(Names("ns", "a"), ("cpu",))
    by_queue = {(b.queue, b.exchange): b.routing_key for b in topo.bindings}
    a, b = Names("ns", "a"), Names("ns", "b")
    assert by_queue[(a.updates_queue, a.results_exchange)] == a.results_key
    assert not topic_matches(a.results_key, b.results_key)
    assert topic_matches(by_queue[(a.update_log, a.results_exchange)], b.results_key)
    assert by_queue[(a.task_queue("cpu"), a.tasks_exchange)] == a.task_key("cpu") != b.task_key("cpu")


@pytest.mark.parametrize("cap", ["", "a.b", "a b", "-x", "_x", "x" * 64, "é", "a/b", "a*", "a#"])
def test_invalid_capability(cap: str) -> None:
    with pytest.raises(ConfigError):
        Names("ns").task_queue(cap)
    with pytest.raises(ConfigError):
        topology(Names("ns"), ("cpu", cap))


def test_trailing_newline_is_not_a_valid_token_or_namespace() -> None:
    with pytest.raises(ConfigError):
        check_token("capability", "cpu\n")
    with pytest.raises(ConfigError):
        Names("fedq\n")


@pytest.mark.parametrize("cap", ["cpu", "x" * 63, "A_b-1", "0"])
def test_valid_capability(cap: str) -> None:
    assert check_token("capability", cap) == cap
    assert Names("ns").task_queue(cap) == f"ns.job.default.tasks.{cap}"


@pytest.mark.parametrize("job", ["a.b", "*", "#", "", "a b"])
def test_invalid_job_in_routing_keys(job: str) -> None:
    with pytest.raises(ConfigError):
        Names.model_key(job)
    with pytest.raises(ConfigError):
        Names.receipt_key(job)


@pytest.mark.parametrize("ns", ["", ".x", "a b", "x" * 64, "a/b"])
def test_invalid_namespace(ns: str) -> None:
    with pytest.raises(ConfigError):
        Names(ns)


def test_topology_is_self_consistent_and_namespaced() -> None:
    names = Names("t-1")
    topo = topology(names, ("cpu", "gpu"), Limits(task_delivery_limit=2))
    exchanges = {e.name for e in topo.exchanges}
    queues = {q.name: q for q in topo.queues}
    assert all(name.startswith("t-1.") for name in exchanges | set(queues))
    assert len(exchanges) == len(topo.exchanges) and len(queues) == len(topo.queues)
    for b in topo.bindings:
        assert b.queue in queues and b.exchange in exchanges
    assert {names.task_queue("cpu"), names.task_queue("gpu")} <= set(queues)
    assert queues[names.task_queue("gpu")].arguments["x-delivery-limit"] == 2
    assert queues[names.task_queue("gpu")].arguments["x-dead-letter-exchange"] == names.dead_exchange
    assert queues[names.update_log].is_stream and queues[names.model_log].is_stream
    assert not queues[names.updates_queue].is_stream
    assert queues[names.updates_queue].arguments["x-single-active-consumer"] is True

    worker = capability_topology(names, ("gpu",))
    assert {q.name for q in worker.queues} == {names.task_queue("gpu")}
    for b in worker.bindings:
        assert b.exchange in {e.name for e in worker.exchanges}
        assert b.routing_key == names.task_key("gpu")


# ---------------------------------------------------------------- flat models


def state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "conv.weight": torch.randn(2, 3, 2, generator=g),
        "conv.bias": torch.tensor([0.5, -1.25], dtype=torch.float64),  # exactly representable in fp32
        "half": torch.tensor([1.5, -2.0], dtype=torch.float16),
        "bn.num_batches_tracked": torch.tensor(123456789012, dtype=torch.int64),
        "bn.counts": torch.tensor([[-(2**62), 2**62 - 1]], dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
        "levels": torch.tensor([0, 255], dtype=torch.uint8),
    }


def test_flat_model_state_dict_round_trip() -> None:
    original = state()
    flat = FlatModel.from_state_dict(original)
    assert flat.floats.dtype == torch.float32 and flat.exact.dtype == torch.int64
    assert flat.spec.n_float == 12 + 2 + 2 and flat.spec.n_exact == 1 + 2 + 3 + 2
    assert flat.exact[0].item() == 123456789012
    back = flat.to_state_dict()
    assert list(back) == list(original)  # same names, same order
    for name, tensor in original.items():
        assert back[name].dtype == tensor.dtype, name
        assert back[name].shape == tensor.shape, name
        assert torch.equal(back[name], tensor), name


def test_flat_model_bytes_round_trip_and_determinism() -> None:
    a = FlatModel.from_state_dict(state())
    b = FlatModel.from_state_dict(state())
    assert a.to_bytes() == b.to_bytes() and a.sha256() == b.sha256()
    restored = FlatModel.from_bytes(a.to_bytes())
    assert restored.spec == a.spec
    assert torch.equal(restored.floats, a.floats) and torch.equal(restored.exact, a.exact)
    assert restored.to_bytes() == a.to_bytes()
    for name, tensor in state().items():
        assert torch.equal(restored.to_state_dict()[name], tensor)
    changed = a.with_vectors(a.floats + 1e-6, a.exact)
    assert changed.to_bytes() != a.to_bytes() and changed.spec is a.spec


def test_flat_model_empty_and_unsupported() -> None:
    empty = FlatModel.from_state_dict({})
    assert empty.floats.numel() == 0 and empty.exact.numel() == 0
    assert FlatModel.from_bytes(empty.to_bytes()).spec == ModelSpec(())
    with pytest.raises(ValueError):
        FlatModel.from_state_dict({"z": torch.zeros(2, dtype=torch.complex64)})


def _model_doc(**changes: object) -> bytes:
    doc: dict[str, object] = {
        "v": 1,
        "spec": [["w", "float32", [2]], ["n", "int64", []]],
        "floats": b"\x00" * 8,
        "exact": b"\x00" * 8,
    }
    doc.update(changes)
    return msgpack.packb({k: v for k, v in doc.items() if v is not ...})


def test_model_doc_helper_is_valid() -> None:
    m = FlatModel.from_bytes(_model_doc())
    assert m.spec == ModelSpec((TensorSpec("w", (2,), "float32"), TensorSpec("n", (), "int64")))


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\xc1",
        b"garbage",
        msgpack.packb([1, 2]),
        msgpack.packb({1: 2}),
        _model_doc(v=2),
        _model_doc(v=...),
        _model_doc(spec=...),
        _model_doc(floats=...),
        _model_doc(floats=b"\x00" * 7),
        _model_doc(exact=b"\x00" * 16),
        _model_doc(floats=[0, 0, 0, 0, 0, 0, 0, 0]),
        _model_doc(floats="x" * 8),
        _model_doc(spec="w"),
        _model_doc(spec=[["w", "float32"]]),
        _model_doc(spec=[["w", "complex64", [2]], ["n", "int64", []]]),
        _model_doc(spec=[["w", "float32", [-2]], ["n", "int64", []]]),
        _model_doc(spec=[[1, "float32", [2]], ["n", "int64", []]]),
        _model_doc(spec=[["w", ["float32"], [2]], ["n", "int64", []]]),
        _model_doc(spec=[["w", "float32", 2], ["n", "int64", []]]),
        _model_doc() + b"\x00",
    ],
    ids=repr,
)
def test_flat_model_from_garbage_is_a_store_error(raw: bytes) -> None:
    with pytest.raises(StoreError):
        FlatModel.from_bytes(raw)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_flat_model_from_random_bytes_never_raises_anything_else(raw: bytes) -> None:
    with contextlib.suppress(StoreError):
        FlatModel.from_bytes(raw)


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_flat_model_byte_flips_give_a_model_or_a_store_error(data: st.DataObject) -> None:
    raw = bytearray(FlatModel.from_state_dict(state()).to_bytes())
    index = data.draw(st.integers(0, len(raw) - 1))
    raw[index] ^= data.draw(st.integers(1, 255))
    try:
        model = FlatModel.from_bytes(bytes(raw))
    except StoreError:
        return
    assert model.floats.numel() == model.spec.n_float and model.exact.numel() == model.spec.n_exact


def test_replicas_share_one_dirichlet_split(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each replica of a --replicas process takes its share of one split, made once."""
    import shared.app as app_module
    from shared.app import ClassificationApp, PartitionSpec

    class Tiny(ClassificationApp):
        def train_data(self) -> tuple[torch.Tensor, torch.Tensor]:
            x = torch.arange(600, dtype=torch.float32).unsqueeze(1)
            return x, torch.arange(600) % 10

    made = []
    real = app_module.dirichlet_partition

    def counting(*args: object) -> list[list[int]]:
        made.append(args[1:])
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(app_module, "dirichlet_partition", counting)
    app = Tiny()
    shares = [app.load_partition(PartitionSpec(i, 6))[0].squeeze(1).long().tolist() for i in range(6)]
    expected = real((torch.arange(600) % 10).numpy(), 6, PartitionSpec(0, 6).alpha, PartitionSpec(0, 6).seed)
    assert shares == expected
    assert len(made) == 1
    app.load_partition(PartitionSpec(0, 3))  # another split is made for another count
    assert len(made) == 2
