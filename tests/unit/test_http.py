"""The HTTP server against real sockets on port 0."""

from __future__ import annotations

import asyncio

import orjson
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from armguard.daemon.health import Health
from armguard.daemon.http import HttpServer, Response
from armguard.daemon.metrics import GuardrailSample, Metrics
from armguard.daemon.settings import HttpSettings


async def request(port: int, raw: bytes) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        await writer.drain()
        return await asyncio.wait_for(read_response(reader), 5.0)
    finally:
        writer.close()
        await writer.wait_closed()


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        if line:
            k, _, v = line.partition(":")
            headers[k.lower()] = v.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return status, headers, body


def get(path: str, extra: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{extra}\r\n".encode()


@pytest.fixture
def registry():
    return CollectorRegistry()


@pytest.fixture
def health():
    return Health()


@pytest.fixture
async def server(registry, health):
    s = HttpServer(HttpSettings(port=0), registry, health, read_timeout_s=0.5, idle_timeout_s=0.5)
    await s.start()
    try:
        yield s
    finally:
        await s.stop()


async def test_port_zero_binds_a_free_port(server):
    assert isinstance(server.port, int) and server.port > 0


async def test_metrics_in_prometheus_text_format(server, registry):
    m = Metrics(registry)
    m.records_consumed.labels(topic="telemetry").inc(7)
    m.set_guardrail_provider(
        lambda: [
            GuardrailSample(
                experiment="e", arm="b", guardrail="g", test="mean", state="breach", estimate=1.5
            )
        ]
    )
    status, headers, body = await request(server.port, get("/metrics"))
    assert status == 200
    assert headers["content-type"].startswith("text/plain; version=0.0.4")
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    consumed = families["armguard_records_consumed"].samples[0]
    assert consumed.labels == {"topic": "telemetry"} and consumed.value == 7
    states = {s.labels["state"]: s.value for s in families["armguard_guardrail_state"].samples}
    assert states["breach"] == 1 and states["ok"] == 0


async def test_healthz_follows_heartbeats(registry):
    now = [0.0]
    health = Health(stall_after_s=5, clock=lambda: now[0])
    async with HttpServer(HttpSettings(port=0), registry, health) as s:
        health.beat("ingest")
        status, _, body = await request(s.port, get("/healthz"))
        assert status == 200 and orjson.loads(body)["live"] is True
        now[0] = 6
        status, _, body = await request(s.port, get("/healthz"))
        assert status == 503 and orjson.loads(body)["loops"]["ingest"]["ok"] is False


async def test_readyz_follows_components(server, health):
    assert (await request(server.port, get("/readyz")))[0] == 503
    health.set_ready("ingest", True)
    assert (await request(server.port, get("/readyz")))[0] == 200
    health.set_ready("evaluate", False)
    status, _, body = await request(server.port, get("/readyz"))
    assert status == 503
    assert orjson.loads(body)["components"] == {"evaluate": False, "ingest": True}


async def test_unknown_path_404_and_wrong_method_405(server):
    assert (await request(server.port, get("/nope")))[0] == 404
    status, headers, _ = await request(
        server.port, b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
    )
    assert status == 405 and headers["allow"] == "GET, HEAD"


async def test_absolute_form_target_is_accepted(server):
    assert (await request(server.port, get("http://x:1/healthz?a=b")))[0] == 200


async def test_head_has_no_body(server):
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"HEAD /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    await writer.wait_closed()
    head, _, rest = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"Content-Length: " in head and rest == b""


async def test_keep_alive_serves_several_requests(server):
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        for _ in range(3):
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            status, headers, _ = await asyncio.wait_for(read_response(reader), 5)
            assert status == 200 and headers["connection"] == "keep-alive"
    finally:
        writer.close()
        await writer.wait_closed()


async def test_oversized_head_431(server):
    raw = b"GET /metrics HTTP/1.1\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n"
    assert (await request(server.port, raw))[0] == 431


async def test_oversized_body_413_and_chunked_501(server):
    raw = b"GET /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 999999\r\n\r\n"
    assert (await request(server.port, raw))[0] == 413
    raw = b"GET /metrics HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    assert (await request(server.port, raw))[0] == 501


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"GARBAGE\r\n\r\n", 400),
        (b"GET /metrics HTTP/2.0\r\n\r\n", 505),
        (b"GET /metrics HTTP/1.1\r\nno colon here\r\n\r\n", 400),
        (b"GET metrics HTTP/1.1\r\n\r\n", 400),
        (b"OPTIONS * HTTP/1.1\r\n\r\n", 400),
        (b"GET /metrics HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400),
    ],
)
async def test_malformed_requests_400(server, raw, status):
    assert (await request(server.port, raw))[0] == status


async def test_slow_client_is_cut_off(server):
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"GET /metrics HTTP/1.1\r\n")  # never finishes the head
    data = await asyncio.wait_for(reader.read(), 5)  # the server closes after read_timeout_s
    assert data == b""
    writer.close()
    await writer.wait_closed()


async def test_handler_error_is_500_and_server_survives(server):
    def boom(request):
        raise RuntimeError("boom")

    server.add_route("/boom", boom)
    assert (await request(server.port, get("/boom")))[0] == 500
    assert (await request(server.port, get("/healthz")))[0] == 200


async def test_async_route_and_status_api(registry, health):
    class Daemon:
        def status(self):
            return {"experiments": ["e"]}

    async with HttpServer(HttpSettings(port=0), registry, health, status=Daemon()) as s:

        async def echo(req):
            return Response.json({"q": req.query, "body": req.body.decode()})

        s.add_route("/echo", echo, methods=["POST"])
        status, _, body = await request(s.port, get("/status"))
        assert status == 200 and orjson.loads(body) == {"experiments": ["e"]}
        raw = b"POST /echo?x=1 HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi"
        status, _, body = await request(s.port, raw)
        assert status == 200 and orjson.loads(body) == {"q": {"x": ["1"]}, "body": "hi"}


async def test_bearer_token_guards_all_but_probes(registry, health):
    settings = HttpSettings(port=0, bearer_token="t0ken")
    async with HttpServer(settings, registry, health) as s:
        status, headers, _ = await request(s.port, get("/metrics"))
        assert status == 401 and headers["www-authenticate"].startswith("Bearer")
        assert (await request(s.port, get("/metrics", "Authorization: Bearer wrong\r\n")))[0] == 401
        assert (await request(s.port, get("/metrics", "Authorization: Bearer t0ken\r\n")))[0] == 200
        assert (await request(s.port, get("/healthz")))[0] == 200


async def test_connection_cap(registry, health):
    async with HttpServer(HttpSettings(port=0), registry, health, max_connections=1) as s:
        r1, w1 = await asyncio.open_connection("127.0.0.1", s.port)
        w1.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await asyncio.wait_for(read_response(r1), 5))[0] == 200  # held open
        assert (await request(s.port, get("/healthz")))[0] == 503
        w1.close()
        await w1.wait_closed()


async def test_stop_closes_open_connections_and_is_idempotent(registry, health):
    s = HttpServer(HttpSettings(port=0), registry, health, idle_timeout_s=60)
    await s.start()
    reader, writer = await asyncio.open_connection("127.0.0.1", s.port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    await asyncio.wait_for(read_response(reader), 5)
    await asyncio.wait_for(s.stop(), 5)
    await s.stop()
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()
    await writer.wait_closed()
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", s.port)


async def test_start_twice_is_an_error(server):
    with pytest.raises(RuntimeError, match="already started"):
        await server.start()


async def test_health_exported_as_metrics_while_serving(registry, health):
    health.set_ready("ingest", False)
    health.beat("ingest")
    async with HttpServer(HttpSettings(port=0), registry, health):
        assert registry.get_sample_value("armguard_ready") == 0
        assert registry.get_sample_value("armguard_live") == 1
        assert registry.get_sample_value("armguard_component_ready", {"component": "ingest"}) == 0
        assert (
            registry.get_sample_value("armguard_loop_seconds_since_beat", {"loop": "ingest"}) >= 0
        )
        health.set_ready("ingest", True)
        assert registry.get_sample_value("armguard_ready") == 1
    assert registry.get_sample_value("armguard_ready") is None  # unregistered on stop
    async with HttpServer(HttpSettings(port=0), registry, health):  # and can register again
        assert registry.get_sample_value("armguard_ready") == 1


async def test_port_in_use_fails_cleanly(server, registry, health):
    other = HttpServer(HttpSettings(port=server.port), CollectorRegistry(), health)
    with pytest.raises(OSError):
        await other.start()
    assert other.port is None


async def test_prefix_routes(server):
    async def one(req):
        return Response.json({"experiment": req.path.removeprefix("/status/")})

    server.add_route("/status/", one, prefix=True)
    server.add_route("/status/special", lambda req: Response.text("special\n"))
    status, _, body = await request(server.port, get("/status/ranker-v2"))
    assert status == 200 and orjson.loads(body) == {"experiment": "ranker-v2"}
    assert (await request(server.port, get("/status/special")))[2] == b"special\n"
    assert (await request(server.port, get("/status/")))[0] == 404  # nothing below the prefix
    assert "/status/" in server.routes
    with pytest.raises(ValueError, match="ends with"):
        server.add_route("/x", one, prefix=True)
