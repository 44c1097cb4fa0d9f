"""Why fedq refused a message, and what became of an update: one vocabulary for the dead-letter
header (``x-fedq-reason``), the aggregator's ledger, receipts, ``fedq audit`` and ``fedq dlq``.

The values are contracts (users filter on them: ``fedq dlq list --reason stale``); add freely,
never rename."""

from __future__ import annotations

from enum import StrEnum


class Reason(StrEnum):
    # the bytes: size, decoding and signatures (the runtime, before any handler)
    TOO_LARGE = "too_large"  # above --max-message-bytes: refused before anything is unpacked
    UNDECODABLE = "undecodable"
    UNKNOWN_SIGNER = "unknown_signer"
    BAD_SIGNATURE = "bad_signature"
    WRONG_ROLE = "wrong_role"  # a trusted key, but its role may not send this kind of message
    WRONG_WORKER = "wrong_worker"  # a worker key speaking for another worker id
    UNKNOWN_TASK = "unknown_task"  # an update for a task the coordinator did not sign
    UNSIGNED_VERSION = "unsigned_version"  # a manifest without a valid signature by its maker
    # an update's content (screening)
    BAD_SHAPE = "bad_shape"
    NON_FINITE = "non_finite"
    NORM_TOO_LARGE = "norm_too_large"
    INT_OUT_OF_RANGE = "int_out_of_range"  # an integer tensor's delta beyond any training step
    BAD_SAMPLE_COUNT = "bad_sample_count"
    BAD_PAYLOAD = "bad_payload"
    PAYLOAD_MISSING = "payload_missing"
    # an update against the job's state
    WRONG_JOB = "wrong_job"
    WRONG_SHARD = "wrong_shard"  # edge aggregation: an update sent to another shard than its task names
    DUPLICATE = "duplicate"
    STALE = "stale"
    FUTURE_VERSION = "future_version"
    # a task, at the worker
    EXPIRED = "expired"
    BAD_TASK_ID = "bad_task_id"
    BAD_TASK = "bad_task"  # a task no worker can carry out (unknown quantization, block < 1, ...)
    BAD_MODEL = "bad_model"
    # handling this message raised (the traceback is in the log; the service went on)
    INTERNAL_ERROR = "internal_error"
    HANDLER_ERROR = "handler_error"  # the name of internal_error before; kept for old ledgers


class Fate(StrEnum):
    """What the aggregator's ledger says became of an update."""

    APPLIED = "applied"
    REJECTED = "rejected"
    PENDING = "pending"  # held unacked when the aggregator stopped: back in the queue
    FOLDED = "folded"  # an edge aggregator folded it into a partial (the root's ledger says where it went)
    ROLLBACK = "rollback"  # a record of ``fedq model rollback``, not of an update
