"""Fuzz the DNS server's packet handling: its UDP and TCP protocols, fed without sockets.

The first input byte picks the transport (and, for TCP, where the stream is cut into
reads and whether the client half-closes); the rest is what the client sends.  Upstream
forwarding is a stand-in that answers (an echo, sometimes too big for UDP) or fails, as
the input says.  Nothing may raise; every reply answers a message the client sent (its ID,
QR set); UDP replies fit the client's size (512 without EDNS, else its OPT size); TCP
output is well-framed.

    python fuzz/fuzz_dns.py -runs=1000000
"""

from __future__ import annotations

import asyncio
import logging
import struct
import sys
from typing import Any

from _driver import instrumented, main

with instrumented():
    from xdsfast import nds_pb2
    from xdsfast.dns import server as dns_server
    from xdsfast.dns.handler import Handler
    from xdsfast.dns.metrics import DnsMetrics
    from xdsfast.dns.names import NameRules
    from xdsfast.dns.table import DnsTable
    from xdsfast.metrics import Metrics

logging.disable(logging.CRITICAL)


class _Forwarder:
    """Upstream stand-in: answers with the query echoed back (QR set), or fails."""

    def __init__(self) -> None:
        self.mode = 0

    async def forward(self, query: bytes, tcp: bool) -> bytes | None:
        await asyncio.sleep(0)
        if self.mode % 3 == 0:
            return None
        reply = bytearray(query)
        if len(reply) >= 3:
            reply[2] |= 0x80
        if self.mode % 3 == 2:
            reply += b"\x00" * 700  # bigger than a UDP client without EDNS takes
        return bytes(reply)


class _UdpTransport:
    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def sendto(self, data: bytes, addr: Any = None) -> None:
        self.sent.append(bytes(data))

    def is_closing(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return 0


class _TcpTransport:
    def __init__(self) -> None:
        self.out = bytearray()
        self.closed = False

    def write(self, data: bytes) -> None:
        assert not self.closed, "write after close"
        self.out += data

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


def _table() -> DnsTable:
    names = nds_pb2.NameTable()
    names.table["backend.default.svc.cluster.local"].CopyFrom(
        nds_pb2.NameTable.NameInfo(
            ips=["10.0.0.1", "2001:db8::1"],
            registry="Kubernetes",
            shortname="backend",
            namespace="default",
        )
    )
    names.table["*.wild.example.com"].CopyFrom(
        nds_pb2.NameTable.NameInfo(ips=[f"240.240.0.{i}" for i in range(1, 60)])
    )
    table = DnsTable(NameRules(namespace="default", search=("default.svc.cluster.local",)))
    table.update(names, "1")  # no event loop yet: built right here
    assert table.answers is not None
    return table


LOOP = asyncio.new_event_loop()
asyncio.set_event_loop(LOOP)
FORWARDER = _Forwarder()
SERVER = dns_server.DnsServer(
    Handler(_table(), DnsMetrics(Metrics())),
    FORWARDER,  # type: ignore[arg-type]
    max_forwards=4,
    tcp_max_pending=2,
)


def _check_reply(reply: bytes, ids: set[bytes]) -> None:
    assert len(reply) >= 12, reply
    assert reply[:2] in ids, (reply, ids)
    assert reply[2] & 0x80, f"QR clear in {reply!r}"


def _udp_limit(query: bytes) -> int:
    """What the server may send back over UDP (found the same way a client would)."""
    from xdsfast.dns.wire import WireError, question_end, udp_limit_from_opt

    try:
        return udp_limit_from_opt(query, question_end(query))
    except (WireError, IndexError, struct.error):
        return 512


async def _udp(payload: bytes) -> None:
    transport = _UdpTransport()
    protocol = dns_server._Udp(SERVER)
    protocol.connection_made(transport)  # type: ignore[arg-type]
    protocol.datagram_received(payload, ("127.0.0.1", 5353))
    for _ in range(4):
        await asyncio.sleep(0)
    assert len(transport.sent) <= 1
    for reply in transport.sent:
        _check_reply(reply, {payload[:2]})
        assert len(reply) <= max(512, _udp_limit(payload)), (len(reply), payload)


async def _tcp(payload: bytes, cut: int, eof: bool) -> None:
    transport = _TcpTransport()
    protocol = dns_server._Tcp(SERVER)
    protocol.connection_made(transport)  # type: ignore[arg-type]
    step = max(1, cut)
    for start in range(0, len(payload), step):
        protocol.data_received(payload[start : start + step])
        await asyncio.sleep(0)
    if eof:
        protocol.eof_received()
    for _ in range(6):
        await asyncio.sleep(0)
    ids = set()
    pos = 0
    while pos + 2 <= len(payload):  # the messages the client framed
        size = struct.unpack_from("!H", payload, pos)[0]
        ids.add(payload[pos + 2 : pos + 4])
        pos += 2 + size
    out = bytes(transport.out)
    pos = 0
    while pos < len(out):
        assert pos + 2 <= len(out), "torn length prefix"
        size = struct.unpack_from("!H", out, pos)[0]
        assert pos + 2 + size <= len(out), "torn frame"
        _check_reply(out[pos + 2 : pos + 2 + size], ids)
        pos += 2 + size
    protocol.abort()
    protocol.connection_lost(None)


def test_one_input(data: bytes) -> None:
    if len(data) < 2:
        return
    control, payload = data[0], data[2:]
    FORWARDER.mode = data[1]
    if control & 1:
        LOOP.run_until_complete(_udp(payload))
    else:
        LOOP.run_until_complete(_tcp(payload, control >> 2, bool(control & 2)))
    for task in list(SERVER._tasks):  # forwards still in flight: settle them
        LOOP.run_until_complete(asyncio.wait_for(task, 5))


def _query(name: str, qtype: int, *, edns: int | None = None, qid: int = 0x1234) -> bytes:
    question = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\x00"
    arcount = 1 if edns is not None else 0
    message = struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, arcount) + question
    message += struct.pack("!HH", qtype, 1)
    if edns is not None:
        message += b"\x00" + struct.pack("!HHIH", 41, edns, 0, 0)
    return message


def seeds() -> list[bytes]:
    queries = [
        _query("backend.default.svc.cluster.local", 1),
        _query("BACKEND.default.svc.cluster.local", 28),
        _query("backend", 1),
        _query("x.wild.example.com", 1, edns=4096),
        _query("x.wild.example.com", 1),
        _query("unknown.example.org", 1),
        _query("backend.default.svc.cluster.local", 16),
    ]
    out = [b"\x01\x00" + q for q in queries] + [b"\x01\x02" + q for q in queries]
    framed = b"".join(struct.pack("!H", len(q)) + q for q in queries)
    out += [bytes([c, 1]) + framed for c in (0, 2, 4 * 3, 4 * 7 + 2)]
    return out


if __name__ == "__main__":
    sys.exit(main(test_one_input, seeds()))
