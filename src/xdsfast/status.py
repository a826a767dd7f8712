"""The status server on Istio's port 15020: readiness, metrics and two debug dumps.

HTTP/1.1 on plain asyncio streams (uvloop under ``xdsfast run``), no framework.
The server knows nothing of the relay: it is handed callables and serves what
they return.

========================  =============================================================
``GET /healthz/ready``     200 when ready, else 503 with the reason
``GET /stats/prometheus``  Prometheus text (also ``GET /metrics``)
``GET /debug/ndsz``        the NameTable as JSON; 404 ``{}`` while there is none
``GET /debug/xds``         per stream and type: versions, nonces, ACK/NACK, counts
========================  =============================================================

``/debug/ndsz`` keeps Istio's body, the NameTable's proto3 JSON, with no field
added (proto3 JSON decoders refuse unknown fields by default).  The DNS name
table's hosts, names and bytes (``xdsfast_dns_table_*``) ride along as response
headers (``X-Xdsfast-Dns-Table-Hosts``, ``-Names``, ``-Bytes``), and
``/debug/ndsz?summary`` answers them alone as ``{"hosts", "names", "bytes"}``
without rendering the table.

``/debug/*`` answers loopback clients only (403 for anyone else).  Requests are
bounded: the head must arrive within ``timeout`` seconds of its first byte and
fit in ``max_head`` bytes, an idle keep-alive connection is closed after
``timeout`` seconds, and each write of a response must be taken by the client
within ``timeout`` seconds.  A broken request gets a 4xx and the connection is
closed; a failing callable a 500; neither ever shows the client a traceback.

Connections, and why readiness survives a flood of them.  The port faces the
network (kubelet probes it), so anyone there can open connections and trickle
bytes (slowloris).  Nothing tells a probe from an attacker before its request
has arrived, so no connection is turned away for being new; instead the
connections *waiting* for a request (no complete head yet, or idle between
keep-alive requests) are the ones given up when room is needed:

* at most ``max_connections`` (64) are held at once, and one peer address at
  most ``max_per_peer`` (a quarter of them);
* a new connection over a budget closes the connection of that budget that
  has waited longest for its request: its own peer's when that peer is at its
  share, else the one of the peer holding the most connections (ties: the one
  waiting longest);
* only when every held connection is busy (its request read, its answer being
  made or written) is the new one refused, with 503 "too many connections".

A probe sends its whole request at once (kubelet: one connection per probe,
``Connection: close``; Envoy's 15021 forwards from loopback), so it waits for
a loop turn, not seconds: to lose it, a flood must bring more new connections
than the budget in that moment, from peers that each hold more than the
probe's own.  A trickling peer only ever evicts itself once at its share, and
busy connections do not pile up: readiness and metrics answers are small and
written at once, and a client that stops reading is dropped after ``timeout``
(``/debug/*``, the large ones, answer loopback only).  Closings and refusals
are counted (``evicted``, ``refused``) and logged at most once a minute with a
count.

Large debug bodies never stall the loop: ``/debug/ndsz`` for a 200 000-host
table is ~35 MiB of JSON, so it is made in slices of a few hundred hosts with a
loop turn between them (orjson holds the GIL, so a worker thread would stall
the loop just the same), one table at a time, shared by the requests that
asked for the same table, and written in slices as the client reads.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import heapq
import ipaddress
import itertools
import os
import re
import time
import weakref
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from xdsfast import log
from xdsfast.config import split_host_port
from xdsfast.dns.wiretable import WireNameTable

if TYPE_CHECKING:  # protobuf loads with the first table, not at start
    from xdsfast.nds_pb2 import NameTable

__all__ = [
    "PROMETHEUS_CONTENT_TYPE",
    "StatusServer",
    "is_loopback",
    "name_table_json",
    "name_table_pieces",
]

PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_TEXT = "text/plain; charset=utf-8"
_JSON = "application/json"

_REASONS = {
    200: "OK",
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    413: "Content Too Large",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
    505: "HTTP Version Not Supported",
}
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_HTTP_VERSION = re.compile(r"HTTP/[0-9]\.[0-9]")
_LENGTH = re.compile(r"[0-9]{1,12}")
_MAX_BODY = 64 * 1024  # a GET carries no body; a small one is read and ignored
_SLICE_HOSTS = 256  # NameTable hosts rendered per loop turn (~1-2 ms)
_WRITE_SLICE = 256 * 1024  # a large body goes to the transport this much at a time
_DROP_LOG_INTERVAL = 60.0  # seconds between two lines about closed or refused connections
_TABLE_STATS = ("hosts", "names", "bytes")  # of the DNS name table: /debug/ndsz's headers

_log = log.scope("status")


class Reply(NamedTuple):
    """One HTTP response; a large body comes in pieces (written one slice at a time)."""

    status: int
    content_type: str
    body: bytes | Sequence[bytes]
    headers: tuple[tuple[str, str], ...] = ()


class _Pieces(list[bytes]):
    """A body made in slices, and the table it was made from (shared while in use)."""

    __slots__ = ("__weakref__", "source")

    def __init__(self, source: object) -> None:
        super().__init__()
        self.source = source


class _Conn:
    """One connection's place in the budgets."""

    __slots__ = ("evicted", "peer", "waiting", "writer")

    def __init__(self, peer: str, writer: asyncio.StreamWriter) -> None:
        self.peer = peer
        self.writer = writer
        self.waiting: int | None = 0  # order it began waiting for a request; None: busy
        self.evicted = False


class _Refused(Exception):
    """The request cannot be served; the reply says why and the connection closes."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.reply = Reply(status, _TEXT, message.encode() + b"\n")


def is_loopback(peer: Any) -> bool:
    """Whether a socket peer name is 127.0.0.0/8, ::1 or ::ffff:127.x (anything else: no)."""
    if not isinstance(peer, tuple) or not peer or not isinstance(peer[0], str):
        return False
    try:
        address = ipaddress.ip_address(peer[0].partition("%")[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def _host_json(info: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {}
    if info.ips:
        entry["ips"] = list(info.ips)
    if info.registry:
        entry["registry"] = info.registry
    if info.shortname:
        entry["shortname"] = info.shortname
    if info.namespace:
        entry["namespace"] = info.namespace
    if info.alt_hosts:
        entry["altHosts"] = list(info.alt_hosts)
    return entry


def name_table_json(table: NameTable | None) -> dict[str, Any] | None:
    """A NameTable in proto3 JSON form (camelCase, empty fields left out); None if none."""
    if table is None:
        return None
    return {"table": {host: _host_json(info) for host, info in table.table.items()}}


def name_table_pieces(table: NameTable | WireNameTable) -> Iterator[bytes]:
    """``_json(name_table_json(table))``, byte for byte, in pieces of bounded work.

    Each step takes at most ``_SLICE_HOSTS`` hosts (empty pieces are pauses): the
    keys are sorted in runs of that size, then merged, and each run of merged hosts
    is dumped by orjson and indented to its depth.  The caller may yield to the
    loop between pieces; the table must not change meanwhile (tables are replaced,
    never modified).  A :class:`WireNameTable` is decoded an entry at a time."""
    if isinstance(table, WireNameTable):
        yield from _wire_table_pieces(table)
        return
    hosts = table.table
    yield from _sorted_pieces(iter(hosts), lambda host: hosts[host])


def _wire_table_pieces(table: WireNameTable) -> Iterator[bytes]:
    """``name_table_pieces`` of a table kept as wire bytes: an index of each host's last
    record (built in slices) stands for the parsed map."""
    spans: dict[str, tuple[int, int]] = {}
    for count, (start, end) in enumerate(table.records(), 1):
        spans[table.entry(start, end)[0]] = (start, end)
        if count % _SLICE_HOSTS == 0:
            yield b""
    yield from _sorted_pieces(iter(spans), lambda host: table.entry(*spans[host])[1])


def _sorted_pieces(keys: Iterator[str], info: Callable[[str], Any]) -> Iterator[bytes]:
    """The JSON of ``{"table": {host: info(host)}}``, hosts sorted, in slices: runs of
    ``_SLICE_HOSTS`` sorted a slice at a time, then merged and dumped a slice at a time."""
    runs: list[list[str]] = []
    while run := sorted(itertools.islice(keys, _SLICE_HOSTS)):
        runs.append(run)
        yield b""
    if not runs:
        yield b'{\n  "table": {}\n}\n'
        return
    import orjson

    yield b'{\n  "table": {\n'
    ordered = heapq.merge(*runs)
    option = orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS
    separator = b""
    while batch := list(itertools.islice(ordered, _SLICE_HOSTS)):
        dumped = orjson.dumps({host: _host_json(info(host)) for host in batch}, option=option)
        # '{\n  "h": {...}\n}' -> '    "h": {...}': the same entries two levels deeper
        yield separator + b"    " + dumped[4:-2].replace(b"\n", b"\n  ")
        separator = b",\n"
    yield b"\n  }\n}\n"


class _Route(NamedTuple):
    handler: Callable[[str], Awaitable[Reply]]  # called with the request's query string
    debug: bool  # loopback clients only


def _peer_key(peer: Any) -> str:
    """The address a connection comes from (its budget's key); "" if unknown."""
    if isinstance(peer, tuple) and peer and isinstance(peer[0], str):
        return peer[0]
    return ""


class StatusServer:
    """Serves readiness, metrics and the debug dumps from the callables it is given.

    ``ready()`` returns None when ready, else the reason it is not; ``metrics()``
    Prometheus text; ``ndsz()`` the NameTable, or None when there is none; ``xds()``
    the relay's per-stream state as a JSON-able dict; ``ndsz_stats()`` (optional) the
    hosts, names and bytes of the DNS name table served now, for ``/debug/ndsz``.
    """

    def __init__(
        self,
        *,
        ready: Callable[[], str | None],
        metrics: Callable[[], bytes],
        ndsz: Callable[[], NameTable | WireNameTable | None],
        xds: Callable[[], dict[str, Any]],
        ndsz_stats: Callable[[], tuple[int, int, int]] | None = None,
        timeout: float = 5.0,
        max_head: int = 8 * 1024,
        max_connections: int = 64,
        max_per_peer: int | None = None,
    ) -> None:
        self._ready = ready
        self._metrics = metrics
        self._ndsz = ndsz
        self._xds = xds
        self._ndsz_stats = ndsz_stats
        self.timeout = timeout
        self.max_head = max_head
        self.max_connections = max_connections
        self.max_per_peer = max_per_peer or max(1, max_connections // 4)
        self._routes = {
            "/healthz/ready": _Route(self._serve_ready, debug=False),
            "/stats/prometheus": _Route(self._serve_metrics, debug=False),
            "/metrics": _Route(self._serve_metrics, debug=False),
            "/debug/ndsz": _Route(self._serve_ndsz, debug=True),
            "/debug/xds": _Route(self._serve_xds, debug=True),
        }
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[Any]] = set()  # every task, held or refusing
        self._held: list[_Conn] = []  # the connections in the budgets, oldest first
        self._per_peer: collections.Counter[str] = collections.Counter()
        self._order = itertools.count(1)
        self._refusing = 0
        self.evicted = 0  # connections closed to make room for a new one
        self.refused = 0  # new connections refused: every held one was busy
        self._drops_logged = -_DROP_LOG_INTERVAL
        self._drops_unlogged = 0
        self._ndsz_lock = asyncio.Lock()
        self._ndsz_shared: weakref.ref[_Pieces] | None = None
        self.address = ""

    @property
    def port(self) -> int:
        """The bound port (the kernel's pick when started on port 0)."""
        if self._server is None:
            raise RuntimeError("the status server is not started")
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    @property
    def connections(self) -> int:
        """How many connections the budgets hold now (never over ``max_connections``)."""
        return len(self._held)

    async def start(self, address: str) -> None:
        """Listen on HOST:PORT (port 0: any free one); raises OSError saying why not."""
        try:
            host, port = split_host_port(address)
        except ValueError:
            raise OSError(f"status server address {address!r} is not HOST:PORT") from None
        try:
            self._server = await asyncio.start_server(
                self._serve, host, port, limit=self.max_head, reuse_address=True
            )
        except OSError as exc:
            if exc.errno is not None and exc.errno > 0:
                reason = os.strerror(exc.errno)  # asyncio's own wording repeats the address
            else:  # a name that does not resolve
                reason = exc.strerror or str(exc)
            error = OSError(f"status server cannot listen on {address}: {reason}")
            error.errno = exc.errno
            raise error from None
        shown = f"[{host}]" if ":" in host else host
        self.address = f"{shown}:{self.port}"
        _log.info("status server listening", extra=log.fields(status=self.address))

    async def stop(self) -> None:
        """Stop listening and close every open connection."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        connections = list(self._connections)
        for task in connections:
            task.cancel()
        await asyncio.gather(*connections, return_exceptions=True)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(server.wait_closed(), 2.0)
        _log.info("status server stopped")

    # -- budgets -------------------------------------------------------------------------------

    def _admit(self, conn: _Conn) -> bool:
        """Make room for ``conn`` (closing a waiting connection if a budget is full) and
        hold it; False when there is no room: every connection it could replace is busy."""
        peer_full = self._per_peer[conn.peer] >= self.max_per_peer
        if peer_full or len(self._held) >= self.max_connections:
            victim = self._longest_waiting(conn.peer if peer_full else None)
            if victim is None:
                return False
            self._release(victim)
            victim.evicted = True
            victim.writer.transport.abort()  # its task sees the end of input and finishes
            self.evicted += 1
            self._dropped("closed the connection waiting longest for its request, from", victim)
        conn.waiting = next(self._order)
        self._held.append(conn)
        self._per_peer[conn.peer] += 1
        return True

    def _longest_waiting(self, peer: str | None) -> _Conn | None:
        """The connection to give up: waiting for a request, from ``peer`` (None: from
        the peer holding the most connections), the one waiting longest."""
        best: _Conn | None = None
        best_key = (0, 0)
        for conn in self._held:
            if conn.waiting is None or (peer is not None and conn.peer != peer):
                continue
            key = (self._per_peer[conn.peer], -conn.waiting)
            if best is None or key > best_key:
                best, best_key = conn, key
        return best

    def _release(self, conn: _Conn) -> None:
        if conn.evicted:
            return
        with contextlib.suppress(ValueError):
            self._held.remove(conn)
            self._per_peer[conn.peer] -= 1
            if not self._per_peer[conn.peer]:
                del self._per_peer[conn.peer]

    def _dropped(self, what: str, conn: _Conn) -> None:
        """One line per minute at most, counting what it stands for."""
        self._drops_unlogged += 1
        now = time.monotonic()
        if now - self._drops_logged < _DROP_LOG_INTERVAL:
            return
        count, self._drops_unlogged = self._drops_unlogged, 0
        self._drops_logged = now
        _log.warning(
            "status server connection budget full: %s %s (%d connections closed or refused "
            "since the last such line; %d closed, %d refused in all)",
            what,
            conn.peer or "an unknown peer",
            count,
            self.evicted,
            self.refused,
        )

    # -- connections ---------------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        conn = _Conn(_peer_key(writer.get_extra_info("peername")), writer)
        try:
            if not self._admit(conn):
                self.refused += 1
                self._dropped("refused a new connection (every held one is busy) from", conn)
                await self._refuse_overloaded(reader, writer)
                return
            local = is_loopback(writer.get_extra_info("peername"))
            while await self._serve_one(reader, writer, local, conn):
                pass
        except _Refused as refused:
            await self._refuse(reader, writer, refused)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went away, or the connection was closed to make room
        except Exception:  # a bug here must not take the server down
            _log.error("status server connection failed", exc_info=True)
        finally:
            self._release(conn)
            self._connections.discard(task)
            writer.close()

    async def _refuse_overloaded(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """503 to a connection there is no room for; at most ``max_per_peer`` at a time are
        answered (each may take a second), any more are closed at once."""
        if self._refusing >= self.max_per_peer:
            writer.transport.abort()
            return
        self._refusing += 1
        try:
            await self._refuse(reader, writer, _Refused(503, "too many connections"))
        finally:
            self._refusing -= 1

    async def _serve_one(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, local: bool, conn: _Conn
    ) -> bool:
        """Read and answer one request; return whether the connection stays open."""
        if conn.waiting is None:
            conn.waiting = next(self._order)  # idle between requests: may be given up
        try:  # idle: a client that sends nothing is closed without a word
            first = await asyncio.wait_for(reader.read(1), self.timeout)
        except asyncio.TimeoutError:
            return False
        if not first:
            return False
        try:
            rest = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.timeout)
        except asyncio.TimeoutError:
            raise _Refused(408, "the request head did not arrive in time") from None
        except asyncio.LimitOverrunError:
            raise _Refused(431, f"the request head is over {self.max_head} bytes") from None
        method, path, query, version, headers = _parse_head(first + rest)
        keep_alive = _keep_alive(version, headers.get("connection", ""))
        await self._skip_body(reader, headers)
        if conn.evicted:
            return False
        conn.waiting = None  # busy: the request is in, the answer is made and written
        reply = await self._dispatch(method, path, local, query)
        await self._write(writer, reply, keep_alive=keep_alive, version=version, method=method)
        return keep_alive

    async def _skip_body(self, reader: asyncio.StreamReader, headers: dict[str, str]) -> None:
        if "transfer-encoding" in headers:
            raise _Refused(400, "request bodies are not accepted")
        length = headers.get("content-length", "0")
        if not _LENGTH.fullmatch(length):
            raise _Refused(400, "bad Content-Length")
        if int(length) > _MAX_BODY:
            raise _Refused(413, "request bodies are not accepted")
        if int(length):
            try:
                await asyncio.wait_for(reader.readexactly(int(length)), self.timeout)
            except asyncio.TimeoutError:
                raise _Refused(408, "the request body did not arrive in time") from None

    async def _dispatch(self, method: str, path: str, local: bool, query: str = "") -> Reply:
        route = self._routes.get(path)
        if route is None:
            return Reply(404, _TEXT, b"not found: " + path.encode("latin-1", "replace") + b"\n")
        if route.debug and not local:
            return Reply(403, _TEXT, b"debug endpoints answer loopback clients only\n")
        if method not in ("GET", "HEAD"):
            return Reply(405, _TEXT, b"only GET and HEAD are served\n", (("Allow", "GET, HEAD"),))
        try:
            return await route.handler(query)
        except Exception:
            _log.error("status endpoint %s failed", path, exc_info=True)
            return Reply(500, _TEXT, b"internal error (see the agent's log)\n")

    async def _write(
        self,
        writer: asyncio.StreamWriter,
        reply: Reply,
        *,
        keep_alive: bool,
        version: str = "HTTP/1.1",
        method: str = "GET",
    ) -> None:
        pieces = [reply.body] if isinstance(reply.body, bytes) else reply.body
        lines = [
            f"HTTP/1.1 {reply.status} {_REASONS[reply.status]}",
            f"Content-Type: {reply.content_type}",
            f"Content-Length: {sum(map(len, pieces))}",
            "Cache-Control: no-store",
        ]
        lines += [f"{name}: {value}" for name, value in reply.headers]
        if not keep_alive:
            lines.append("Connection: close")
        elif version == "HTTP/1.0":
            lines.append("Connection: keep-alive")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        if method == "HEAD" or not pieces:
            await self._send(writer, head)
        elif len(pieces) == 1 and len(pieces[0]) <= _WRITE_SLICE:
            await self._send(writer, head + pieces[0])  # one write, as most answers are
        else:
            await self._send(writer, head)
            for piece in pieces:
                view = memoryview(piece)
                for start in range(0, len(view), _WRITE_SLICE):
                    await self._send(writer, view[start : start + _WRITE_SLICE])

    async def _send(self, writer: asyncio.StreamWriter, data: bytes | memoryview) -> None:
        writer.write(data)
        try:  # a client that does not read its answer is not waited for
            await asyncio.wait_for(writer.drain(), self.timeout)
        except asyncio.TimeoutError:
            writer.transport.abort()
            raise ConnectionError("the client did not read its response") from None

    async def _refuse(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, refused: _Refused
    ) -> None:
        """Answer an error and close, reading what the client still sends for a moment
        (closing with unread input resets the connection, and the client would never
        see the answer)."""

        async def drain_input() -> None:
            budget = 1024 * 1024
            while budget > 0 and (chunk := await reader.read(64 * 1024)):
                budget -= len(chunk)

        with contextlib.suppress(asyncio.TimeoutError, ConnectionError):
            await self._write(writer, refused.reply, keep_alive=False)
            if writer.can_write_eof():
                writer.write_eof()
            await asyncio.wait_for(drain_input(), min(self.timeout, 1.0))

    # -- endpoints -----------------------------------------------------------------------------

    async def _serve_ready(self, query: str) -> Reply:
        reason = self._ready()
        if reason is None:
            return Reply(200, _TEXT, b"ready\n")
        return Reply(503, _TEXT, reason.encode() + b"\n")

    async def _serve_metrics(self, query: str) -> Reply:
        return Reply(200, PROMETHEUS_CONTENT_TYPE, self._metrics())

    async def _serve_ndsz(self, query: str) -> Reply:
        table = self._ndsz()
        if table is None:
            return Reply(404, _JSON, b"{}\n")
        if "summary" in (part.partition("=")[0] for part in query.split("&")):
            if self._ndsz_stats is None:
                return Reply(404, _JSON, b"{}\n")
            stats = self._ndsz_stats()
            summary = _json(dict(zip(_TABLE_STATS, map(int, stats), strict=True)))
            return Reply(200, _JSON, summary, _stats_headers(stats))
        async with self._ndsz_lock:  # one table rendered at a time; asked again: shared
            shared = self._ndsz_shared() if self._ndsz_shared is not None else None
            if shared is None or shared.source is not table:
                pieces = _Pieces(table)
                for piece in name_table_pieces(table):
                    if piece:
                        pieces.append(piece)
                    await asyncio.sleep(0)  # the loop serves others between two slices
                self._ndsz_shared = weakref.ref(pieces)
                shared = pieces
        # read when the reply is made, as the gauges (the previous table's during a build)
        headers = () if self._ndsz_stats is None else _stats_headers(self._ndsz_stats())
        return Reply(200, _JSON, shared, headers)

    async def _serve_xds(self, query: str) -> Reply:
        return Reply(200, _JSON, _json(self._xds()))


def _stats_headers(stats: tuple[int, int, int]) -> tuple[tuple[str, str], ...]:
    """``X-Xdsfast-Dns-Table-{Hosts,Names,Bytes}`` of the DNS name table served now."""
    return tuple(
        (f"X-Xdsfast-Dns-Table-{what.capitalize()}", str(int(count)))
        for what, count in zip(_TABLE_STATS, stats, strict=True)
    )


def _json(value: Any) -> bytes:
    """Indented, sorted JSON for the debug pages (orjson is imported at the first one:
    it costs idle memory, and most agents never serve one)."""
    import orjson

    return orjson.dumps(
        value, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS | orjson.OPT_APPEND_NEWLINE
    )


def _parse_head(head: bytes) -> tuple[str, str, str, str, dict[str, str]]:
    """(method, path, query, version, lower-cased headers) of a request head; raises
    _Refused."""
    lines = head[:-4].decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3:
        raise _Refused(400, "malformed request line")
    method, target, version = parts
    if not _TOKEN.fullmatch(method):
        raise _Refused(400, "malformed request line")
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        if _HTTP_VERSION.fullmatch(version):
            raise _Refused(505, "only HTTP/1.0 and HTTP/1.1 are served")
        raise _Refused(400, "malformed request line")
    if target.startswith("/"):
        path, _, query = target.partition("?")
    elif target.startswith(("http://", "https://")):  # absolute form
        rest = "/" + target.split("/", 3)[3] if target.count("/") >= 3 else "/"
        path, _, query = rest.partition("?")
    else:
        raise _Refused(400, "malformed request target")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or not _TOKEN.fullmatch(name) or any(c in value for c in "\r\n\x00"):
            raise _Refused(400, "malformed header line")
        key = name.lower()
        if key in headers and key in ("content-length", "host"):
            raise _Refused(400, f"repeated {name} header")
        headers[key] = value.strip(" \t")
    return method, path, query, version, headers


def _keep_alive(version: str, connection: str) -> bool:
    tokens = {token.strip().lower() for token in connection.split(",")}
    if version == "HTTP/1.0":
        return "keep-alive" in tokens
    return "close" not in tokens
