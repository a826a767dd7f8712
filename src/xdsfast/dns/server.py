"""The DNS proxy's listeners: UDP and TCP on each address, as asyncio protocols.

UDP: each datagram is answered in ``datagram_received`` itself when the table
knows it (the fast path never leaves the callback); forwarded queries become
tasks, at most ``max_forwards`` at a time across the server (beyond that the
client gets SERVFAIL at once), so a flood cannot grow memory.  Replies are
dropped while the socket's send buffer is full.

TCP: two-byte length framing; queries are answered in order of arrival (local
ones at once, forwarded ones when the upstream answers), at most
``tcp_max_pending`` forwards in flight per connection, after which reading
pauses.  A connection that sits idle for ``tcp_idle_timeout``, takes longer
than ``tcp_read_timeout`` to deliver a message it started, or does not read
its replies for ``tcp_write_timeout`` is closed; so is one that sends a
message that is not a query.  At most ``tcp_max_connections`` at a time.
Timeouts default to those of the Go DNS library under Istio (8 s idle, 2 s
read and write).
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
from collections.abc import Callable, Sequence
from typing import cast

from xdsfast import log
from xdsfast.dns.forward import Forwarder
from xdsfast.dns.handler import Handler
from xdsfast.dns.wire import TCP_MAX, error_reply, truncate

_log = log.scope("dns")

Deliver = Callable[[bytes], None]
UDP_SEND_BUFFER_LIMIT = 1 << 20  # bytes queued in the UDP transport before replies are dropped
REFUSED = 5


def is_loopback(host: object) -> bool:
    """Whether a peer address (or a Unix socket: no host) is this machine's loopback."""
    if not isinstance(host, str):
        return True
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


class DnsServer:
    def __init__(
        self,
        handler: Handler,
        forwarder: Forwarder,
        *,
        max_forwards: int = 1024,
        tcp_max_connections: int = 256,
        tcp_max_pending: int = 16,
        tcp_idle_timeout: float = 8.0,
        tcp_read_timeout: float = 2.0,
        tcp_write_timeout: float = 2.0,
        forward_remote: bool = False,
    ) -> None:
        """``forward_remote``: also forward (recurse) for clients that are not on loopback;
        by default they get REFUSED for anything the table does not answer (no open resolver
        when the proxy listens on a non-loopback address)."""
        self.handler = handler
        self.forward_remote = forward_remote
        self.forwarder = forwarder
        self.max_forwards = max_forwards
        self.tcp_max_connections = tcp_max_connections
        self.tcp_max_pending = tcp_max_pending
        self.tcp_idle_timeout = tcp_idle_timeout
        self.tcp_read_timeout = tcp_read_timeout
        self.tcp_write_timeout = tcp_write_timeout
        self.addresses: list[tuple[str, int]] = []
        self.forwarding = 0  # forwards in flight, both transports
        self.connections: set[_Tcp] = set()
        self._udp: list[asyncio.DatagramTransport] = []
        self._tcp: list[asyncio.Server] = []
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        return self.addresses[0][1] if self.addresses else 0

    async def start(self, hosts: Sequence[str], port: int) -> None:
        """Listen on UDP and TCP on every host, all on one port (picked once if 0)."""
        attempts = 20 if port == 0 else 1
        for attempt in range(attempts):
            try:
                await self._listen(hosts, port)
                return
            except OSError as exc:
                await self._close_listeners()
                if exc.errno != errno.EADDRINUSE or attempt == attempts - 1:
                    raise

    async def _listen(self, hosts: Sequence[str], port: int) -> None:
        loop = asyncio.get_running_loop()
        chosen = port
        for host in hosts:
            where = f"[{host}]:{chosen}" if ":" in host else f"{host}:{chosen}"
            try:
                transport, _ = await loop.create_datagram_endpoint(
                    lambda: _Udp(self), local_addr=(host, chosen)
                )
            except OSError as exc:
                raise OSError(exc.errno, f"DNS proxy cannot listen on {where}/udp: {exc}") from exc
            self._udp.append(transport)
            if chosen == 0:
                chosen = transport.get_extra_info("sockname")[1]
                where = f"[{host}]:{chosen}" if ":" in host else f"{host}:{chosen}"
            try:
                server = await loop.create_server(
                    lambda: _Tcp(self), host, chosen, reuse_address=True
                )
            except OSError as exc:
                raise OSError(exc.errno, f"DNS proxy cannot listen on {where}/tcp: {exc}") from exc
            self._tcp.append(server)
            self.addresses.append((host, chosen))

    async def _close_listeners(self) -> None:
        for transport in self._udp:
            transport.close()
        for server in self._tcp:
            server.close()
        for server in self._tcp:
            await server.wait_closed()
        self._udp.clear()
        self._tcp.clear()
        self.addresses.clear()

    async def stop(self) -> None:
        for server in self._tcp:
            server.close()
        for conn in list(self.connections):
            conn.abort()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._close_listeners()

    def forward(self, data: bytes, tcp: bool, limit: int, deliver: Deliver) -> bool:
        """Forward ``data`` and ``deliver`` the reply later; False if too many are in flight."""
        if self.forwarding >= self.max_forwards:
            return False
        self.forwarding += 1
        task = asyncio.get_running_loop().create_task(self._forward(data, tcp, limit, deliver))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    async def _forward(self, data: bytes, tcp: bool, limit: int, deliver: Deliver) -> None:
        try:
            reply = await self.forwarder.forward(data, tcp)
            if reply is None:
                reply = self.handler.servfail(data)
            elif not tcp:
                reply = truncate(reply, limit)
        except Exception:  # never let one query take anything else down
            _log.exception("forwarding a DNS query failed")
            reply = self.handler.servfail(data)
        finally:
            self.forwarding -= 1
        deliver(reply)


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, server: DnsServer) -> None:
        self.server = server
        self.handler = server.handler
        self.transport: asyncio.DatagramTransport | None = None
        self.paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)  # uvloop's is no subclass

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        reply = self.handler.fast(data)
        if reply is None:
            reply, limit = self.handler.slow(data, False)
            if reply is None:
                if not self.server.forward_remote and not is_loopback(addr[0]):
                    self.send(error_reply(data, REFUSED, with_question=True), addr)
                    return
                if not self.server.forward(data, False, limit, lambda r: self.send(r, addr)):
                    self.send(self.handler.servfail(data), addr)
                return
            if not reply:
                return
        self.send(reply, addr)

    def send(self, reply: bytes, addr: tuple[str | int, ...]) -> None:
        transport = self.transport
        if transport is None or transport.is_closing() or self.paused:
            return
        if transport.get_write_buffer_size() > UDP_SEND_BUFFER_LIMIT:  # type: ignore[attr-defined]
            return
        transport.sendto(reply, addr)

    def error_received(self, exc: Exception) -> None:
        pass  # an ICMP error for an earlier reply: nothing to do

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False


class _Tcp(asyncio.Protocol):
    def __init__(self, server: DnsServer) -> None:
        self.server = server
        self.handler = server.handler
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.pending = 0  # forwards in flight for this connection
        self.closed = False
        self.eof = False
        self.read_paused = False
        self.write_paused = False
        self._timer: asyncio.TimerHandle | None = None
        self._partial_deadline: float | None = None
        self.remote = False  # a non-loopback client, which gets no forwarding

    # -- transport events ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        if len(self.server.connections) >= self.server.tcp_max_connections:
            self.abort()
            return
        self.server.connections.add(self)
        peer = self.transport.get_extra_info("peername")
        host = peer[0] if isinstance(peer, tuple) and peer else None
        self.remote = not self.server.forward_remote and not is_loopback(host)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server.connections.discard(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self._drain()

    def eof_received(self) -> bool:
        self.eof = True
        self._drain()
        return True  # keep writing the replies still owed; closed when done

    def pause_writing(self) -> None:
        self.write_paused = True
        self._flow()

    def resume_writing(self) -> None:
        self.write_paused = False
        self._drain()

    # -- work ---------------------------------------------------------------------------

    def _drain(self) -> None:
        buf = self.buffer
        server = self.server
        while (
            not self.closed
            and not self.write_paused
            and self.pending < server.tcp_max_pending
            and len(buf) >= 2
        ):
            size = (buf[0] << 8) | buf[1]
            if len(buf) < 2 + size:
                break
            frame = bytes(buf[2 : 2 + size])
            del buf[: 2 + size]
            self._partial_deadline = None
            self._handle(frame)
        if self.closed:
            return
        if self.eof and not buf and not self.pending:
            self.close()
            return
        self._flow()

    def _handle(self, frame: bytes) -> None:
        reply = self.handler.fast(frame)
        if reply is None:
            reply, _ = self.handler.slow(frame, True)
            if reply is None:
                if self.remote:
                    self._write(error_reply(frame, REFUSED, with_question=True))
                    return
                if self.server.forward(frame, True, TCP_MAX, self._deliver):
                    self.pending += 1
                else:
                    self._write(self.handler.servfail(frame))
                return
            if not reply:
                self.abort()  # not a query: this is not a DNS client
                return
        self._write(reply)

    def _deliver(self, reply: bytes) -> None:
        self.pending -= 1
        if self.closed:
            return
        self._write(reply)
        self._drain()

    def _write(self, reply: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(len(reply).to_bytes(2, "big") + reply)

    def _flow(self) -> None:
        """Pause reading while replies back up or forwards are at the limit; set the timer."""
        assert self.transport is not None
        blocked = self.write_paused or self.pending >= self.server.tcp_max_pending
        if blocked and not self.read_paused:
            self.transport.pause_reading()
            self.read_paused = True
        elif not blocked and self.read_paused and not self.eof:
            self.transport.resume_reading()
            self.read_paused = False
        self._arm()

    def _arm(self) -> None:
        """One timer: write timeout while the client does not read, else read timeout for a
        message in progress (not reset by a trickle of bytes), else idle timeout."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.closed:
            return
        loop = asyncio.get_running_loop()
        server = self.server
        if self.write_paused:
            self._timer = loop.call_later(server.tcp_write_timeout, self.abort)
        elif self.pending:
            return  # the forward has its own timeout
        elif self.buffer:
            if self._partial_deadline is None:
                self._partial_deadline = loop.time() + server.tcp_read_timeout
            self._timer = loop.call_at(self._partial_deadline, self.abort)
        else:
            self._timer = loop.call_later(server.tcp_idle_timeout, self.close)

    def close(self) -> None:
        if not self.closed and self.transport is not None:
            self.closed = True
            self.transport.close()

    def abort(self) -> None:
        if not self.closed and self.transport is not None:
            self.closed = True
            self.transport.abort()
