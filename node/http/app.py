"""The console's Starlette application and the uvicorn server that runs it on a thread of the node's process.

:class:`ConsoleServer` binds ``node.bind`` : ``node.http.port`` itself (so a taken port fails the node's start at
once, and port 0 gives a free one whose number goes into the run file), serves HTTPS with the ``node.tls``
context when ``node.http.tls`` is set (the same context as the MRD TLS port: TLS 1.2 or newer, client
certificates as ``node.tls`` says), and stops with the node (:meth:`ConsoleServer.stop`).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from typing import Any

from starlette.applications import Starlette
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from node.http.views import HERE, AuthRequired, BadRequest, Console, Forbidden

log = logging.getLogger("recon-node.http")

_CSP = (
    "default-src 'self'; img-src 'self'; style-src 'self'; script-src 'self'; object-src 'none'; "
    "base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
)


class SecurityHeaders:
    """Headers on every answer: no framing, no sniffing, a strict content policy; HSTS over TLS."""

    def __init__(self, app: ASGIApp, tls: bool) -> None:
        self.app = app
        self.headers = [
            (b"x-content-type-options", b"nosniff"),
            (b"x-frame-options", b"DENY"),
            (b"referrer-policy", b"same-origin"),
            (b"content-security-policy", _CSP.encode()),
        ]
        if tls:
            self.headers.append((b"strict-transport-security", b"max-age=31536000"))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = list(message.get("headers", [])) + self.headers
            await send(message)

        await self.app(scope, receive, send_with_headers)


def create_app(service: Any) -> Starlette:
    """The console for ``service`` (a :class:`~node.service.NodeService`: its store, egress, config)."""
    c = Console(service)
    routes = [
        Route("/health", c.health),
        Route("/ready", c.ready),
        Route("/metrics", c.metrics),
        Route("/login", c.login_form, methods=["GET"]),
        Route("/login", c.login, methods=["POST"]),
        Route("/logout", c.logout, methods=["POST"]),
        Route("/", c.root),
        Route("/jobs", c.jobs_page),
        Route("/jobs/{job_id}", c.job_page),
        Route("/jobs/{job_id}/preview/{kind}.png", c.preview),
        Route("/jobs/{job_id}/{action}", c.action_page, methods=["POST"]),
        Route("/peers", c.peers_page),
        Route("/api/jobs", c.api_jobs),
        Route("/api/jobs/{job_id}", c.api_job),
        Route("/api/jobs/{job_id}/{action}", c.action_api, methods=["POST"]),
        Route("/api/peers", c.api_peers),
        Mount("/static", StaticFiles(directory=str(HERE / "static")), name="static"),
    ]
    app = Starlette(
        routes=routes,
        exception_handlers={
            AuthRequired: c.on_auth_required,
            Forbidden: c.on_forbidden,
            BadRequest: c.on_bad_request,
        },
    )
    app.state.console = c
    app.add_middleware(SecurityHeaders, tls=c.tls)
    return app


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(f"the console cannot listen on {host}:{port} ({e.strerror or e}); change node.http.port") from e
    sock.set_inheritable(True)
    return sock


class ConsoleServer:
    """uvicorn on a daemon thread, serving :func:`create_app` (see the module docstring)."""

    def __init__(self, service: Any) -> None:
        self.service = service
        self.server: Any = None
        self.thread: threading.Thread | None = None
        self._sock: socket.socket | None = None
        self.port: int | None = None

    @property
    def scheme(self) -> str:
        http = self.service.cfg.node.http
        return "https" if http is not None and http.tls else "http"

    def start(self, timeout: float = 15.0) -> ConsoleServer:
        import uvicorn

        cfg = self.service.cfg
        http = cfg.node.http
        assert http is not None
        app = create_app(self.service)
        ssl_ctx = None
        if http.tls:
            from node.ingest.mrd_server import tls_server_context

            ssl_ctx = tls_server_context(cfg)
        self._sock = _bind(cfg.node.bind, http.port)
        self.port = int(self._sock.getsockname()[1])
        config = uvicorn.Config(
            app,
            log_config=None,  # the node's logging as it is
            access_log=False,
            lifespan="off",
            proxy_headers=False,
            server_header=False,
            timeout_graceful_shutdown=3,
            timeout_keep_alive=30,
            limit_concurrency=64,
        )
        config.load()
        config.ssl = ssl_ctx  # the node's own TLS context (not uvicorn's default ciphers)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self._sock]}, name="recon-node-http", daemon=True
        )
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the web console did not start; see the log above")
            time.sleep(0.02)
        log.info("console on %s://%s:%d/", self.scheme, cfg.node.bind, self.port)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        if self.server is not None:
            self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(timeout)
            if self.thread.is_alive() and self.server is not None:
                self.server.force_exit = True
                self.thread.join(2.0)
        if self._sock is not None:
            try:
                self._sock.close()
            except OSError:
                pass
