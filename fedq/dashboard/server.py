"""``fedq dashboard``: serve a run folder's views over HTTP (the stdlib's threading server).

Two routes: ``/`` the page (CSS and JS inlined), ``/api/data`` the document it polls, built
afresh from the run folder on every request. Bound to 127.0.0.1 by default, where it answers 403 to a
request whose ``Host`` is not the loopback's (DNS rebinding); bound to any other address it asks
every request for a token (``?token=`` or ``Authorization: Bearer``), else 401.
"""

from __future__ import annotations

import hmac
import json
import re
import secrets
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

from fedq.dashboard import page
from fedq.dashboard.data import snapshot
from fedq.dashboard.live import QueueProbe
from fedq.dashboard.source import read_records

LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8642


def needs_token(host: str) -> bool:
    """Bound anywhere but the loopback, the dashboard shows a job to the network: ask a token."""
    return host not in LOOPBACK


def token_for(host: str, given: str | None) -> str | None:
    """The token requests must carry: the one given, else one made up when ``host`` needs one."""
    if given:
        return given
    return secrets.token_urlsafe(18) if needs_token(host) else None


def authorized(token: str | None, target: str, headers: Mapping[str, str]) -> bool:
    """Does a request for ``target`` (path and query) with ``headers`` carry ``token``? No token
    set: every request does."""
    if token is None:
        return True
    offered = parse_qs(urlsplit(target).query).get("token", [])
    auth = headers.get("Authorization") or ""
    if auth.startswith("Bearer "):
        offered.append(auth[len("Bearer ") :].strip())
    return any(hmac.compare_digest(o.encode(), token.encode()) for o in offered)


_LOOPBACK_HOST = re.compile(r"(127\.0\.0\.1|localhost|\[::1\])(:[0-9]{1,5})?")


def host_allowed(bound: str, host_header: str | None) -> bool:
    """May a request with this ``Host`` header be served by a dashboard bound to ``bound``? Bound to
    the loopback (no token), only a request addressed to the loopback by name is: a web page whose
    own name its DNS rebinds to 127.0.0.1 still sends that name (DNS rebinding). Bound elsewhere, the
    token guards it."""
    if needs_token(bound):
        return True
    return _LOOPBACK_HOST.fullmatch((host_header or "").strip().lower()) is not None


@dataclass
class Dashboard:
    """What a dashboard serves: a run folder, and for a live job a look at its queues."""

    run_dir: Path
    probe: QueueProbe | None = None
    token: str | None = None
    poll_ms: int = 2000

    def document(self) -> dict[str, Any]:
        return snapshot(read_records(self.run_dir, self.probe.latest if self.probe else None), time.time())


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "fedq-dashboard"

    def do_GET(self) -> None:
        dash = self.server.dashboard
        if not host_allowed(str(self.server.server_address[0]), self.headers.get("Host")):
            self._send(HTTPStatus.FORBIDDEN, b"this dashboard answers to 127.0.0.1, localhost or [::1] only\n", "text/plain")
            return
        if not authorized(dash.token, self.path, {"Authorization": self.headers.get("Authorization", "")}):
            self._send(
                HTTPStatus.UNAUTHORIZED,
                b"a token is needed: open the URL fedq dashboard printed\n",
                "text/plain",
            )
            return
        path = urlsplit(self.path).path
        if path in ("/", "/index.html"):
            self._send(HTTPStatus.OK, page.render(None, dash.poll_ms).encode(), "text/html; charset=utf-8")
        elif path == "/api/data":
            self._send(HTTPStatus.OK, json.dumps(dash.document(), allow_nan=False).encode(), "application/json")
        else:
            self._send(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain")

    def _send(self, status: HTTPStatus, body: bytes, kind: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header(
            "Content-Security-Policy",
            "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'",
        )
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # quiet: the terminal shows the URL only
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], dashboard: Dashboard) -> None:
        self.dashboard = dashboard
        if ":" in address[0]:
            import socket

            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)


class Running:
    """A dashboard serving from a thread; ``url`` opens it (with the token when one is needed)."""

    def __init__(self, dashboard: Dashboard, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> None:
        self.dashboard = dashboard
        self.server = _Server((host, port), dashboard)
        self.host, self.port = host, int(self.server.server_address[1])
        self.thread = threading.Thread(
            target=self.server.serve_forever,
            kwargs={"poll_interval": 0.1},
            name="fedq-dashboard",
            daemon=True,
        )
        self.thread.start()

    @property
    def url(self) -> str:
        shown = f"[{self.host}]" if ":" in self.host else self.host
        query = f"?token={quote(self.dashboard.token)}" if self.dashboard.token else ""
        return f"http://{shown}:{self.port}/{query}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        if self.dashboard.probe is not None:
            self.dashboard.probe.stop()


def run_dir_of(target: str, settings: Any) -> tuple[Path, Any]:
    """The run folder (or a job's --out folder) of RUN_OR_JOB, and the settings that reach its broker
    (a run folder's own: its namespace, job and capabilities)."""
    from fedq.audit import settings_for
    from fedq.dashboard.source import check_run_dir, read_json

    job_settings = settings_for(target, settings)
    run_dir = Path(target) if (Path(target) / "config.json").exists() else job_settings.out_dir
    check_run_dir(run_dir)
    saved = read_json(run_dir / "config.json").get("settings", {})
    if saved.get("capabilities"):
        from dataclasses import replace

        job_settings = replace(job_settings, capabilities=str(saved["capabilities"]))
    return run_dir, job_settings


def start(
    target: str,
    settings: Any,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    token: str | None = None,
    broker: bool = True,
    poll_ms: int = 2000,
) -> Running:
    """A dashboard of RUN_OR_JOB serving from a thread; ``broker``: look at a live job's queues."""
    run_dir, job_settings = run_dir_of(target, settings)
    dashboard = Dashboard(run_dir, token=token_for(host, token), poll_ms=poll_ms)
    if broker:
        from fedq.dashboard.source import processes

        def live() -> bool:
            return any(p.alive for p in processes(run_dir))

        dashboard.probe = QueueProbe(job_settings, wanted=live).start()
    return Running(dashboard, host, port)


def run(target: str, settings: Any, host: str, port: int, token: str | None, broker: bool) -> None:
    """``fedq dashboard``: serve until interrupted."""
    running = start(target, settings, host, port, token, broker)
    print(f"fedq dashboard of {running.dashboard.run_dir}: {running.url}", flush=True)
    if running.dashboard.token and not token:
        print("bound beyond this machine: the token in that URL is required (401 without it)", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        running.close()
