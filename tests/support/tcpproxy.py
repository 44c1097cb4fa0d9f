"""A small asyncio TCP proxy for fault tests: put it between a service and RabbitMQ, then cut the link.

``cut()`` is a silent partition: the proxy stops moving bytes in both directions but keeps
every socket open, so neither side sees a close and only heartbeats can tell that the link is
dead. Bytes sent meanwhile wait in the socket buffers, as they would in TCP retransmission
queues. Connections that arrive during a cut are accepted but not dialled through until
``heal()``. ``reset()`` closes every current connection at once (a crashed router).

The proxy is bounded: at most ``max_connections`` at a time, and it stops by itself after
``lifetime`` seconds, in case a failing test forgets to close it.
"""

from __future__ import annotations

import asyncio
import contextlib
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit, urlunsplit

CHUNK = 64 * 1024


class Link:
    """One client connection and its upstream twin."""

    def __init__(self, proxy: TcpProxy, client: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> None:
        self.proxy = proxy
        self.client_reader, self.client_writer = client
        self.upstream_writer: asyncio.StreamWriter | None = None
        self.bytes_up = 0  # client -> broker
        self.bytes_down = 0  # broker -> client

    async def run(self) -> None:
        try:
            await self.proxy.flowing.wait()  # a partition holds new connections too
            if self.client_writer.is_closing():
                return
            reader, upstream = await asyncio.wait_for(
                asyncio.open_connection(self.proxy.target_host, self.proxy.target_port), 5.0
            )
            self.upstream_writer = upstream
            await asyncio.gather(
                self._pump(self.client_reader, upstream, up=True),
                self._pump(reader, self.client_writer, up=False),
            )
        except (OSError, TimeoutError):
            pass
        finally:
            self.close()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, up: bool) -> None:
        try:
            while True:
                await self.proxy.flowing.wait()  # while cut, nothing is read: bytes stay in the buffers
                data = await reader.read(CHUNK)
                await self.proxy.flowing.wait()  # a cut during the read holds what was read
                if not data:
                    break
                writer.write(data)
                await writer.drain()
                if up:
                    self.bytes_up += len(data)
                else:
                    self.bytes_down += len(data)
        except OSError:
            pass
        finally:
            self.close()  # one side gone: the other goes too

    def close(self) -> None:
        for writer in (self.client_writer, self.upstream_writer):
            if writer is not None and not writer.is_closing():
                writer.close()


class TcpProxy:
    """Forward 127.0.0.1:<free port> to ``target``; ``cut``, ``heal`` and ``reset`` the links."""

    def __init__(
        self,
        target_host: str = "127.0.0.1",
        target_port: int = 5672,
        *,
        max_connections: int = 32,
        lifetime: float = 120.0,
    ) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.max_connections = max_connections
        self.lifetime = lifetime
        self.flowing = asyncio.Event()
        self.flowing.set()
        self.links: set[Link] = set()
        self.accepted = 0  # connections accepted so far (reconnects show up here)
        self.refused = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._expired: asyncio.Future[None] | None = None
        self.closed = False
        self._port = 0
        self._accepted_changed = asyncio.Condition()

    @property
    def port(self) -> int:
        assert self._port, "the proxy is not started"
        return self._port

    def url(self, amqp_url: str) -> str:
        """``amqp_url`` with its host and port replaced by the proxy's."""
        parts = urlsplit(amqp_url)
        userinfo = parts.netloc.rpartition("@")[0]
        netloc = f"{userinfo}@127.0.0.1:{self.port}" if userinfo else f"127.0.0.1:{self.port}"
        return urlunsplit(parts._replace(netloc=netloc))

    async def start(self) -> TcpProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self._port = int(self._server.sockets[0].getsockname()[1])
        self._timer = asyncio.get_running_loop().call_later(self.lifetime, self._expire)
        return self

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.closed or len(self.links) >= self.max_connections:
            self.refused += 1
            writer.close()
            return
        link = Link(self, (reader, writer))
        self.links.add(link)
        async with self._accepted_changed:
            self.accepted += 1
            self._accepted_changed.notify_all()
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await link.run()
        except asyncio.CancelledError:
            pass  # the top of a server callback task: asyncio would log a cancelled one as an error
        finally:
            self.links.discard(link)
            self._tasks.discard(task)

    async def wait_accepted(self, count: int) -> None:
        """Wait until ``count`` connections have been accepted in all (e.g. a reconnect attempt)."""
        async with self._accepted_changed:
            await self._accepted_changed.wait_for(lambda: self.accepted >= count)

    def cut(self) -> None:
        """Silently stop moving bytes, both ways, on every link; keep the sockets open."""
        self.flowing.clear()

    def heal(self) -> None:
        self.flowing.set()

    def reset(self) -> None:
        """Close every current connection (new ones are still accepted)."""
        for link in list(self.links):
            link.close()

    def _expire(self) -> None:
        self._expired = asyncio.ensure_future(self.close())

    async def close(self) -> None:
        """Stop listening, close every connection and wait (briefly) for the link tasks to end."""
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
        if self._server is not None:
            self._server.close()
        self.reset()
        self.flowing.set()  # let every pump see its closed sockets and end
        tasks = list(self._tasks)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=2.0)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=1.0)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)

    async def __aenter__(self) -> TcpProxy:
        return await self.start()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
