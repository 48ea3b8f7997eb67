"""The coordinator's HTTP port: /metrics, /healthz, the fleet page, and routes others add.

Why stdlib http.server in a thread: Prometheus scrapes, service managers probe and an
operator opens a page without any web framework; binding to 127.0.0.1 by default keeps
it off the network.

Extending: `server.route("/path", handler)` for one path, `server.route("/prefix/",
handler)` (trailing slash) for everything below it. A handler takes a `Request` and
returns a `Response`; it runs in its own thread per request.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol
from urllib.parse import parse_qs, urlsplit

from .errors import CoordinatorError

log = logging.getLogger("edgeledger.coordinator.http")


@dataclass(frozen=True)
class Request:
    path: str
    query: dict[str, list[str]]


@dataclass
class Response:
    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def json(cls, status: int, value: Any) -> Response:
        return cls(status, json.dumps(value, indent=1).encode(), "application/json")


Handler = Callable[[Request], Response]


class MetricsSource(Protocol):
    content_type: str

    def render(self) -> bytes: ...


# Headers on every answer: the pages show attacker-influenced strings (agent ids,
# quarantine details); even escaped, forbid scripts and framing outright.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; img-src data:; base-uri 'none'; "
                               "form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


class StatusServer:
    """Routes GET requests to handlers; 404 lists what exists."""

    def __init__(self, host: str, port: int, metrics: MetricsSource | None = None,
                 health: Callable[[], tuple[int, dict[str, Any]]] | None = None) -> None:
        self._routes: dict[str, Handler] = {}
        self._prefixes: dict[str, Handler] = {}
        if metrics is not None:
            self.route("/metrics", lambda _req: Response(200, metrics.render(), metrics.content_type))
        if health is not None:
            self.route("/healthz", lambda _req: Response.json(*health()))
        server = self

        class RequestHandler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self._answer(server.dispatch(self.path))

            def do_HEAD(self) -> None:
                self._answer(server.dispatch(self.path), body=False)

            def _answer(self, resp: Response, body: bool = True) -> None:
                self.send_response(resp.status)
                self.send_header("Content-Type", resp.content_type)
                self.send_header("Content-Length", str(len(resp.body)))
                for name, value in {**SECURITY_HEADERS, **resp.headers}.items():
                    self.send_header(name, value)
                self.end_headers()
                if body:
                    self.wfile.write(resp.body)

            def log_message(self, *args: object) -> None:  # quiet: scrapes every few seconds
                return

        try:
            self.httpd = ThreadingHTTPServer((host, port), RequestHandler)
        except OSError as exc:
            raise CoordinatorError(
                f"cannot serve metrics on {host}:{port} ({exc.strerror}): change http.port in coordinator.toml"
            ) from None
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="status-http", daemon=True)

    def route(self, path: str, handler: Handler) -> None:
        """Serve `path` (exact), or every path below it when it ends with "/" (and is not "/")."""
        if path.endswith("/") and path != "/":
            self._prefixes[path] = handler
        else:
            self._routes[path] = handler

    def dispatch(self, raw_path: str) -> Response:
        parts = urlsplit(raw_path)
        request = Request(parts.path, parse_qs(parts.query))
        handler = self._routes.get(parts.path)
        if handler is None:
            for prefix in sorted(self._prefixes, key=len, reverse=True):
                if parts.path.startswith(prefix):
                    handler = self._prefixes[prefix]
                    break
        if handler is None:
            known = ", ".join(sorted([*self._routes, *(p + "..." for p in self._prefixes)]))
            return Response(404, f"not found: try {known}\n".encode())
        try:
            return handler(request)
        except Exception:
            log.exception("HTTP handler for %s failed", parts.path)
            return Response(500, b"internal error: see the coordinator log\n")

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    def start(self) -> StatusServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
