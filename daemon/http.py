"""The daemon's small HTTP/1.1 server: ``/metrics``, ``/healthz``, ``/readyz`` (and ``/status``).

Built on ``asyncio.start_server`` from the standard library, because the surface is a handful of
GET routes for Prometheus and the orchestrator's probes. It runs on the daemon's event loop, so a
scrape reads the evaluator's state without locks, and it is defensive as anything listening on a
port must be: bounded request head and body, read and idle timeouts, a connection cap, 404/405/
431/413/505 answers, and handler errors answered with 500 without killing the server.

Routes live in a table (:meth:`HttpServer.add_route`), so a status or admin API is one call away.
When ``http.bearer_token`` is set, every route except the probes needs
``Authorization: Bearer <token>``.

Examples
--------
>>> import asyncio
>>> from prometheus_client import CollectorRegistry
>>> from armguard.daemon.health import Health
>>> from armguard.daemon.settings import HttpSettings
>>> async def demo():
...     server = HttpServer(HttpSettings(port=0), CollectorRegistry(), Health())
...     await server.start()
...     try:
...         reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
...         writer.write(b"GET /nowhere HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n\\r\\n")
...         status_line = await reader.readline()
...         writer.close()
...         await writer.wait_closed()
...         return status_line
...     finally:
...         await server.stop()
>>> asyncio.run(demo())
b'HTTP/1.1 404 Not Found\\r\\n'
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import orjson
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from .health import Health
from .settings import HttpSettings

__all__ = ["HttpServer", "Request", "Response"]

log = logging.getLogger("armguard.http")

# The classic text format. prometheus_client now labels it version=1.0.0 (its UTF-8 name escaping);
# every name armguard exports is a legacy name, so the body is the 0.0.4 format that every
# Prometheus release, including Debian's, parses.
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass(frozen=True, slots=True)
class Request:
    """One parsed request. Header names are lower case."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes = b""


@dataclass(slots=True)
class Response:
    """What a route returns."""

    status: int = 200
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def text(cls, text: str, status: int = 200) -> Response:
        return cls(status, text.encode(), "text/plain; charset=utf-8")

    @classmethod
    def json(cls, data: Any, status: int = 200) -> Response:
        return cls(status, orjson.dumps(data) + b"\n", "application/json")


Handler = Callable[[Request], Awaitable[Response] | Response]


@dataclass(frozen=True, slots=True)
class _Route:
    handler: Handler
    methods: frozenset[str]
    public: bool


class _Reject(Exception):
    """A request the server answers with an error and then closes the connection."""

    def __init__(self, status: int, message: str = ""):
        self.status = status
        self.message = message or HTTPStatus(status).phrase
        super().__init__(self.message)


class HttpServer:
    """Serve the daemon's HTTP routes on ``settings.host``:``settings.port``.

    Parameters
    ----------
    settings
        The ``http`` section of the settings. Port 0 binds a free port, read back from ``.port``.
    registry
        The registry ``/metrics`` renders.
    health
        The :class:`~armguard.daemon.health.Health` behind ``/healthz`` and ``/readyz``.
    status
        Optional object with a ``status() -> dict`` method (the daemon): served as JSON at
        ``/status``.
    max_request_bytes
        Largest accepted request head and, separately, body.
    read_timeout_s, idle_timeout_s
        Time allowed to send one request once started, and to start the next one on a kept-alive
        connection.
    max_connections
        Open connections beyond this are answered 503 and closed.
    """

    def __init__(
        self,
        settings: HttpSettings,
        registry: CollectorRegistry,
        health: Health,
        status: Any = None,
        *,
        max_request_bytes: int = 16 * 1024,
        read_timeout_s: float = 10.0,
        idle_timeout_s: float = 30.0,
        max_connections: int = 64,
    ):
        self.settings = settings
        self.registry = registry
        self.health = health
        self.status = status
        self.max_request_bytes = max_request_bytes
        self.read_timeout_s = read_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.max_connections = max_connections
        token = settings.bearer_token
        self._token = token.get_secret_value().encode() if token is not None else None
        self._routes: dict[str, _Route] = {}
        self._prefixes: dict[str, _Route] = {}
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._collector: _HealthCollector | None = None
        self.port: int | None = None

        self.add_route("/metrics", self._metrics)
        self.add_route("/healthz", self._healthz, public=True)
        self.add_route("/readyz", self._readyz, public=True)
        if status is not None and callable(getattr(status, "status", None)):
            self.add_route("/status", self._status)
        self.add_route("/", self._index, public=True)

    # -- routes ---------------------------------------------------------------------------------

    def add_route(
        self,
        path: str,
        handler: Handler,
        *,
        methods: Iterable[str] = ("GET",),
        public: bool = False,
        prefix: bool = False,
    ) -> None:
        """Serve ``path`` with ``handler``; GET routes answer HEAD too.

        ``public`` routes skip the bearer token check (the probes must work without it).
        ``prefix`` routes (``path`` ending in ``/``) serve every path below ``path``, e.g.
        ``/status/`` for ``/status/ranker-v2``; the handler reads ``request.path``. Exact routes
        win, then the longest prefix.
        """
        if not path.startswith("/"):
            raise ValueError(f"a route path starts with '/': {path!r}")
        if prefix and not path.endswith("/"):
            raise ValueError(f"a prefix route ends with '/': {path!r}")
        allowed = {m.upper() for m in methods}
        if "GET" in allowed:
            allowed.add("HEAD")
        route = _Route(handler, frozenset(allowed), public)
        if prefix:
            self._prefixes[path] = route
        else:
            self._routes[path] = route

    def _find(self, path: str) -> _Route | None:
        route = self._routes.get(path)
        if route is not None:
            return route
        for p in sorted(self._prefixes, key=len, reverse=True):
            if path.startswith(p) and len(path) > len(p):
                return self._prefixes[p]
        return None

    @property
    def routes(self) -> list[str]:
        """The served paths, sorted (prefix routes end in ``/``)."""
        return sorted([*self._routes, *self._prefixes])

    def _metrics(self, request: Request) -> Response:
        # Rendered on the event loop on purpose: collectors read the evaluator's live state.
        return Response(200, generate_latest(self.registry), METRICS_CONTENT_TYPE)

    def _healthz(self, request: Request) -> Response:
        report = self.health.report()
        return Response.json(report, 200 if report["live"] else 503)

    def _readyz(self, request: Request) -> Response:
        report = self.health.report()
        return Response.json(report, 200 if report["ready"] else 503)

    def _status(self, request: Request) -> Response:
        return Response.json(self.status.status())

    def _index(self, request: Request) -> Response:
        return Response.text("armguard\n" + "".join(f"{p}\n" for p in self.routes))

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Bind and start serving; ``.port`` is the bound port afterwards."""
        if self._server is not None:
            raise RuntimeError("the HTTP server is already started")
        # The probes' view as metrics too, so alert rules can see "not ready" (a probe cannot).
        self._collector = _HealthCollector(self.health)
        self.registry.register(self._collector)
        try:
            self._server = await asyncio.start_server(
                self._on_connection,
                host=self.settings.host,
                port=self.settings.port,
                limit=self.max_request_bytes,
            )
        except BaseException:
            self.registry.unregister(self._collector)
            self._collector = None
            raise
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("serving /metrics, /healthz, /readyz on %s:%d", self.settings.host, self.port)

    async def stop(self) -> None:
        """Stop listening and close every open connection."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for task in list(self._connections):
            task.cancel()
        if self._connections:
            await asyncio.gather(*self._connections, return_exceptions=True)
        await server.wait_closed()
        if self._collector is not None:
            self.registry.unregister(self._collector)
            self._collector = None

    async def __aenter__(self) -> HttpServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- the protocol ---------------------------------------------------------------------------

    async def _on_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            if len(self._connections) > self.max_connections:
                await self._send(writer, Response.text("too many connections\n", 503), False, "GET")
                return
            await self._serve(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError):
            pass
        except asyncio.CancelledError:
            pass  # the server is stopping
        finally:
            self._connections.discard(task)
            writer.close()
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await writer.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        first = True
        while True:
            # The first request must start within the read timeout; later ones within the idle one.
            try:
                head = await asyncio.wait_for(
                    self._read_head(reader),
                    self.read_timeout_s if first else self.idle_timeout_s,
                )
            except _Reject as exc:
                await self._send(writer, _error(exc), False, "GET")
                return
            if head is None:
                return  # the client closed the connection between requests
            first = False
            try:
                request, keep_alive = await asyncio.wait_for(
                    self._parse(head, reader), self.read_timeout_s
                )
            except _Reject as exc:
                await self._send(writer, _error(exc), False, "GET")
                return
            response = await self._dispatch(request)
            await self._send(writer, response, keep_alive, request.method)
            if not keep_alive:
                return

    async def _read_head(self, reader: asyncio.StreamReader) -> bytes | None:
        try:
            return await reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError:
            raise _Reject(431) from None
        except asyncio.IncompleteReadError as exc:
            if exc.partial.strip():
                raise _Reject(400, "incomplete request") from None
            return None
        except ValueError:  # the limit was exceeded while the separator was found
            raise _Reject(431) from None

    async def _parse(self, head: bytes, reader: asyncio.StreamReader) -> tuple[Request, bool]:
        try:
            text = head.decode("latin-1")
        except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes every byte
            raise _Reject(400) from None
        lines = text.split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3:
            raise _Reject(400, "malformed request line")
        method, target, version = parts
        if version not in ("HTTP/1.1", "HTTP/1.0"):
            raise _Reject(505)
        if not method.isalpha() or not method.isupper():
            raise _Reject(400, "malformed method")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if not line:
                continue
            name, sep, value = line.partition(":")
            if not sep or not name or name != name.strip():
                raise _Reject(400, "malformed header")
            headers[name.lower()] = value.strip()
        if "transfer-encoding" in headers:
            raise _Reject(501, "chunked request bodies are not supported")
        length_text = headers.get("content-length", "0")
        if not length_text.isdigit():
            raise _Reject(400, "bad content-length")
        length = int(length_text)
        if length > self.max_request_bytes:
            raise _Reject(413)
        body = await reader.readexactly(length) if length else b""
        split = urlsplit(target)
        if not split.path.startswith("/"):
            raise _Reject(400, "the request target must be a path")
        connection = headers.get("connection", "").lower()
        if version == "HTTP/1.1":
            keep_alive = "close" not in connection
        else:
            keep_alive = "keep-alive" in connection
        request = Request(method, unquote(split.path), parse_qs(split.query), headers, body)
        return request, keep_alive

    async def _dispatch(self, request: Request) -> Response:
        route = self._find(request.path)
        if route is None:
            return Response.text("not found\n", 404)
        if request.method not in route.methods:
            response = Response.text("method not allowed\n", 405)
            response.headers["Allow"] = ", ".join(sorted(route.methods))
            return response
        if not route.public and not self._authorised(request):
            response = Response.text("unauthorised\n", 401)
            response.headers["WWW-Authenticate"] = 'Bearer realm="armguard"'
            return response
        try:
            result = route.handler(request)
            if isinstance(result, Awaitable):
                result = await result
            return result
        except Exception:
            log.exception("HTTP handler for %s failed", request.path)
            return Response.text("internal server error\n", 500)

    def _authorised(self, request: Request) -> bool:
        if self._token is None:
            return True
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            given.strip().encode(), self._token
        )

    async def _send(
        self, writer: asyncio.StreamWriter, response: Response, keep_alive: bool, method: str
    ) -> None:
        reason = HTTPStatus(response.status).phrase
        headers = {
            "Content-Type": response.content_type,
            "Content-Length": str(len(response.body)),
            "Cache-Control": "no-store",
            "Connection": "keep-alive" if keep_alive else "close",
            **response.headers,
        }
        head = f"HTTP/1.1 {response.status} {reason}\r\n" + "".join(
            f"{k}: {v}\r\n" for k, v in headers.items()
        )
        writer.write(head.encode("latin-1") + b"\r\n")
        if method != "HEAD":
            writer.write(response.body)
        await asyncio.wait_for(writer.drain(), self.read_timeout_s)


def _error(exc: _Reject) -> Response:
    return Response.text(exc.message + "\n", exc.status)


class _HealthCollector(Collector):
    """Exports liveness and readiness at scrape time: ``armguard_ready``, ``armguard_live``,
    ``armguard_component_ready{component}`` and ``armguard_loop_seconds_since_beat{loop}``."""

    def __init__(self, health: Health):
        self._health = health

    def describe(self) -> list[GaugeMetricFamily]:
        return self._families({"live": True, "ready": False, "loops": {}, "components": {}})

    def collect(self) -> list[GaugeMetricFamily]:  # type: ignore[override]
        return self._families(self._health.report())

    @staticmethod
    def _families(report: dict[str, Any]) -> list[GaugeMetricFamily]:
        ready = GaugeMetricFamily(
            "armguard_ready", "1 when every component is ready (what /readyz answers)."
        )
        ready.add_metric([], 1.0 if report["ready"] else 0.0)
        live = GaugeMetricFamily(
            "armguard_live", "1 while no loop is stuck (what /healthz answers)."
        )
        live.add_metric([], 1.0 if report["live"] else 0.0)
        components = GaugeMetricFamily(
            "armguard_component_ready",
            "1 when the component can process input (partitions assigned, state restored).",
            labels=["component"],
        )
        for name, ok in report["components"].items():
            components.add_metric([name], 1.0 if ok else 0.0)
        beats = GaugeMetricFamily(
            "armguard_loop_seconds_since_beat",
            "Seconds since the loop last reported progress.",
            labels=["loop"],
        )
        for name, loop in report["loops"].items():
            beats.add_metric([name], float(loop["seconds_since_beat"]))
        return [ready, live, components, beats]
