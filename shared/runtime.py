"""One runtime for the three services: connect, declare, consume, background loops, failure, stop.

A service (coordinator, aggregator, worker) says what it needs (``topology``) and wires its
handlers and loops in ``start``; the runtime does the rest the same way for all three:

- **Messages are checked once, here.** ``consume_messages`` decodes and verifies each delivery
  (in a thread when it is large) before the handler sees it. A message that fails goes to
  ``on_invalid`` (by default: dead-lettered with the ``WireError``'s reason). A body above the
  transport's cap (``--max-message-bytes``) fails first, before anything in it is unpacked or
  hashed (``too_large``); ``consume``'s raw handlers never see one either.
- **Prefetch is bounded by bytes**: the count a service asks for is lowered so that prefetch x
  the cap stays under ``shared.codec.PREFETCH_BUDGET_BYTES``, never below what it ``need``s.
- **A handler never takes the service down with one message.** Whatever a handler raises
  dead-letters that message with reason ``internal_error``; only ``ServiceFailure``,
  ``BrokerError`` and ``StoreError`` (the service cannot go on: its broker or store failed)
  stop the service, leaving the message unsettled for a restart or a standby.
- **Background loops run in one ``asyncio.TaskGroup``**: one that fails stops the service
  with its error; a clean stop cancels them all and waits for them.
- **Shutdown is one path**: ``Service.stopping`` (say goodbye, note what is held), then the
  loops, then the transport is closed, which gives unsettled deliveries back to their queues.
  Once a stop is under way, handlers take no new delivery: it goes back to its queue too.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

from broker_config.topology import Queue, Topology
from shared.codec import Envelope, check_size, decode
from shared.errors import BrokerError, ServiceFailure, StoreError, TooLargeError, WireError
from shared.logs import get_logger
from shared.messages import Message
from shared.reasons import Reason
from shared.signing import Keyring
from shared.transport import Delivery, Transport

OFFLOAD_BYTES = 1 << 20  # decode larger messages in a thread, off the event loop
FATAL: tuple[type[BaseException], ...] = (ServiceFailure, BrokerError, StoreError)

MessageHandler = Callable[[Any, Envelope, Delivery], Awaitable[None]]
InvalidHandler = Callable[[Delivery, WireError], Awaitable[None]]


class Service(abc.ABC):
    """What a service tells the runtime."""

    name: str

    def topology(self) -> Topology | None:
        """What to declare before starting (``None``: nothing)."""
        return None

    @abc.abstractmethod
    async def start(self, runtime: Runtime) -> None:
        """Consume, subscribe and spawn background loops through ``runtime``."""

    async def stopping(self) -> None:  # noqa: B027 - a hook: most services have nothing to do
        """A clean stop is under way: the transport is still open (bounded by the runtime's grace)."""


async def dead_letter_invalid(delivery: Delivery, error: WireError) -> None:
    await delivery.dead_letter(error.reason, str(error))


class Runtime:
    """Runs one ``Service`` over one ``Transport``; ``run`` returns what ``finish`` was given."""

    def __init__(self, transport: Transport, *, grace: float = 5.0, **log_context: Any) -> None:
        self.transport = transport
        self.grace = grace
        self.log = get_logger(**log_context)
        self._group: asyncio.TaskGroup | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._done = asyncio.Event()
        self._failure: BaseException | None = None
        self._result: Any = None

    # -- what services call ---------------------------------------------------------------
    def spawn(self, name: str, loop: Callable[[], Awaitable[Any]]) -> None:
        """Run ``loop`` beside the service; if it raises, the service stops with its error."""
        if self._group is None:
            raise RuntimeError("spawn is for Service.start and later")
        task = self._group.create_task(self._watch(name, loop), name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def every(self, name: str, seconds: float, tick: Callable[[], Awaitable[Any]]) -> None:
        """Call ``tick`` now and then every ``seconds`` (a heartbeat); a failing tick stops the service."""

        async def loop() -> None:
            while True:
                await tick()
                await asyncio.sleep(seconds)

        self.spawn(name, loop)

    def finish(self, result: Any = None) -> None:
        """The service is done: stop cleanly, and let ``run`` return ``result``."""
        self._result = result
        self._done.set()

    def fail(self, error: BaseException) -> None:
        """The service cannot go on: stop, and let ``run`` raise ``error``."""
        if self._failure is None:
            self._failure = error
        self._done.set()

    async def consume(
        self, queue: str, handler: Callable[[Delivery], Awaitable[None]], prefetch: int, *, need: int = 1
    ) -> None:
        """Consume ``queue`` with raw deliveries, guarded as described in the module docstring: one
        above the cap is dead-lettered ``too_large`` before ``handler`` sees it."""

        async def sized(delivery: Delivery) -> None:
            try:
                check_size(delivery.body, self.transport.max_message_bytes)
            except TooLargeError as exc:
                await self._refuse(delivery, exc, dead_letter_invalid)
                return
            await handler(delivery)

        await self.transport.consume(queue, self._guard(sized), self.transport.prefetch(prefetch, need))

    async def consume_messages(
        self,
        queue: str,
        expect: type[Message] | tuple[type[Message], ...],
        keyring: Keyring,
        handler: MessageHandler,
        *,
        prefetch: int,
        need: int = 1,
        on_invalid: InvalidHandler = dead_letter_invalid,
    ) -> None:
        """Consume decoded, verified messages of the ``expect`` kinds from ``queue``. ``prefetch`` is
        bounded by bytes (see the module docstring); ``need``: the most deliveries the service holds
        unacked while it waits for more (the aggregator's buffer), which the bound never goes below."""
        checked = self._checked(expect, keyring, handler, on_invalid)
        await self.transport.consume(queue, checked, self.transport.prefetch(prefetch, need))

    async def subscribe_messages(
        self,
        exchange: str,
        routing_keys: tuple[str, ...],
        expect: type[Message] | tuple[type[Message], ...],
        keyring: Keyring,
        handler: MessageHandler,
        *,
        on_invalid: InvalidHandler = dead_letter_invalid,
        durable: Queue | None = None,
    ) -> None:
        """Like ``consume_messages``, from a queue bound to ``exchange`` with ``routing_keys``:
        ``durable`` (kept while we are away) or, when ``None``, one private to this connection."""
        checked = self._checked(expect, keyring, handler, on_invalid)
        await self.transport.subscribe(exchange, routing_keys, checked, queue=durable)

    def _checked(
        self,
        expect: type[Message] | tuple[type[Message], ...],
        keyring: Keyring,
        handler: MessageHandler,
        on_invalid: InvalidHandler,
    ) -> Callable[[Delivery], Awaitable[None]]:
        async def checked(delivery: Delivery) -> None:
            opened: tuple[Message, Envelope]
            cap = self.transport.max_message_bytes
            try:
                check_size(delivery.body, cap)  # its length only: nothing is unpacked, copied or hashed
                if len(delivery.body) > OFFLOAD_BYTES:
                    opened = await asyncio.to_thread(_decode, delivery.body, keyring, expect, cap)
                else:
                    opened = _decode(delivery.body, keyring, expect, cap)
            except WireError as exc:
                await self._refuse(delivery, exc, on_invalid)
                return
            await handler(*opened, delivery)

        return self._guard(checked)

    async def _refuse(self, delivery: Delivery, error: WireError, on_invalid: InvalidHandler) -> None:
        if isinstance(error, TooLargeError):
            self.log.warning("message_too_large", source=delivery.source, size=len(delivery.body))
        await on_invalid(delivery, error)

    # -- the run ---------------------------------------------------------------------------
    async def run(self, service: Service, stop: asyncio.Event | None = None) -> Any:
        """Declare, start, and run ``service`` until it finishes, fails, ``stop`` is set or this
        task is cancelled; then shut down (``Service.stopping``, loops, handlers)."""
        self.log = self.log.bind(service=service.name)
        topo = service.topology()
        if topo is not None:
            await self.transport.declare(topo)
        try:
            async with asyncio.TaskGroup() as group:
                self._group = group
                await service.start(self)
                waits = [asyncio.ensure_future(self._done.wait())]
                if stop is not None:
                    waits.append(asyncio.ensure_future(stop.wait()))
                try:
                    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for w in waits:
                        w.cancel()
                    await self._stop(service)
        except BaseExceptionGroup as group_error:
            raise first_error(group_error) from None
        finally:
            self._done.set()
            await self.transport.close(self.grace)  # what is not settled goes back to its queue
        if self._failure is not None:
            raise self._failure
        return self._result

    async def _stop(self, service: Service) -> None:
        """Goodbye first (the link is up), then the loops."""
        try:
            await asyncio.wait_for(service.stopping(), self.grace)
        except (TimeoutError, Exception) as exc:  # a goodbye that fails must not hide why we stop
            self.log.warning("stopping_incomplete", error=repr(exc))
        for task in list(self._tasks):
            task.cancel()

    async def _watch(self, name: str, loop: Callable[[], Awaitable[Any]]) -> None:
        try:
            await loop()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.log.error("loop_failed", loop=name, error=repr(exc))
            self.fail(exc)

    def _guard(self, handler: Callable[[Delivery], Awaitable[None]]) -> Callable[[Delivery], Awaitable[None]]:
        async def guarded(delivery: Delivery) -> None:
            if self._done.is_set():
                return  # stopping: left unsettled, it goes back to its queue when we close
            try:
                await handler(delivery)
            except asyncio.CancelledError:
                raise
            except FATAL as exc:
                self.log.error("service_failed", source=delivery.source, error=repr(exc))
                self.fail(exc)  # unsettled: the message goes back to its queue when we close
            except Exception as exc:
                self.log.exception("handler_failed", source=delivery.source, error=repr(exc))
                with contextlib.suppress(*FATAL):
                    await delivery.dead_letter(Reason.INTERNAL_ERROR, f"{type(exc).__name__}: {exc}")

        return guarded


def _decode(
    raw: bytes, keyring: Keyring, expect: type[Message] | tuple[type[Message], ...], max_bytes: int
) -> tuple[Message, Envelope]:
    expected = expect if isinstance(expect, tuple) else (expect,)
    message, envelope = decode(raw, keyring, expected, max_bytes=max_bytes)
    return message, envelope


def first_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The first leaf of an exception group: what stopped the group, with its own exit code."""
    first = group.exceptions[0]
    return first_error(first) if isinstance(first, BaseExceptionGroup) else first
