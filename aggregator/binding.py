"""An update as the task it answers says it is (pure: no I/O).

The aggregator believes the coordinator's signed task, carried in the update as a token
(``shared.codec.task_token``), not the worker, about the job, its incarnation, the base version,
the sample cap and the one store key a claim-checked delta may name (the key the task's presigned
PUT reaches). ``fedq replay`` binds the updates it re-applies the same way, so a version is
re-derived from what the aggregator really folded.
"""

from __future__ import annotations

import dataclasses

from aggregator.core import Rejected
from shared.codec import open_task_token
from shared.errors import UnknownTaskError
from shared.messages import Task, Update
from shared.reasons import Reason
from shared.signing import Keyring


def bound(update: Update, task: Task) -> Update:
    """``update`` with the base version its task was issued on and its sample count capped."""
    samples = min(update.num_samples, task.max_samples) if task.max_samples > 0 else update.num_samples
    return dataclasses.replace(update, base_version=task.base_version, num_samples=samples)


def bind(update: Update, keyring: Keyring, job_id: str, incarnation: str) -> tuple[Update, Task] | Rejected:
    """Check that ``update`` answers a task this job's coordinator issued, in this incarnation of
    the job; the update as bound to it, and the task."""
    tid = update.task_id
    try:
        task = open_task_token(update.task, keyring)
    except UnknownTaskError as exc:
        return Rejected(tid, Reason.UNKNOWN_TASK, str(exc))
    if task.task_id != tid:
        return Rejected(
            tid, Reason.UNKNOWN_TASK, f"the update names task {tid}, its token task {task.task_id}"
        )
    if task.job_id != job_id or update.job_id != task.job_id:
        return Rejected(tid, Reason.WRONG_JOB, f"task of job {task.job_id!r}, this is {job_id!r}")
    if task.incarnation != incarnation:
        return Rejected(
            tid,
            Reason.UNKNOWN_TASK,
            f"task of another incarnation of job {job_id} ({task.incarnation or 'none'}, this one is "
            f"{incarnation or 'none'}): the job id was reused",
        )
    if update.delta_key and update.delta_key != task.update_key:
        # only the key the coordinator signed into the task: not another task's or worker's object
        wanted = repr(task.update_key) if task.update_key else "none"
        return Rejected(
            tid,
            Reason.BAD_PAYLOAD,
            f"claim check {update.delta_key!r} is not its task's update key ({wanted})",
        )
    return bound(update, task), task
