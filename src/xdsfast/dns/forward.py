"""Forwarding queries the table does not answer to the upstream resolvers.

The client's message goes out byte for byte over the transport it came on
(UDP or TCP).  Sequential mode tries the servers one by one in a fresh random
order per query; parallel mode (``DNS_FORWARD_PARALLEL``) asks all at once
and takes the first answer.  Each server gets ``timeout`` seconds
(``DNS_FORWARD_TIMEOUT``).  Any answer counts, whatever its rcode; only
transport failures move on.  None back means every server failed.

UDP answers are read with a 64 KiB buffer, so an upstream answer larger than
512 bytes (or than any EDNS size) is received whole; cutting it to what the
client can take is the server's job (Istio turns it into SERVFAIL, #61371).
"""

from __future__ import annotations

import asyncio
import random
import socket
import sys
import time
from collections.abc import Awaitable, Sequence

from xdsfast import log
from xdsfast.dns.metrics import DnsMetrics
from xdsfast.dns.resolvconf import is_ipv6
from xdsfast.dns.wire import HEADER, QR

_log = log.scope("dns")

UDP_BUFFER = 65535
Server = tuple[str, int]


class UpstreamError(Exception):
    """An upstream's reply that is not an answer to our query."""


if sys.version_info >= (3, 11):

    async def _within(aw: Awaitable[bytes], seconds: float) -> bytes:
        async with asyncio.timeout(seconds):
            return await aw

else:  # pragma: no cover - Python 3.10

    async def _within(aw: Awaitable[bytes], seconds: float) -> bytes:
        return await asyncio.wait_for(aw, seconds)


def _check(query: bytes, reply: bytes) -> bool:
    """Is ``reply`` an answer (QR set) to ``query`` (same ID)?"""
    return len(reply) >= HEADER and reply[:2] == query[:2] and bool(reply[2] & (QR >> 8))


class Forwarder:
    def __init__(
        self,
        servers: Sequence[Server],
        metrics: DnsMetrics,
        *,
        timeout: float = 5.0,
        parallel: bool = False,
        rng: random.Random | None = None,
    ) -> None:
        self.servers = list(servers)
        self._families = {
            server: socket.AF_INET6 if is_ipv6(server[0]) else socket.AF_INET
            for server in self.servers
        }
        self.metrics = metrics
        self.timeout = timeout
        self.parallel = parallel
        self.rng = rng or random.Random()

    async def forward(self, query: bytes, tcp: bool) -> bytes | None:
        """The first upstream answer to ``query``; None (counted) if all servers failed."""
        m = self.metrics
        m.upstream_requests += 1
        start = time.perf_counter()
        try:
            if self.parallel and len(self.servers) > 1:
                reply = await self._parallel(query, tcp)
            else:
                reply = await self._sequential(query, tcp)
        finally:
            m.upstream_duration.observe(time.perf_counter() - start)
        if reply is None:
            m.upstream_failures += 1
        return reply

    async def _sequential(self, query: bytes, tcp: bool) -> bytes | None:
        order = list(self.servers)
        self.rng.shuffle(order)
        for server in order:
            try:
                return await self.exchange(server, query, tcp)
            except (OSError, asyncio.TimeoutError, UpstreamError) as exc:
                _failed(server, tcp, exc)
        return None

    async def _parallel(self, query: bytes, tcp: bool) -> bytes | None:
        tasks = {
            asyncio.ensure_future(self.exchange(server, query, tcp)): server
            for server in self.servers
        }
        try:
            pending = set(tasks)
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    exc = task.exception()
                    if exc is None:
                        return task.result()
                    _failed(tasks[task], tcp, exc)
            return None
        finally:
            for task in tasks:
                task.cancel()

    async def exchange(self, server: Server, query: bytes, tcp: bool) -> bytes:
        """One query to one server, within the per-server timeout."""
        io = self._tcp(server, query) if tcp else self._udp(server, query)
        return await _within(io, self.timeout)

    async def _udp(self, server: Server, query: bytes) -> bytes:
        loop = asyncio.get_running_loop()
        with socket.socket(self._families[server], socket.SOCK_DGRAM) as sock:
            sock.setblocking(False)
            sock.connect(server)  # only this server's datagrams reach the socket
            await loop.sock_sendall(sock, query)
            while True:
                reply = await loop.sock_recv(sock, UDP_BUFFER)
                if _check(query, reply):
                    return reply
                # a stray or forged datagram: keep waiting for the real answer

    async def _tcp(self, server: Server, query: bytes) -> bytes:
        reader, writer = await asyncio.open_connection(server[0], server[1])
        try:
            writer.write(len(query).to_bytes(2, "big") + query)
            size = int.from_bytes(await reader.readexactly(2), "big")
            reply = await reader.readexactly(size)
        except asyncio.IncompleteReadError as exc:
            raise UpstreamError("connection closed before the answer") from exc
        finally:
            writer.close()
        if not _check(query, reply):
            raise UpstreamError("answer with another ID")
        return reply


def _failed(server: Server, tcp: bool, exc: BaseException) -> None:
    reason = "timeout" if isinstance(exc, asyncio.TimeoutError) else str(exc) or type(exc).__name__
    _log.debug(
        "upstream DNS query failed",
        extra=log.fields(
            upstream=f"{server[0]}:{server[1]}", protocol="tcp" if tcp else "udp", error=reason
        ),
    )
