"""The messages fedq sends, as frozen dataclasses. ``shared.codec`` puts them on the wire."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class TrainConfig:
    """Local training recipe, chosen by the coordinator per capability."""

    epochs: int = 5
    batch_size: int = 32
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0
    prox_mu: float = 0.0  # FedProx: (mu/2)||w - w_base||^2 joins the local loss; 0: none


@dataclass(frozen=True)
class Task:
    """Train on ``base_version`` and send back a delta. Signed by the coordinator."""

    task_id: str
    job_id: str
    capability: str
    base_version: int
    model_sha256: str
    model_key: str  # where the model lives in the store; the payload may carry it inline
    train: TrainConfig
    quant: str
    block: int
    deadline: float  # unix seconds
    issued_at: float
    round: int = -1  # sync mode round number, -1 in async mode
    model_size: int = 0
    model_url: str = ""  # presigned GET for workers without store credentials
    inline_limit: int = 1 << 20  # updates above this many bytes travel by claim check
    update_key: str = ""  # where a large update goes in the store
    update_url: str = ""  # presigned PUT for that key
    incarnation: str = ""  # the job's nonce, fixed with version 0: a reused job id is another job
    max_samples: int = 0  # the most samples an update may count for (its weight's cap); 0: no cap
    # local differential privacy: the worker clips its float delta to L2 norm dp_clip and adds
    # Gaussian noise of std dp_noise x dp_clip to each float coordinate; 0: none
    dp_clip: float = 0.0
    dp_noise: float = 0.0
    shard: int = -1  # edge aggregation: the shard whose queue the update goes to; -1: the job's one queue
    model: bytes = b""  # the payload: the serialized model when inline


@dataclass(frozen=True)
class Update:
    """A worker's delta against ``base_version``. Signed by the worker."""

    task_id: str
    job_id: str
    worker_id: str
    base_version: int
    num_samples: int
    quant: str
    block: int
    metrics: dict[str, float] = field(default_factory=dict)
    sent_at: float = 0.0
    # claim check: a large delta lives in the store; these travel, signed, instead of it
    delta_key: str = ""
    delta_sha256: str = ""
    delta_size: int = 0
    # the task this answers, as the coordinator signed it (``shared.codec.task_token``): the
    # aggregator takes job, incarnation, base version and sample cap from it, and records its
    # capability and deadline
    task: bytes = b""
    # the organisation the worker says it belongs to (``fedq worker --org``), for cost accounting:
    # self-declared, so the ledger records it as the worker's claim; "": none
    org: str = ""
    delta: bytes = b""  # the payload


@dataclass(frozen=True)
class Hello:
    """A worker's announcement and heartbeat (``state`` is ``up`` or ``down``)."""

    worker_id: str
    capabilities: tuple[str, ...]
    key_fingerprint: str
    state: str
    sent_at: float
    partition: str = ""
    busy: bool = False
    # the worker's own task counts since it started, for the job's ledger
    tasks_received: int = 0
    tasks_completed: int = 0
    tasks_expired: int = 0
    tasks_redelivered: int = 0
    org: str = ""  # the organisation the worker says it belongs to (``--org``); self-declared


@dataclass(frozen=True)
class Round:
    """Sync mode: open a round of ``size`` tasks on ``version``, or close it (``close``)."""

    job_id: str
    version: int
    round: int
    size: int
    deadline: float
    close: bool = False


@dataclass(frozen=True)
class ModelAnnouncement:
    """A new global version is stored. Signed by the aggregator (or the coordinator for v0)."""

    job_id: str
    version: int
    parent: int
    sha256: str
    key: str
    update_ids: tuple[str, ...]
    created_at: float
    mean_staleness: float = 0.0
    updates_total: int = 0
    rollback_of: int = -1  # ``fedq model rollback``: the version whose model this one re-stores
    dp_epsilon: float | None = None  # differential privacy: epsilon after this version (None: no DP)


@dataclass(frozen=True)
class Receipt:
    """The aggregator's word on one update: ``buffered``, ``applied`` or ``rejected``."""

    job_id: str
    task_id: str
    worker_id: str
    fate: str
    reason: str
    version: int
    staleness: int = 0


@dataclass(frozen=True)
class Receipts:
    """Receipts sent as one message: what piled up while the aggregator's last one was in
    flight. At a low rate each carries a single receipt; at a high one, many per signature."""

    job_id: str
    receipts: tuple[Receipt, ...]


@dataclass(frozen=True)
class Partial:
    """An edge aggregator's fold of several updates, for the root. Signed by the edge (an
    aggregator key).

    Every update was screened, clipped and weighted against root version ``version`` and its clip
    window; ``sums`` holds the float32 sum of weight x clip x delta (flat order) and then the
    float64 sum of weight x integer delta. Per update, in fold order: its task id, the sha256 of
    its message, its worker, staleness (versions behind the root), weight, norm before clipping,
    clip scale, norm after clipping, and sample count. ``norm_total``: what the step divides by (``Policy.norm_weight``)."""

    job_id: str
    partial_id: str
    shard: int
    version: int
    update_ids: tuple[str, ...]
    update_digests: tuple[str, ...]
    worker_ids: tuple[str, ...]
    staleness: tuple[int, ...]
    weights: tuple[float, ...]
    norms: tuple[float, ...]
    clips: tuple[float, ...]
    recorded: tuple[float, ...]  # each norm after clipping: the root's clip window grows by them
    num_samples: tuple[int, ...]
    norm_total: float
    n_float: int
    n_exact: int
    sums_sha256: str
    created_at: float = 0.0
    sums: bytes = b""  # the payload


@dataclass(frozen=True)
class Verdict:
    """The root's word on one partial: ``applied`` in ``version``, or ``rejected`` with its reason.
    ``duplicates``: the partial's updates already in a version (through another partial): the edge
    acks those and folds the rest again. Signed by the root."""

    job_id: str
    partial_id: str
    shard: int
    fate: str
    version: int
    reason: str = ""
    detail: str = ""
    duplicates: tuple[str, ...] = ()


Message = Task | Update | Hello | Round | ModelAnnouncement | Receipt | Receipts | Partial | Verdict

KINDS: dict[str, type] = {
    "task": Task,
    "update": Update,
    "hello": Hello,
    "round": Round,
    "model": ModelAnnouncement,
    "receipt": Receipt,
    "receipts": Receipts,
    "partial": Partial,
    "verdict": Verdict,
}
PAYLOAD_FIELD = {"task": "model", "update": "delta", "partial": "sums"}
# Fields added since the first release: left off the wire while at their default, so that a peer
# from before them still reads every message that does not use them.
LATER_FIELDS: dict[type, frozenset[str]] = {
    TrainConfig: frozenset({"prox_mu"}),
    Task: frozenset({"dp_clip", "dp_noise", "shard"}),
    ModelAnnouncement: frozenset({"dp_epsilon"}),
    Update: frozenset({"org"}),
    Hello: frozenset({"org"}),
}
