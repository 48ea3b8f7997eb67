"""/metrics and /healthz on loopback, stdlib http.server in a thread.

Why: Prometheus scrapes and service managers probe the daemon without any extra
dependency; binding to 127.0.0.1 by default keeps it off the network.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

from .errors import CoordinatorError
from .metrics import Metrics

HealthCheck = Callable[[], dict[str, bool]]
# Extra GET routes (e.g. coordinator.tlog_http): path -> (status, body, content type), None = not mine.
Routes = Callable[[str], "tuple[int, bytes, str] | None"]


class StatusServer:
    """Serves metrics text and a JSON health report (503 when any check fails)."""

    def __init__(self, host: str, port: int, metrics: Metrics, health: HealthCheck,
                 routes: Routes | None = None) -> None:
        self.metrics = metrics
        self.health = health
        self.routes = routes
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server API
                if self.path.split("?")[0] == "/metrics":
                    body = server.metrics.render().encode()
                    self._send(200, body, "text/plain; version=0.0.4; charset=utf-8")
                elif self.path.split("?")[0] == "/healthz":
                    checks = server.health()
                    ok = all(checks.values())
                    body = json.dumps({"ok": ok, "checks": checks}).encode()
                    self._send(200 if ok else 503, body, "application/json")
                elif server.routes is not None and (found := server.routes(self.path)) is not None:
                    self._send(*found)
                else:
                    self._send(404, b"not found: try /metrics or /healthz\n", "text/plain")

            def _send(self, code: int, body: bytes, ctype: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:  # quiet: scrapes every few seconds
                return

        try:
            self.httpd = ThreadingHTTPServer((host, port), Handler)
        except OSError as exc:
            raise CoordinatorError(
                f"cannot serve metrics on {host}:{port} ({exc.strerror}): change http.port in coordinator.toml"
            ) from None
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="status-http", daemon=True)

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    def start(self) -> "StatusServer":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
