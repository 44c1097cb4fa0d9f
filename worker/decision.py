"""What a worker does with a task it has received: one pure decision over what it knows.

The checks run in this order, the first that holds decides (``worker.service`` carries it out):

1. its update was confirmed before (a redelivery after a lost ack): ack, without training again;
2. the outbox cannot name an entry for its task id: dead-letter it (``bad_task_id``), since its
   update could not wait safely for its confirm;
3. it asks for what no worker can do (an unknown quantization, a block or batch below 1, no
   epoch): dead-letter it (``bad_task``) at once, rather than train and fail on every delivery;
4. its update waits in the outbox (trained before the link or the process was lost): send that
   update, then ack;
5. its deadline has passed: dead-letter it (``expired``);
6. otherwise: train.

Checks 2 and 3 are for a worker with an outbox; without one, a task id is always fine and
nothing waits. Looking in the outbox is disk I/O, so the worker does it only when
``outbox_matters`` says the answer can change the decision.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum


def task_problem(
    quant: str,
    block: int,
    epochs: int,
    batch_size: int,
    schemes: tuple[str, ...],
    dp_clip: float = 0.0,
    dp_noise: float = 0.0,
    prox_mu: float = 0.0,
) -> str:
    """Why a task asks for what no worker can do ("" when it does not)."""
    if quant not in schemes:
        return f"unknown quantization {quant!r} (this worker knows {', '.join(schemes)})"
    if block < 1 or batch_size < 1 or epochs < 1:
        return f"block {block}, batch size {batch_size} and epochs {epochs} must each be at least 1"
    if (dp_clip or dp_noise) and not (0 < dp_clip < math.inf and 0 <= dp_noise < math.inf):
        return f"local DP needs a finite clip above 0 and a finite noise of 0 or more, not {dp_clip} and {dp_noise}"
    if not 0 <= prox_mu < math.inf:
        return f"prox_mu must be a finite number of 0 or more, not {prox_mu}"
    return ""


class Decision(StrEnum):
    """The fate of a received task; a dead-lettered one carries its value as the reason."""

    ALREADY_SENT = "already_sent"  # ack
    BAD_TASK_ID = "bad_task_id"  # dead-letter
    BAD_TASK = "bad_task"  # dead-letter
    IN_OUTBOX = "in_outbox"  # send the waiting update, then ack
    EXPIRED = "expired"  # dead-letter
    TRAIN = "train"


@dataclass(frozen=True)
class Known:
    """What the worker knows of a task as it decides."""

    already_sent: bool  # its update was confirmed by the broker before
    task_id_ok: bool  # the outbox can name an entry for it (always true without an outbox)
    in_outbox: bool  # an update for it waits in the outbox
    deadline: float  # the task's deadline, seconds since the epoch
    now: float
    task_problem: str = ""  # why no worker can carry the task out ("" when it can)


def outbox_matters(already_sent: bool, task_id_ok: bool) -> bool:
    """Whether looking in the outbox can change the decision (checks 1 and 2 come before it)."""
    return task_id_ok and not already_sent


def decide(known: Known) -> Decision:
    if known.already_sent:
        return Decision.ALREADY_SENT
    if not known.task_id_ok:
        return Decision.BAD_TASK_ID
    if known.task_problem:
        return Decision.BAD_TASK
    if known.in_outbox:
        return Decision.IN_OUTBOX
    if known.deadline < known.now:
        return Decision.EXPIRED
    return Decision.TRAIN
