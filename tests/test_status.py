"""The status server over real HTTP: alone, inside an in-process agent, and in ``xdsfast run``."""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import pytest_asyncio
from conftest import AgentFactory, XdsfastFactory
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import json_format
from prometheus_client.parser import text_string_to_metric_families
from support import connect

from xdsfast import _ext
from xdsfast.agent import Agent
from xdsfast.dns.wiretable import WireNameTable
from xdsfast.nds_pb2 import NameTable
from xdsfast.peers import mesh
from xdsfast.peers.adsclient import AdsClient, Response
from xdsfast.peers.backend import http_get
from xdsfast.peers.controlplane import ControlPlane
from xdsfast.status import PROMETHEUS_CONTENT_TYPE, StatusServer, is_loopback
from xdsfast.typeurls import CLUSTER, LISTENER, NAME_TABLE

MODES = [pytest.param(False, id="sotw"), pytest.param(True, id="delta")]
TIMEOUT = 0.5  # the test server's head/idle timeout: short, so slow clients fail fast


# -- an HTTP client for what http_get will not send ----------------------------------------


async def exchange(
    port: int,
    data: bytes,
    *,
    host: str = "127.0.0.1",
    local_addr: tuple[str, int] | None = None,
    timeout: float = 5.0,
) -> bytes:
    """Send raw bytes, then read until the server closes (``TimeoutError`` if it never does)."""
    reader, writer = await asyncio.open_connection(host, port, local_addr=local_addr)
    try:
        writer.write(data)
        await writer.drain()
        try:
            return await asyncio.wait_for(reader.read(), timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(f"the server kept the connection open past {timeout}s") from None
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


def responses(raw: bytes, *, head_only: bool = False) -> list[tuple[int, dict[str, str], bytes]]:
    """Split a byte stream into (status, lower-cased headers, body) responses."""
    found = []
    while raw:
        head, sep, raw = raw.partition(b"\r\n\r\n")
        assert sep, f"incomplete response head: {head!r}"
        lines = head.decode("latin-1").split("\r\n")
        version, status, _ = lines[0].split(" ", 2)
        assert version == "HTTP/1.1"
        headers = {k.strip().lower(): v.strip() for k, v in (x.split(":", 1) for x in lines[1:])}
        length = 0 if head_only else int(headers["content-length"])
        found.append((int(status), headers, raw[:length]))
        raw = raw[length:]
    return found


def one_response(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    (response,) = responses(raw)
    return response


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a Prometheus text exposition, by exact name and labels."""
    list(text_string_to_metric_families(text))  # the whole text parses
    found = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            match = _SAMPLE.match(line)
            assert match, line
            labels = frozenset(_LABEL.findall(match.group(2) or ""))
            found[(match.group(1), labels)] = float(match.group(3))
    return found


#: ``xdsfast_core_info``'s labels: all cores at once, then each (what ``_ext`` chose).
CORE_LABELS = {"implementation": _ext.summary()} | {
    name.lstrip("_"): kind for name, kind in _ext.implementations().items()
}


def value(
    found: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    return found.get((name, frozenset(labels.items())), float("nan"))


# -- the server alone, with stand-in callables ---------------------------------------------


class Sources:
    """What the server is given; tests change it."""

    def __init__(self) -> None:
        self.reason: str | None = "not ready: warming up"
        self.table: NameTable | None = None
        self.xds: dict[str, Any] = {"streams": []}
        self.fail = False
        self.metrics_text = b"# TYPE up gauge\nup 1\n"

    def ready(self) -> str | None:
        if self.fail:
            raise RuntimeError("boom: secret internals")
        return self.reason

    def metrics(self) -> bytes:
        return self.metrics_text


@pytest_asyncio.fixture
async def sources() -> Sources:
    return Sources()


@pytest_asyncio.fixture
async def make_server(sources: Sources) -> AsyncIterator[Callable[..., Awaitable[StatusServer]]]:
    started: list[StatusServer] = []

    async def start(address: str = "127.0.0.1:0", **options: Any) -> StatusServer:
        server = StatusServer(
            ready=sources.ready,
            metrics=sources.metrics,
            ndsz=lambda: sources.table,
            xds=lambda: sources.xds,
            **{"timeout": TIMEOUT, **options},
        )
        await server.start(address)
        started.append(server)
        return server

    yield start
    for server in started:
        await server.stop()


@pytest_asyncio.fixture
async def server(make_server: Callable[..., Awaitable[StatusServer]]) -> StatusServer:
    return await make_server()


async def test_readiness_is_503_with_the_reason_then_200(
    server: StatusServer, sources: Sources
) -> None:
    status, headers, body = await http_get("127.0.0.1", server.port, "/healthz/ready")
    assert (status, body) == (503, b"not ready: warming up\n")
    assert headers["content-type"].startswith("text/plain")
    sources.reason = None
    status, _, body = await http_get("127.0.0.1", server.port, "/healthz/ready?probe=1")
    assert (status, body) == (200, b"ready\n")


@pytest.mark.parametrize("path", ["/stats/prometheus", "/metrics"])
async def test_metrics_are_prometheus_text(server: StatusServer, path: str) -> None:
    status, headers, body = await http_get("127.0.0.1", server.port, path)
    assert (status, body) == (200, b"# TYPE up gauge\nup 1\n")
    assert headers["content-type"] == PROMETHEUS_CONTENT_TYPE
    assert PROMETHEUS_CONTENT_TYPE == "text/plain; version=0.0.4; charset=utf-8"


async def test_ndsz_is_404_empty_json_without_a_table_and_json_with_one(
    server: StatusServer, sources: Sources
) -> None:
    status, headers, body = await http_get("127.0.0.1", server.port, "/debug/ndsz")
    assert (status, orjson.loads(body)) == (404, {})
    assert headers["content-type"] == "application/json"
    sources.table = NameTable()
    sources.table.table["a.example"].ips.append("10.0.0.1")
    status, _, body = await http_get("127.0.0.1", server.port, "/debug/ndsz")
    assert (status, orjson.loads(body)) == (200, {"table": {"a.example": {"ips": ["10.0.0.1"]}}})


TABLE_HEADERS = (
    "x-xdsfast-dns-table-hosts",
    "x-xdsfast-dns-table-names",
    "x-xdsfast-dns-table-bytes",
)


def table_headers(headers: dict[str, str]) -> tuple[int, ...]:
    """The DNS name table's hosts, names and bytes from a /debug/ndsz response's headers."""
    return tuple(int(headers[name]) for name in TABLE_HEADERS)


async def test_ndsz_reports_the_name_table_size_in_headers_and_a_summary(
    make_server: Callable[..., Awaitable[StatusServer]], sources: Sources
) -> None:
    """The body stays the NameTable's JSON (proto3 JSON decoders refuse unknown fields); hosts,
    names and bytes of the table served, read when each reply is made, come as headers,
    and ``?summary`` answers them alone without rendering the table."""
    stats = [0, 0, 0]
    server = await make_server(ndsz_stats=lambda: tuple(stats))
    for path in ("/debug/ndsz", "/debug/ndsz?summary"):
        status, headers, body = await http_get("127.0.0.1", server.port, path)
        assert (status, body, headers.keys() & set(TABLE_HEADERS)) == (404, b"{}\n", set())
    sources.table = NameTable()
    sources.table.table["a.example"].ips.append("10.0.0.1")
    status, headers, body = await http_get("127.0.0.1", server.port, "/debug/ndsz")
    assert (status, orjson.loads(body)) == (200, {"table": {"a.example": {"ips": ["10.0.0.1"]}}})
    assert table_headers(headers) == (0, 0, 0)  # nothing built yet: zeros, as the gauges
    stats[:] = [1, 6, 4321]
    status, headers, body = await http_get("127.0.0.1", server.port, "/debug/ndsz")
    assert orjson.loads(body) == {"table": {"a.example": {"ips": ["10.0.0.1"]}}}
    assert table_headers(headers) == (1, 6, 4321)  # the same rendering, the figures of now
    for query in ("summary", "summary=1", "x=1&summary"):
        status, headers, body = await http_get("127.0.0.1", server.port, "/debug/ndsz?" + query)
        assert (status, orjson.loads(body)) == (200, {"hosts": 1, "names": 6, "bytes": 4321})
        assert headers["content-type"] == "application/json"
        assert table_headers(headers) == (1, 6, 4321)
    # a table that cannot be rendered: the summary never renders it
    sources.table = WireNameTable(b"\x0a\xff")  # type: ignore[assignment]
    assert (await http_get("127.0.0.1", server.port, "/debug/ndsz?summary"))[0] == 200
    assert (await http_get("127.0.0.1", server.port, "/debug/ndsz"))[0] == 500
    raw = await exchange(
        server.port, b"HEAD /debug/ndsz?summary HTTP/1.1\r\nConnection: close\r\n\r\n"
    )
    ((status, headers, _),) = responses(raw, head_only=True)
    assert raw.endswith(b"\r\n\r\n") and table_headers(headers) == (1, 6, 4321)


async def test_ndsz_without_table_figures_has_no_headers_and_no_summary(
    server: StatusServer, sources: Sources
) -> None:
    sources.table = NameTable()
    status, headers, _ = await http_get("127.0.0.1", server.port, "/debug/ndsz")
    assert status == 200 and not headers.keys() & set(TABLE_HEADERS)
    status, _, body = await http_get("127.0.0.1", server.port, "/debug/ndsz?summary")
    assert (status, body) == (404, b"{}\n")


async def test_xds_dump_is_json(server: StatusServer, sources: Sources) -> None:
    sources.xds = {"streams": [{"id": 3, "types": {}}]}
    status, headers, body = await http_get("127.0.0.1", server.port, "/debug/xds")
    assert (status, orjson.loads(body)) == (200, sources.xds)
    assert headers["content-type"] == "application/json"


async def test_unknown_paths_are_404(server: StatusServer) -> None:
    for path in ("/", "/healthz", "/debug/", "/healthz/ready/", "/debug/pprof"):
        status, _, _ = await http_get("127.0.0.1", server.port, path)
        assert status == 404, path


async def test_other_methods_are_405_and_a_small_body_is_skipped(server: StatusServer) -> None:
    raw = await exchange(
        server.port,
        b"POST /healthz/ready HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
        b"DELETE /stats/prometheus HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    (s1, h1, _), (s2, _, _), (s3, _, body) = responses(raw)
    assert (s1, s2, s3) == (405, 405, 200)
    assert h1["allow"] == "GET, HEAD"
    assert body == b"# TYPE up gauge\nup 1\n"


async def test_head_answers_the_headers_only(server: StatusServer) -> None:
    raw = await exchange(server.port, b"HEAD /metrics HTTP/1.1\r\nConnection: close\r\n\r\n")
    ((status, headers, _),) = responses(raw, head_only=True)
    assert raw.endswith(b"\r\n\r\n")
    assert (status, headers["content-length"]) == (200, str(len(b"# TYPE up gauge\nup 1\n")))


async def test_keep_alive_serves_requests_in_turn_and_http10_closes(server: StatusServer) -> None:
    raw = await exchange(
        server.port,
        b"GET /healthz/ready HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    assert [r[0] for r in responses(raw)] == [503, 200, 404]
    assert responses(raw)[2][1]["connection"] == "close"
    # HTTP/1.0 closes unless asked to keep alive; the server closing ends exchange().
    (status, headers, _) = one_response(
        await exchange(server.port, b"GET /metrics HTTP/1.0\r\n\r\n")
    )
    assert (status, headers["connection"]) == (200, "close")


MALFORMED = [
    pytest.param(b"NONSENSE\r\n\r\n", 400, id="no-spaces"),
    pytest.param(b"GET /healthz/ready\r\n\r\n", 400, id="no-version"),
    pytest.param(b"GET  /healthz/ready HTTP/1.1\r\n\r\n", 400, id="double-space"),
    pytest.param(b"GET healthz/ready HTTP/1.1\r\n\r\n", 400, id="relative-target"),
    pytest.param(b"GET /healthz/ready HTTP/2.0\r\n\r\n", 505, id="http2-version"),
    pytest.param(b"GET /healthz/ready SPDY\r\n\r\n", 400, id="bad-version"),
    pytest.param(b"G(T /healthz/ready HTTP/1.1\r\n\r\n", 400, id="bad-method"),
    pytest.param(b"GET / HTTP/1.1\r\nno colon\r\n\r\n", 400, id="header-without-colon"),
    pytest.param(b"GET / HTTP/1.1\r\nBad Name: x\r\n\r\n", 400, id="space-in-header-name"),
    pytest.param(b"GET / HTTP/1.1\r\nHost : x\r\n\r\n", 400, id="space-before-colon"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400, id="two-hosts"),
    pytest.param(b"GET / HTTP/1.1\r\nX: a\nY: b\r\n\r\n", 400, id="bare-lf"),
    pytest.param(b"GET / HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400, id="negative-length"),
    pytest.param(b"GET / HTTP/1.1\r\nContent-Length: \xb2\r\n\r\n", 400, id="non-ascii-length"),
    pytest.param(b"GET / HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n", 413, id="huge-body"),
    pytest.param(
        b"GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400, id="chunked-body"
    ),
    pytest.param(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400, id="tls-hello"),
]


@pytest.mark.parametrize(("request_bytes", "expected"), MALFORMED)
async def test_malformed_requests_are_refused_and_closed(
    server: StatusServer, request_bytes: bytes, expected: int
) -> None:
    status, headers, body = one_response(await exchange(server.port, request_bytes))
    assert status == expected
    assert headers["connection"] == "close"
    assert b"Traceback" not in body and body.endswith(b"\n")


async def test_an_oversized_head_is_refused(server: StatusServer) -> None:
    big = b"GET /metrics HTTP/1.1\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n"
    status, headers, _ = one_response(await exchange(server.port, big))
    assert (status, headers["connection"]) == (431, "close")
    # Many small headers under the limit are fine.
    many = b"".join(b"X-%d: v\r\n" % i for i in range(200))
    raw = await exchange(
        server.port, b"GET /metrics HTTP/1.1\r\n" + many + b"Connection: close\r\n\r\n"
    )
    assert one_response(raw)[0] == 200


async def test_a_slow_head_gets_408_and_an_idle_client_is_closed(server: StatusServer) -> None:
    started = time.monotonic()
    raw = await exchange(server.port, b"GET /healthz/ready HTTP/1.1\r\nHost: x\r\n", timeout=5)
    assert one_response(raw)[0] == 408
    assert await exchange(server.port, b"", timeout=5) == b""  # closed without a word
    # Both within the server's timeout (TIMEOUT each), far from the client's deadline.
    assert time.monotonic() - started < 4 * TIMEOUT + 1


async def test_a_trickling_client_is_cut_off_at_the_head_deadline(server: StatusServer) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    started = time.monotonic()
    got = b""
    try:
        writer.write(b"GET /metrics HTTP/1.1\r\nX-Slow: ")
        while time.monotonic() - started < 5:  # one more byte each time the server stays quiet
            try:
                chunk = await asyncio.wait_for(reader.read(65536), TIMEOUT / 5)
            except asyncio.TimeoutError:
                writer.write(b"x")
                continue
            got += chunk
            if not chunk or got.endswith(b"\n"):
                break
        got += await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
    assert one_response(got)[0] == 408
    assert time.monotonic() - started < 3 * TIMEOUT


async def test_a_failing_source_is_500_without_details(
    server: StatusServer, sources: Sources
) -> None:
    sources.fail = True
    status, _, body = await http_get("127.0.0.1", server.port, "/healthz/ready")
    assert status == 500
    assert b"boom" not in body and b"Traceback" not in body
    sources.fail = False
    assert (await http_get("127.0.0.1", server.port, "/healthz/ready"))[0] == 503


async def test_an_idle_connection_makes_room_for_a_new_one(
    make_server: Callable[..., Awaitable[StatusServer]],
) -> None:
    """At the cap, the connection waiting longest for a request is closed, not the new one."""
    server = await make_server(max_connections=1, timeout=30.0)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(b"GET /metrics HTTP/1.1\r\n\r\n")  # kept alive: it holds the one slot
        await asyncio.wait_for(reader.readuntil(b"up 1\n"), 5)
        raw = await exchange(server.port, b"GET /metrics HTTP/1.1\r\nConnection: close\r\n\r\n")
        assert one_response(raw)[0] == 200
        assert await asyncio.wait_for(reader.read(), 5) == b""  # the idle one was closed
        assert (server.evicted, server.refused) == (1, 0)
    finally:
        writer.close()


async def test_too_many_busy_connections_are_refused(
    make_server: Callable[..., Awaitable[StatusServer]], sources: Sources
) -> None:
    """When every held connection is busy (here: writing to a client that does not read),
    a new one gets 503 "too many connections"."""
    server = await make_server(max_connections=1, timeout=30.0)
    sources.metrics_text = b"x" * (32 * 1024 * 1024)  # more than the socket buffers take
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", server.port))
    reader, writer = await asyncio.open_connection(sock=sock)
    try:
        writer.write(b"GET /metrics HTTP/1.1\r\n\r\n")
        await asyncio.wait_for(reader.readexactly(1), 5)  # the answer started: it is busy
        status, _, body = one_response(
            await exchange(server.port, b"GET /healthz/ready HTTP/1.1\r\n\r\n")
        )
        assert (status, body) == (503, b"too many connections\n")
        assert (server.evicted, server.refused, server.connections) == (0, 1, 1)
    finally:
        writer.close()


async def test_stop_closes_open_connections(
    make_server: Callable[..., Awaitable[StatusServer]],
) -> None:
    server = await make_server(timeout=30.0)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(b"GET /metrics HTTP/1.1\r\n\r\n")
        await asyncio.wait_for(reader.readuntil(b"up 1\n"), 5)
        port = server.port
        await asyncio.wait_for(server.stop(), 5)
        assert await asyncio.wait_for(reader.read(), 5) == b""
    finally:
        writer.close()
    with pytest.raises(OSError):
        await http_get("127.0.0.1", port, "/metrics", timeout=2)


async def test_a_taken_port_is_a_clear_error(sources: Sources) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        server = StatusServer(
            ready=sources.ready, metrics=sources.metrics, ndsz=lambda: None, xds=dict
        )
        match = rf"^status server cannot listen on 127\.0\.0\.1:{port}: Address already in use$"
        with pytest.raises(OSError, match=match):
            await server.start(f"127.0.0.1:{port}")


@pytest.mark.parametrize(
    ("peer", "loopback"),
    [
        (("127.0.0.1", 1), True),
        (("127.9.8.7", 1), True),
        (("::1", 1, 0, 0), True),
        (("::ffff:127.0.0.1", 1, 0, 0), True),
        (("::ffff:10.0.0.1", 1, 0, 0), False),
        (("10.0.0.1", 1), False),
        (("192.0.2.2", 1), False),
        (("fd00::2", 1, 0, 0), False),
        (("fe80::1%eth0", 1, 0, 2), False),
        (("not an address", 1), False),
        ("/run/some.sock", False),
        (None, False),
    ],
)
def test_is_loopback(peer: Any, loopback: bool) -> None:
    assert is_loopback(peer) is loopback


def non_loopback_address() -> str | None:
    """An IPv4 address of this machine other than loopback that can be bound, if any."""
    candidates: list[str] = []
    with contextlib.suppress(OSError):
        candidates += socket.gethostbyname_ex(socket.gethostname())[2]
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["ip", "-o", "-4", "addr"], capture_output=True, text=True, timeout=5)
        candidates += re.findall(r"\binet (\d+\.\d+\.\d+\.\d+)/", out.stdout)
    for address in candidates:
        if address.startswith("127."):
            continue
        with socket.socket() as probe, contextlib.suppress(OSError):
            probe.bind((address, 0))
            return address
    return None


@pytest.fixture
def outside_address() -> Iterator[str]:
    address = non_loopback_address()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address to be a remote client from")
    yield address


async def test_debug_endpoints_answer_loopback_clients_only(
    make_server: Callable[..., Awaitable[StatusServer]], sources: Sources, outside_address: str
) -> None:
    server = await make_server("0.0.0.0:0")
    sources.table = NameTable()
    for path in ("/debug/ndsz", "/debug/xds"):
        raw = await exchange(
            server.port,
            f"GET {path} HTTP/1.1\r\nConnection: close\r\n\r\n".encode(),
            host=outside_address,
            local_addr=(outside_address, 0),
        )
        status, _, body = one_response(raw)
        assert status == 403, path
        assert b"loopback" in body
        assert (await http_get("127.0.0.1", server.port, path))[0] == 200, path
    # Readiness and metrics are for everyone (the kubelet and Prometheus are not local).
    for path in ("/healthz/ready", "/stats/prometheus"):
        raw = await exchange(
            server.port,
            f"GET {path} HTTP/1.1\r\nConnection: close\r\n\r\n".encode(),
            host=outside_address,
            local_addr=(outside_address, 0),
        )
        assert one_response(raw)[0] in (200, 503), path


# -- inside the agent: a real relay, control plane and ADS client --------------------------


async def get(agent: Agent, path: str) -> tuple[int, bytes]:
    status, _, body = await http_get("127.0.0.1", agent.status.port, path)
    return status, body


async def scrape(agent: Agent) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    status, headers, body = await http_get("127.0.0.1", agent.status.port, "/stats/prometheus")
    assert status == 200 and headers["content-type"] == PROMETHEUS_CONTENT_TYPE
    return samples(body.decode())


def serve_mesh(control_plane: ControlPlane) -> None:
    """Listener, route, cluster and endpoints; the NameTable is up to each test."""
    control_plane.set_mesh(
        mesh.sample_mesh(listener_port=15001, backend_port=8080, name_table=False)
    )


def version_of(response: Response) -> str:
    if isinstance(response, discovery_pb2.DeltaDiscoveryResponse):
        return str(response.system_version_info)
    return str(response.version_info)


@pytest.mark.parametrize("delta", MODES)
async def test_readiness_waits_for_the_first_name_table(
    make_agent: AgentFactory,
    control_plane: ControlPlane,
    clients: list[AdsClient],
    delta: bool,
) -> None:
    agent = await make_agent(discovery_address=control_plane.address)
    status, body = await get(agent, "/healthz/ready")
    assert status == 503 and b"NameTable" in body
    serve_mesh(control_plane)
    client = await connect(agent, clients, delta)
    await client.request(LISTENER)
    await client.recv()
    # Envoy is served and the agent asked for the NameTable; istiod has none yet.
    await control_plane.wait_for_request(lambda r: r.type_url == NAME_TABLE)
    assert (await get(agent, "/healthz/ready"))[0] == 503
    control_plane.set_name_table(mesh.sample_name_table())
    await agent.dns_table.wait_updates(1)
    assert await get(agent, "/healthz/ready") == (200, b"ready\n")


async def test_readiness_without_dns_is_the_relay_serving(
    make_agent: AgentFactory, control_plane: ControlPlane
) -> None:
    agent = await make_agent(discovery_address=control_plane.address, dns_enabled=False)
    assert await get(agent, "/healthz/ready") == (200, b"ready\n")
    port = agent.status.port
    await agent.stop()
    with pytest.raises(OSError):
        await http_get("127.0.0.1", port, "/healthz/ready", timeout=2)


async def test_a_taken_status_port_fails_agent_start_and_releases_the_socket(
    make_agent: AgentFactory, control_plane: ControlPlane, short_tmp: Path
) -> None:
    socket_path = short_tmp / "XDS-busy"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(OSError, match=f"status server cannot listen on 127.0.0.1:{port}"):
            await make_agent(
                discovery_address=control_plane.address,
                status_address=f"127.0.0.1:{port}",
                xds_socket=str(socket_path),
            )
    assert not socket_path.exists()


async def scrape_until(
    agent: Agent,
    check: Callable[[dict[tuple[str, frozenset[tuple[str, str]]], float]], bool],
    timeout: float = 5.0,
) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Scrape until ``check`` holds: a counter bumped just after a send may trail what the
    peer saw by a loop iteration. Each scrape is a real HTTP round trip (no sleeping)."""
    deadline = time.monotonic() + timeout
    while True:
        found = await scrape(agent)
        if check(found):
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"metrics never matched: {found}")


def as_sent(recorded: Any) -> int:
    """A request's size as the client sent it: the control plane records what reached it, the
    first request's node with DNS_CAPTURE and DNS_PROXY_ADDR set by xdsfast (DNS on)."""
    request = type(recorded.request)()
    request.CopyFrom(recorded.request)
    if request.HasField("node"):
        for key in ("DNS_CAPTURE", "DNS_PROXY_ADDR"):
            if key in request.node.metadata.fields:
                del request.node.metadata.fields[key]
        if not request.node.metadata.fields:
            request.node.ClearField("metadata")
    return int(request.ByteSize())


@pytest.mark.parametrize("delta", MODES)
async def test_metrics_after_scripted_traffic(
    make_agent: AgentFactory,
    control_plane: ControlPlane,
    clients: list[AdsClient],
    delta: bool,
) -> None:
    agent = await make_agent(discovery_address=control_plane.address)
    serve_mesh(control_plane)
    control_plane.set_name_table(mesh.sample_name_table())
    client = await connect(agent, clients, delta)
    await client.request(CLUSTER)
    await client.ack(await client.recv())
    await client.request(LISTENER)
    await client.ack(await client.recv())
    await control_plane.wait_for_request(lambda r: r.type_url == NAME_TABLE and r.is_ack)
    await control_plane.wait_for_request(lambda r: r.type_url == LISTENER and r.is_ack)

    requests, sent = control_plane.requests, control_plane.responses
    found = await scrape_until(
        agent,
        lambda s: (
            value(s, "istio_agent_xds_proxy_requests") == len(requests)
            and value(s, "xdsfast_xds_push_latency_seconds_count") == 2
        ),
    )
    assert len(requests) == 6  # CDS, its ACK, LDS, NDS (the agent's), its ACK, LDS ACK
    assert value(found, "istio_agent_xds_proxy_responses") == len(sent) == 3
    assert value(found, "xdsfast_xds_consumed_responses_total", result="applied") == 1
    assert value(found, "xdsfast_core_info", **CORE_LABELS) == 1
    envoys = [r for r in requests if r.type_url != NAME_TABLE]
    assert value(found, "istio_agent_pilot_xds_recv_max") == max(map(as_sent, envoys))
    for type_url in (CLUSTER, LISTENER):
        relayed_up = sum(as_sent(r) for r in requests if r.type_url == type_url)
        relayed_down = sum(s.size for s in sent if s.type_url == type_url)
        assert value(found, "xdsfast_xds_bytes_total", type_url=type_url, direction="request") == (
            relayed_up
        )
        assert value(found, "xdsfast_xds_bytes_total", type_url=type_url, direction="response") == (
            relayed_down
        )
    nds_size = sum(s.size for s in sent if s.type_url == NAME_TABLE)
    assert value(found, "xdsfast_xds_bytes_total", type_url=NAME_TABLE, direction="response") == (
        nds_size
    )
    assert value(found, "xdsfast_xds_push_latency_seconds_bucket", le="+Inf") == 2


@pytest.mark.parametrize("delta", MODES)
async def test_debug_xds_shows_versions_nonces_acks_and_a_nack(
    make_agent: AgentFactory,
    control_plane: ControlPlane,
    clients: list[AdsClient],
    delta: bool,
) -> None:
    agent = await make_agent(discovery_address=control_plane.address)
    status, body = await get(agent, "/debug/xds")
    assert (status, orjson.loads(body)) == (200, {"streams": []})
    serve_mesh(control_plane)
    v_nds = control_plane.set_name_table(mesh.sample_name_table())
    client = await connect(agent, clients, delta)
    await client.request(CLUSTER)
    first = await client.recv()
    await client.ack(first)
    await client.request(LISTENER)
    await client.recv()
    await control_plane.wait_for_request(lambda r: r.type_url == CLUSTER and r.is_ack)
    await control_plane.wait_for_request(lambda r: r.type_url == NAME_TABLE and r.is_ack)
    before = time.time()

    (stream,) = orjson.loads((await get(agent, "/debug/xds"))[1])["streams"]
    assert stream["mode"] == ("delta" if delta else "sotw")
    cds = stream["types"][CLUSTER]
    assert cds["version"] == version_of(first) and cds["nonce"] == first.nonce
    assert (cds["ack"], cds["ack_nonce"], cds["error_detail"]) == ("ACK", first.nonce, None)
    assert (cds["responses"], cds["bytes"]) == (1, first.ByteSize())
    pushed = time.mktime(time.strptime(cds["last_push"][:19], "%Y-%m-%dT%H:%M:%S")) - time.timezone
    assert before - 60 < pushed <= before + 1
    lds = stream["types"][LISTENER]
    assert lds["responses"] == 1 and lds["ack"] is None  # not answered yet
    nds = stream["types"][NAME_TABLE]  # consumed and ACKed by the agent itself
    assert (nds["version"], nds["ack"], nds["responses"]) == (v_nds, "ACK", 1)

    control_plane.set_resources(CLUSTER, {"c2": mesh.eds_cluster("c2")})
    second = await client.recv()
    await client.ack(second, error="cluster c2: no such thing")
    await control_plane.wait_for_request(lambda r: r.type_url == CLUSTER and r.is_nack)
    (stream,) = orjson.loads((await get(agent, "/debug/xds"))[1])["streams"]
    cds = stream["types"][CLUSTER]
    assert cds["version"] == version_of(second) != version_of(first)
    assert (cds["ack"], cds["ack_nonce"]) == ("NACK", second.nonce)
    assert cds["error_detail"] == {"code": 13, "message": "cluster c2: no such thing"}
    assert (cds["responses"], cds["bytes"]) == (2, first.ByteSize() + second.ByteSize())

    # The NACK's error stays visible after the next ACK, next to the new state.
    control_plane.set_resources(CLUSTER, {"c3": mesh.eds_cluster("c3")})
    third = await client.recv()
    await client.ack(third)
    await control_plane.wait_for_request(
        lambda r: r.type_url == CLUSTER and r.is_ack and r.nonce == third.nonce
    )
    (stream,) = orjson.loads((await get(agent, "/debug/xds"))[1])["streams"]
    cds = stream["types"][CLUSTER]
    assert (cds["ack"], cds["ack_nonce"]) == ("ACK", third.nonce)
    assert cds["error_detail"]["message"] == "cluster c2: no such thing"


async def test_debug_ndsz_is_the_name_table_as_json(
    make_agent: AgentFactory, control_plane: ControlPlane, clients: list[AdsClient]
) -> None:
    agent = await make_agent(discovery_address=control_plane.address)
    assert await get(agent, "/debug/ndsz") == (404, b"{}\n")
    serve_mesh(control_plane)
    table = mesh.sample_name_table()
    table.table["legacy.default.svc.cluster.local"].alt_hosts.append("legacy.default")
    control_plane.set_name_table(table)
    client = await connect(agent, clients, False)
    await client.request(LISTENER)
    await client.recv()
    await agent.dns_table.wait_updates(1)
    status, body = await get(agent, "/debug/ndsz")
    assert status == 200
    dump = orjson.loads(body)
    assert dump == json_format.MessageToDict(table)  # proto3 JSON, as Istio's
    assert dump["table"]["backend.default.svc.cluster.local"] == {
        "ips": ["10.0.0.1"],
        "registry": "Kubernetes",
        "shortname": "backend",
        "namespace": "default",
    }
    assert dump["table"]["legacy.default.svc.cluster.local"] == {"altHosts": ["legacy.default"]}


async def test_debug_ndsz_reports_the_table_gauges_as_headers_and_summary(
    make_agent: AgentFactory, control_plane: ControlPlane, clients: list[AdsClient]
) -> None:
    """Over real HTTP to the agent: /debug/ndsz's body is unchanged, and its headers and
    ``?summary`` carry the same hosts, names and bytes as the ``xdsfast_dns_table_*``
    gauges (the compiled table served), 404 ``{}`` before the first table."""
    agent = await make_agent(discovery_address=control_plane.address)
    assert await get(agent, "/debug/ndsz?summary") == (404, b"{}\n")
    serve_mesh(control_plane)
    table = mesh.sample_name_table()
    control_plane.set_name_table(table)
    client = await connect(agent, clients, False)
    await client.request(LISTENER)
    await client.recv()
    await agent.dns_table.wait_updates(1)
    found = await scrape(agent)
    gauges = tuple(
        int(value(found, f"xdsfast_dns_table_{what}")) for what in ("hosts", "names", "bytes")
    )
    assert gauges[0] == 2 and gauges[1] > 2 and gauges[2] > 0
    assert value(found, "xdsfast_dns_table_builds_superseded_total") == 0
    status, headers, body = await http_get("127.0.0.1", agent.status.port, "/debug/ndsz")
    assert status == 200 and orjson.loads(body) == json_format.MessageToDict(table)
    assert table_headers(headers) == gauges
    status, headers, body = await http_get("127.0.0.1", agent.status.port, "/debug/ndsz?summary")
    assert (status, orjson.loads(body)) == (
        200,
        dict(zip(("hosts", "names", "bytes"), gauges, strict=True)),
    )
    assert table_headers(headers) == gauges


# -- xdsfast run, a real process -----------------------------------------------------------


async def test_run_serves_prometheus_text(
    xdsfast_run: XdsfastFactory, control_plane: ControlPlane
) -> None:
    relay = await xdsfast_run("--discovery-address", control_plane.address, "--no-dns")
    assert relay.status_port is not None, relay.stderr
    control_plane.set_resources(CLUSTER, {"c": mesh.eds_cluster("c")})
    client = AdsClient(f"unix:{relay.socket_path}")
    await client.open()
    try:
        await client.request(CLUSTER)
        await client.recv()
    finally:
        await client.close()
    deadline = time.monotonic() + 10.0
    while True:  # counters are bumped just after the send: they may trail the client
        status, headers, body = await http_get("127.0.0.1", relay.status_port, "/stats/prometheus")
        assert status == 200 and headers["content-type"] == PROMETHEUS_CONTENT_TYPE
        found = samples(body.decode())
        forwarded = value(found, "xdsfast_xds_bytes_total", type_url=CLUSTER, direction="response")
        if forwarded or time.monotonic() > deadline:  # counted once written to the client
            break
    assert value(found, "istio_agent_xds_proxy_responses") == 1
    assert value(found, "xdsfast_core_info", **CORE_LABELS) == 1
    assert value(found, "xdsfast_xds_bytes_total", type_url=CLUSTER, direction="response") > 0
    assert value(found, "xdsfast_status_connections_evicted_total") == 0
    assert value(found, "xdsfast_status_connections_refused_total") == 0
    assert (await http_get("127.0.0.1", relay.status_port, "/healthz/ready"))[0] == 200
    assert await relay.stop() == 0


async def test_run_ndsz_summary_is_the_dns_table_gauges(
    xdsfast_run: XdsfastFactory, control_plane: ControlPlane, short_tmp: Path
) -> None:
    """``xdsfast run --dns``: after a NameTable, /debug/ndsz?summary and the /debug/ndsz
    headers are what /stats/prometheus says of the DNS name table."""
    resolv = short_tmp / "resolv.conf"
    resolv.write_text("nameserver 127.0.0.1\nsearch default.svc.cluster.local\n")
    relay = await xdsfast_run(
        *("--discovery-address", control_plane.address, "--dns", "--resolv-conf", str(resolv)),
        *("--dns-address", "127.0.0.1:0"),
        env={"POD_NAMESPACE": "default"},
    )
    assert relay.status_port is not None, relay.stderr
    serve_mesh(control_plane)
    control_plane.set_name_table(mesh.sample_name_table())
    client = AdsClient(f"unix:{relay.socket_path}")
    await client.open()
    try:
        await client.request(LISTENER)
        await client.recv()
        deadline = time.monotonic() + 20.0
        while (await http_get("127.0.0.1", relay.status_port, "/healthz/ready"))[0] != 200:
            assert time.monotonic() < deadline, "the NameTable was never applied"
            await asyncio.sleep(0.05)
    finally:
        await client.close()
    _, _, text = await http_get("127.0.0.1", relay.status_port, "/stats/prometheus")
    found = samples(text.decode())
    gauges = tuple(
        int(value(found, f"xdsfast_dns_table_{what}")) for what in ("hosts", "names", "bytes")
    )
    status, headers, body = await http_get("127.0.0.1", relay.status_port, "/debug/ndsz?summary")
    assert (status, orjson.loads(body)) == (
        200,
        dict(zip(("hosts", "names", "bytes"), gauges, strict=True)),
    )
    assert gauges[0] == 2 and table_headers(headers) == gauges
    status, headers, body = await http_get("127.0.0.1", relay.status_port, "/debug/ndsz")
    assert status == 200 and set(orjson.loads(body)["table"]) == set(mesh.sample_name_table().table)
    assert table_headers(headers) == gauges
    assert await relay.stop() == 0


def test_run_exits_with_a_clear_error_when_the_status_port_is_taken(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = subprocess.run(
            [
                *(sys.executable, "-m", "xdsfast", "run", "--plaintext", "--no-dns"),
                *("--xds-socket", str(tmp_path / "XDS"), "--status-address", f"127.0.0.1:{port}"),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tmp_path,
        )
    assert out.returncode == 1
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith(f"xdsfast: error: status server cannot listen on 127.0.0.1:{port}: ")
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "XDS").exists()
