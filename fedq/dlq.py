"""``fedq dlq``: look into a namespace's dead-letter queue, and put fixed messages back.

The dead queue is a quorum queue, which has no "peek". Holding messages unacked and
closing the channel (or nacking them) does give them back, but measured on RabbitMQ
3.10 the broker shuffles them when it takes back more than 32 at once, so a listing
would scramble the positions that ``requeue N`` relies on. On 4.0-4.2 every such
return also counts against the default delivery limit of 20, and the dead queue has
no dead-letter exchange of its own, so the 20th listing would drop messages.

So every command makes one ordered pass instead. It takes every message with
``basic.get`` until the queue is empty. Then, in the original order, it either puts
each message back or requeues it. To put one back, it publishes an exact copy (body,
headers, properties) to the tail of the dead queue, waits for the broker's confirm,
and only then acks the original. After a pass the queue holds the same messages in
the same order. If the pass stops early (an error, a lost link, Ctrl-C), the broker
takes back what is still held: nothing is lost, but that part may come back in a
different order, and the few messages copied but not yet acked exist twice. While a
pass runs, its messages are invisible to other readers of the dead queue: do not run
two at once.

Positions (``#N``) are the order of the queue when it was read.

``requeue`` publishes the original body straight to the queue it died in (the
default exchange, routing key = queue name) with a publisher confirm, without the
dead-letter headers, and only then acks it off the dead queue. A crash between the
two leaves it in both places; receivers deduplicate by task id.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import hashlib
import json
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from broker_config.names import DETAIL_HEADER, REASON_HEADER, SOURCE_HEADER, USER_HEADER, Names
from shared.codec import decode_head, open_envelope
from shared.errors import BrokerError, ConfigError, WireError
from shared.messages import PAYLOAD_FIELD
from shared.settings import Settings
from shared.transport import Held, QueuePass, Transport
from shared.transport.connect import transport_for

# Headers a requeued message must not carry: fedq's dead-letter record, the broker's one
# (x-death and its x-first-/x-last-death-* summaries) and the dead queue's delivery counts.
STRIP_HEADERS = frozenset(
    {REASON_HEADER, DETAIL_HEADER, SOURCE_HEADER, USER_HEADER, "x-death", "x-delivery-count", "x-acquired-count"}
)
STRIP_PREFIXES = ("x-first-death-", "x-last-death-")
PREVIEW_BYTES = 64
CELL = 64  # characters of a claimed field shown in a list line
# Acks in flight at most, and copies published per window (see DeadQueue).
SETTLE_BATCH = 8
# Envelope fields that tell when a message was made, by kind of message.
MADE_AT = (("issued_at", "issued"), ("sent_at", "sent"), ("created_at", "created"))


# -- pure helpers: what a dead letter says about itself -----------------------------------------


def text(value: object) -> str:
    """A header value as text (AMQP strings may arrive as bytes)."""
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def death_reason(headers: Mapping[str, Any]) -> tuple[str, str]:
    """Why the message died, and who said so: fedq's reason header, else the broker's first death
    (``expired``, ``delivery_limit``, ``rejected``, ``maxlen``), else ``unknown``."""
    reason = text(headers.get(REASON_HEADER))
    if reason:
        return reason, "fedq"
    reason = text(headers.get("x-first-death-reason"))
    if reason:
        return reason, "broker"
    return "unknown", ""


def death_source(headers: Mapping[str, Any]) -> str:
    """The queue the message died in ("" when nothing records it)."""
    return text(headers.get(SOURCE_HEADER)) or text(headers.get("x-first-death-queue"))


def requeue_target(names: Names, source: str) -> str | None:
    """Where ``requeue`` sends a message back: its source, if that is a task queue or the updates
    queue of a job of this namespace; ``None`` for anything else."""
    job = names.job_of_queue(source)
    if job is None:
        return None
    of_job = names.for_job(job)
    if source == of_job.updates_queue:
        return source
    capability = source.removeprefix(f"{of_job.job_prefix}tasks.")
    try:
        return source if of_job.task_queue(capability) == source else None
    except ConfigError:
        return None


def requeue_headers(headers: Mapping[str, Any]) -> dict[str, Any]:
    """The message's own headers, without any record of its death."""
    return {k: v for k, v in headers.items() if k not in STRIP_HEADERS and not k.startswith(STRIP_PREFIXES)}


@dataclass(frozen=True)
class Peek:
    """What the body says when read as a fedq envelope. Nothing here is verified: the signature
    is not checked, so every field is a claim of whoever sent the bytes."""

    kind: str = ""
    signer: str = ""
    fields: dict[str, Any] = field(default_factory=dict)  # head fields; the payload is left out
    payload_field: str = ""
    payload_bytes: int = 0
    error: str = ""  # why the body is not (entirely) a fedq message

    @property
    def task_id(self) -> str:
        value = self.fields.get("task_id")
        return value if isinstance(value, str) else ""


def peek(body: bytes) -> Peek:
    """Parse ``body`` without trusting it: any bytes give a ``Peek``, never an exception."""
    try:
        envelope = open_envelope(body)
    except WireError as exc:
        return Peek(error=str(exc))
    payload_field = PAYLOAD_FIELD.get(envelope.kind, "")
    try:
        message = decode_head(envelope, body)
    except WireError as exc:
        return Peek(envelope.kind, envelope.signer, {}, payload_field, len(envelope.payload), f"head: {exc}")
    fields = dataclasses.asdict(message)
    fields.pop(payload_field, None)
    return Peek(envelope.kind, envelope.signer, fields, payload_field, len(envelope.payload))


def when(
    headers: Mapping[str, Any], fields: Mapping[str, Any], timestamp: dt.datetime | None
) -> tuple[dt.datetime | None, str]:
    """The best time we know, and what it is. ``died``: the broker's x-death entry (most recent
    first) for a broker death, or the AMQP timestamp of fedq's dead-letter publish. Else
    ``published`` (the timestamp), else the envelope's own claim (``issued``, ``sent``, ``created``)."""
    deaths = headers.get("x-death")
    fedq_death = bool(headers.get(REASON_HEADER))
    if not fedq_death and isinstance(deaths, list | tuple) and deaths:
        latest = deaths[0]
        if isinstance(latest, Mapping) and isinstance(latest.get("time"), dt.datetime):
            return _utc(latest["time"]), "died"
    if timestamp is not None:
        return _utc(timestamp), "died" if fedq_death else "published"
    for name, label in MADE_AT:
        value = fields.get(name)
        if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
            try:
                return dt.datetime.fromtimestamp(value, dt.UTC), label
            except (OverflowError, OSError, ValueError):
                break
    return None, ""


def _utc(t: dt.datetime) -> dt.datetime:
    return t.replace(tzinfo=dt.UTC) if t.tzinfo is None else t.astimezone(dt.UTC)


@dataclass(frozen=True)
class DeadLetter:
    """One message of the dead queue, described. The body itself is not kept (a dead task may
    carry a whole model): ``size``, ``sha256`` and a short ``preview`` stand for it."""

    position: int
    headers: dict[str, Any]
    size: int
    sha256: str
    preview: bytes
    reason: str
    reason_from: str  # "fedq", "broker" or ""
    source: str
    detail: str
    peek: Peek
    time: dt.datetime | None
    time_of: str
    redelivered: bool = False

    @classmethod
    def of(
        cls,
        position: int,
        body: bytes,
        headers: Mapping[str, Any] | None,
        timestamp: dt.datetime | None = None,
        redelivered: bool = False,
    ) -> DeadLetter:
        headers = dict(headers or {})
        reason, reason_from = death_reason(headers)
        look = peek(body)
        time, time_of = when(headers, look.fields, timestamp)
        return cls(
            position=position,
            headers=headers,
            size=len(body),
            sha256=hashlib.sha256(body).hexdigest(),
            preview=body[:PREVIEW_BYTES],
            reason=reason,
            reason_from=reason_from,
            source=death_source(headers),
            detail=text(headers.get(DETAIL_HEADER)),
            peek=look,
            time=time,
            time_of=time_of,
            redelivered=redelivered,
        )

    def to_dict(self, names: Names, full: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {
            "position": self.position,
            "reason": self.reason,
            "reason_from": self.reason_from,
            "source": self.source or None,
            "requeue_to": requeue_target(names, self.source),
            "kind": self.peek.kind or None,
            "task_id": self.peek.task_id or None,
            "size": self.size,
            "sha256": self.sha256,
            "time": _iso(self.time),
            "time_of": self.time_of or None,
            "detail": self.detail,
        }
        if full:
            out.update(
                {
                    "signer": self.peek.signer or None,
                    "fields": plain(self.peek.fields),
                    "payload_field": self.peek.payload_field or None,
                    "payload_bytes": self.peek.payload_bytes,
                    "decode_error": self.peek.error or None,
                    "preview": None if self.peek.kind else self.preview.hex(),
                    "redelivered": self.redelivered,
                    "headers": plain(self.headers),
                }
            )
        return out


@dataclass(frozen=True)
class Choice:
    """Which dead letters to requeue: all, those with one reason, or those at given positions."""

    all: bool = False
    reason: str | None = None
    positions: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        given = sum((self.all, self.reason is not None, bool(self.positions)))
        if given != 1:
            raise ConfigError("say which messages: --all, --reason R, or positions N [N ...] (one of them)")
        bad = [n for n in self.positions if n < 1]
        if bad:
            raise ConfigError(f"positions start at 1 (as `fedq dlq list` shows them), not {bad[0]}")

    def wants(self, letter: DeadLetter) -> bool:
        if self.all:
            return True
        if self.reason is not None:
            return letter.reason == self.reason
        return letter.position in self.positions


@dataclass(frozen=True)
class Outcome:
    letter: DeadLetter
    action: str  # requeued | would requeue | skipped | failed
    target: str | None = None
    note: str = ""


# -- rendering ----------------------------------------------------------------------------------


def counts(letters: Sequence[DeadLetter]) -> dict[str, int]:
    return dict(sorted(Counter(d.reason for d in letters).items()))


def _iso(t: dt.datetime | None) -> str | None:
    return None if t is None else t.strftime("%Y-%m-%dT%H:%M:%SZ")


def plain(value: Any) -> Any:
    """Header values and envelope fields as JSON-ready data (times as ISO text, bytes as text
    when they are UTF-8, else as hex)."""
    if isinstance(value, Mapping):
        return {text(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [plain(v) for v in value]
    if isinstance(value, dt.datetime):
        return _utc(value).isoformat()
    if isinstance(value, bytes | bytearray | memoryview):
        raw = bytes(value)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return "0x" + raw.hex()
    if isinstance(value, Decimal):
        return str(value)
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return repr(value)


def safe(value: str, limit: int | None = None) -> str:
    """Text from a message, fit for a terminal: control characters escaped (a dead letter may come
    from anyone), and cut to ``limit`` characters."""
    out = "".join(c if c.isprintable() else ascii(c)[1:-1] for c in value)
    return out if limit is None or len(out) <= limit else out[: limit - 3] + "..."


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]


def _when(letter: DeadLetter) -> str:
    return f"{letter.time_of} {_iso(letter.time)}" if letter.time else "-"


def render_list(queue: str, letters: Sequence[DeadLetter], reason: str | None = None) -> str:
    if not letters:
        return f"{queue} is empty"
    shown = [d for d in letters if reason is None or d.reason == reason]
    tally = ", ".join(f"{safe(r, CELL)} {n}" for r, n in counts(letters).items())
    summary = f"{len(letters)} dead letter{'s' * (len(letters) != 1)} in {queue}: {tally}"
    if reason is not None:
        summary += f" (showing the {len(shown)} with reason {safe(reason)!r})"
    if not shown:
        return summary
    rows = [["#", "reason", "source", "kind", "task id", "bytes", "time"]]
    for d in shown:
        rows.append(
            [
                str(d.position),
                safe(d.reason, CELL),
                safe(d.source, CELL) or "?",
                d.peek.kind or "-",
                safe(d.peek.task_id, CELL) or "-",
                str(d.size),
                _when(d),
            ]
        )
    return "\n".join([*_table(rows), summary])


def render_show(queue: str, names: Names, d: DeadLetter) -> str:
    target = requeue_target(names, d.source)
    by = {"fedq": "set by fedq", "broker": "set by the broker"}.get(d.reason_from, "no reason recorded")
    if target:
        where = f"{d.source} (requeue sends it back there)"
    elif d.source:
        where = f"{safe(d.source)} (not a task or updates queue of {names.namespace!r}: requeue skips it)"
    else:
        where = "unknown (no x-fedq-source or x-first-death-queue: requeue skips it)"
    lines = [
        f"#{d.position} in {queue}",
        f"reason    {safe(d.reason)} ({by})",
        f"source    {where}",
        f"detail    {safe(d.detail) or '-'}",
        f"size      {d.size} bytes, sha256 {d.sha256}",
        f"time      {_when(d)}",
    ]
    p = d.peek
    if p.kind:
        lines.append(f"envelope  {p.kind}, signer {safe(p.signer)} (signature not verified here)")
        width = max((len(k) for k in p.fields), default=0)
        for key, value in p.fields.items():
            lines.append(f"  {key.ljust(width)}  {json.dumps(plain(value))}")
        if p.payload_field:
            lines.append(f"  {p.payload_field.ljust(width)}  <{p.payload_bytes} bytes of payload>")
        if p.error:
            lines.append(f"  the head does not decode: {safe(p.error)}")
    else:
        lines.append(f"envelope  none: {safe(p.error)}")
        more = "..." if d.size > len(d.preview) else ""
        lines.append(f"  body starts {d.preview!r}{more}")
    lines.append("headers")
    for key, value in d.headers.items():
        lines.append(f"  {safe(key)}: {json.dumps(plain(value))}")
    return "\n".join(lines)


def render_requeue(queue: str, outcomes: Sequence[Outcome], dry_run: bool) -> str:
    if not outcomes:
        return f"nothing to requeue: no message of {queue} matches"
    lines = []
    for o in outcomes:
        d = o.letter
        what = " ".join(safe(x, CELL) for x in (d.reason, d.peek.kind, d.peek.task_id) if x)
        arrow = f" -> {o.target}" if o.target else ""
        note = f": {o.note}" if o.note else ""
        lines.append(f"{o.action} #{d.position} ({what}){arrow}{note}")
    tally = Counter(o.action for o in outcomes)
    lines.append(
        ", ".join(f"{action} {n}" for action, n in tally.items()) + (" (dry run)" if dry_run else "")
    )
    return "\n".join(lines)


# -- the broker side ----------------------------------------------------------------------------


class DeadQueue:
    """The dead queue, handled in one pass (see the module docstring): ``take_all`` holds every
    message; ``requeue`` sends chosen ones home; ``put_back_rest`` puts every other one back, in
    order. Leaving the block early (an error, a lost link) closes the channel: the broker takes
    back what is still held; nothing is lost, but that part may come back in another order.

    Acks are throttled. A quorum queue's channel keeps at most 32 commands in flight and holds
    back settlements beyond that; measured on 3.10, closing the channel right after many acks
    lost the held-back ones (their messages came back and were there twice). So at most
    ``SETTLE_BATCH`` acks are in flight at a time, and each batch is known to be applied before
    the next: after a confirmed copy on this channel, or after a ``basic.get``, both of which
    the broker only answers once the commands sent before them are applied."""

    def __init__(self, broker: Transport) -> None:
        self.broker = broker
        self.name = broker.names.dead_queue
        self.held: list[tuple[DeadLetter, Held]] = []
        self._settled: list[bool] = []
        self._since_barrier = 0  # acks sent since the last point they were known to be applied
        self._stack = contextlib.AsyncExitStack()
        self._pass: QueuePass | None = None

    async def __aenter__(self) -> DeadQueue:
        try:
            self._pass = await self._stack.enter_async_context(self.broker.queue_pass(self.name))
        except BrokerError as exc:
            raise BrokerError(
                f"no dead-letter queue {self.name!r} on the broker: is the namespace right? "
                "(`fedq declare` creates it)"
            ) from exc
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.aclose()  # anything still held goes back to the queue

    async def _take(self) -> bool:
        """Hold the queue's next message; ``False`` when it is empty."""
        assert self._pass is not None
        message = await self._pass.take()
        if message is None:
            return False
        letter = DeadLetter.of(
            len(self.held) + 1, message.body, message.headers, _moment(message.timestamp), message.redelivered
        )
        self.held.append((letter, message))
        self._settled.append(False)
        return True

    async def take_all(self) -> list[DeadLetter]:
        """Take every message, head first. ``basic.get`` coming back empty marks the end: on 3.10
        the message count of a quorum queue's declare can lag behind what was just dead-lettered."""
        while await self._take():
            pass
        return [letter for letter, _ in self.held]

    async def requeue(self, letter: DeadLetter, target: str) -> BrokerError | None:
        """Publish a held message to ``target`` (confirmed), clean of its death, then ack it.
        Returns the broker's refusal, if any: the message then stays held, to be put back."""
        i = letter.position - 1
        message = self.held[i][1]
        try:
            await self.broker.publish(
                "",
                target,
                message.body,
                headers=requeue_headers(message.headers),
                message_id=message.message_id,
            )
        except BrokerError as exc:
            return exc
        await self._ack(i, f"requeued to {target}")
        self._since_barrier += 1
        if self._since_barrier >= SETTLE_BATCH:
            await self._barrier()
        return None

    async def _barrier(self) -> None:
        """Wait until the acks sent so far are applied: a ``basic.get`` is answered only after the
        commands before it. Before any copy is put back, the queue holds none of our messages,
        so it comes back empty, or with a newcomer, which joins the pass (and is put back)."""
        self._since_barrier = 0
        await self._take()

    async def put_back_rest(self) -> None:
        """Put every held message not yet settled back at the tail, as it was, in order.

        The copies of a window are published without waiting for each confirm in turn (a quorum
        queue confirms after an fsync: one at a time costs ~10 ms each). Their order holds:
        publishes on one channel go out in the order they start (aiormq serialises them with a
        FIFO lock) and a queue keeps the order of one channel's publishes. An original is acked
        only once its copy is confirmed; one whose copy failed stays held and goes back at close."""
        assert self._pass is not None
        rest = [i for i, settled in enumerate(self._settled) if not settled]
        for start in range(0, len(rest), SETTLE_BATCH):
            window = rest[start : start + SETTLE_BATCH]
            errors = await asyncio.gather(*(self._pass.copy_back(self.held[i][1]) for i in window))
            for i, error in zip(window, errors, strict=True):
                if error is None:
                    await self._ack(i, "put back in place")
            failed = [(i, error) for i, error in zip(window, errors, strict=True) if error is not None]
            if failed:
                i, error = failed[0]
                raise BrokerError(
                    f"could not put #{i + 1} back into {self.name} ({error!r}); the broker takes back "
                    "every message not yet put back, possibly in a different order"
                ) from error
        self._since_barrier = 0

    async def _ack(self, i: int, done: str) -> None:
        assert self._pass is not None
        letter, message = self.held[i]
        error = await self._pass.ack(message)
        if error is not None:
            raise BrokerError(
                f"#{letter.position} was {done}, but its original could not be removed from {self.name} "
                f"({error!r}): it is there twice now"
            ) from error
        self._settled[i] = True


def _moment(timestamp: float | None) -> dt.datetime | None:
    return dt.datetime.fromtimestamp(timestamp, dt.UTC) if timestamp is not None else None


async def read(broker: Transport, reason: str | None = None) -> list[DeadLetter]:
    """Every message of the dead queue, described (only those with ``reason`` if given); the
    queue is left with the same messages in the same order."""
    async with DeadQueue(broker) as dq:
        letters = await dq.take_all()
        await dq.put_back_rest()
    return [d for d in letters if reason is None or d.reason == reason]


async def show(broker: Transport, position: int) -> DeadLetter:
    """The message at ``position`` (1 = the head); ``ConfigError`` when there is none."""
    if position < 1:
        raise ConfigError(f"positions start at 1 (as `fedq dlq list` shows them), not {position}")
    letters = await read(broker)
    if position > len(letters):
        raise ConfigError(f"no message #{position}: {broker.names.dead_queue} holds {_count(len(letters))}")
    return letters[position - 1]


def _count(n: int) -> str:
    return "no messages" if n == 0 else f"{n} (#1 to #{n})" if n > 1 else "1 (#1)"


async def requeue(broker: Transport, choice: Choice, dry_run: bool = False) -> list[Outcome]:
    """Send the chosen messages back to their source queues, each acked off the dead queue only
    after the broker confirmed its copy; every other message is put back in its place. Positions
    that do not exist fail the whole call before anything is sent; a message without a known
    source is skipped and stays."""
    names = broker.names
    outcomes: list[Outcome] = []
    async with DeadQueue(broker) as dq:
        letters = await dq.take_all()
        missing = sorted(n for n in set(choice.positions) if n > len(letters))
        if missing:
            await dq.put_back_rest()
            shown = ", ".join(f"#{n}" for n in missing)
            raise ConfigError(
                f"no message {shown}: {dq.name} holds {_count(len(letters))}; nothing was requeued"
            )
        for letter in letters:
            if not choice.wants(letter):
                continue
            target = requeue_target(names, letter.source)
            if target is None:
                why = (
                    f"its source {letter.source!r} is not a task or updates queue of {names.namespace!r}"
                    if letter.source
                    else "its source queue is unknown (no x-fedq-source or x-first-death-queue)"
                )
                outcomes.append(Outcome(letter, "skipped", None, why + "; it stays"))
            elif dry_run:
                outcomes.append(Outcome(letter, "would requeue", target))
            elif (refusal := await dq.requeue(letter, target)) is not None:
                outcomes.append(Outcome(letter, "failed", target, f"{refusal}; it stays"))
            else:
                outcomes.append(Outcome(letter, "requeued", target))
        await dq.put_back_rest()
    return outcomes


# -- the command --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """One ``fedq dlq`` call, as parsed from the command line."""

    action: str  # list | show | requeue
    reason: str | None = None
    position: int = 0  # show
    choice: Choice | None = None  # requeue
    dry_run: bool = False
    as_json: bool = False


async def connect(settings: Settings) -> Transport:
    return await transport_for(settings, "fedq-dlq", publish_retry_seconds=10.0).connect()


async def run(settings: Settings, request: Request) -> tuple[str, int]:
    """Carry out ``request``; returns what to print and the exit code (1 when a requeue failed)."""
    broker = await connect(settings)
    names = broker.names
    try:
        if request.action == "list":
            letters = await read(broker)
            if request.as_json:
                shown = [d for d in letters if request.reason is None or d.reason == request.reason]
                doc = {
                    "queue": names.dead_queue,
                    "total": len(letters),
                    "by_reason": counts(letters),
                    "messages": [d.to_dict(names) for d in shown],
                }
                return json.dumps(doc), 0
            return render_list(names.dead_queue, letters, request.reason), 0
        if request.action == "show":
            letter = await show(broker, request.position)
            if request.as_json:
                return json.dumps({"queue": names.dead_queue, **letter.to_dict(names, full=True)}), 0
            return render_show(names.dead_queue, names, letter), 0
        if request.action == "requeue":
            if request.choice is None:
                raise ConfigError("requeue needs --all, --reason R or positions")
            outcomes = await requeue(broker, request.choice, request.dry_run)
            failed = any(o.action == "failed" for o in outcomes)
            return render_requeue(names.dead_queue, outcomes, request.dry_run), 1 if failed else 0
        raise ConfigError(f"unknown dlq action {request.action!r}")
    finally:
        await broker.close()
