"""Fuzz the DNS server's packet handling: its UDP and TCP protocols, fed without sockets.

The first input byte picks the transport (and, for TCP, where the stream is cut into
reads and whether the client half-closes); the rest is what the client sends.  Upstream
forwarding is a stand-in that answers (an echo, sometimes too big for UDP) or fails, as
the input says.  Nothing may raise; every reply answers a message the client sent (its ID,
QR set); UDP replies fit the client's size (512 without EDNS, else its OPT size); TCP
output is well-framed; no client bytes ever reach dnslib's parser.

With the top bit of the second byte set, the rest of the input is not the message but the
parameters of one built from them (up to 64 KiB, more than byte mutations reach):
compression-pointer chains across thousands of records, one name thousands of pointers
deep (with or without labels between them), pointer loops, pointers into the header, and
pointer soup.  Those beyond DNS's bounds must get exactly one FORMERR; those within,
anything but FORMERR.

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
    import dnslib

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


def _never_parse(packet: bytes) -> Any:
    raise AssertionError("a client's message reached dnslib's parser")


dnslib.DNSRecord.parse = _never_parse


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


def _formerr(replies: list[bytes], expected: bool | None) -> None:
    """One FORMERR if ``expected``; anything but FORMERR if False; None: no expectation."""
    if expected is None:
        return
    formerr = len(replies) == 1 and replies[0][3] & 0x0F == 1
    assert formerr is expected, (expected, replies[:1])


async def _udp(payload: bytes, formerr: bool | None = None) -> None:
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
    _formerr(transport.sent, formerr)


async def _tcp(payload: bytes, cut: int, eof: bool, formerr: bool | None = None) -> None:
    transport = _TcpTransport()
    protocol = dns_server._Tcp(SERVER)
    protocol.connection_made(transport)  # type: ignore[arg-type]
    step = max(1, cut) * (1024 if formerr is not None else 1)  # big built messages: big reads
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
    replies = []
    while pos < len(out):
        assert pos + 2 <= len(out), "torn length prefix"
        size = struct.unpack_from("!H", out, pos)[0]
        assert pos + 2 + size <= len(out), "torn frame"
        replies.append(out[pos + 2 : pos + 2 + size])
        _check_reply(replies[-1], ids)
        pos += 2 + size
    _formerr(replies, formerr)
    protocol.abort()
    protocol.connection_lost(None)


# -- built messages: pointer chains and loops ---------------------------------------------------

_RR = struct.Struct("!HHIH")
_QUESTION = b"\x04fuzz\x07example\x00\x00\x01\x00\x01"  # not in the table: never a fast answer
_BIG = 65535 - 64  # what one TCP frame carries, less the records' tail


def _head(qid: int, arcount: int) -> bytes:
    return struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, arcount)


def _record_chain(qid: int, count: int, label: bytes) -> tuple[bytes, bool]:
    """``count`` additional records, each named ``label`` + a pointer to the previous name
    (past a pointer's 16 KiB reach, to the last one within it)."""
    body = bytearray(_QUESTION)
    previous = 12
    for made in range(count):
        if 12 + len(body) > _BIG:
            count = made
            break
        start = 12 + len(body)
        body += label + struct.pack("!H", 0xC000 | previous) + _RR.pack(1, 1, 0, 4) + bytes(4)
        if start < 0x4000:
            previous = start
    return _head(qid, count) + bytes(body), count > 2


def _deep_name(qid: int, depth: int, label: bytes) -> tuple[bytes, bool]:
    """Two records: the first's data a chain of ``depth`` pointers (each after ``label``;
    fewer if they would go past a pointer's 16 KiB reach), the second named by a pointer to
    the chain's end: one name ``depth`` + 1 pointers deep."""
    head = _head(qid, 2) + _QUESTION + b"\x00"
    data_start = len(head) + _RR.size
    chain = bytearray()
    previous = 12
    for made in range(depth):
        if data_start + len(chain) + len(label) + 2 > 0x4000:
            depth = made
            break
        here = data_start + len(chain)
        chain += label + struct.pack("!H", 0xC000 | previous)
        previous = here
    first = _RR.pack(65280, 1, 0, len(chain)) + bytes(chain)
    second = struct.pack("!H", 0xC000 | previous) + _RR.pack(1, 1, 0, 4) + bytes(4)
    length = len(_QUESTION) - 4 + depth * len(label)  # the name's wire length, root included
    return head + first + second, depth + 1 > 127 or length > 255


def _loop(qid: int, kind: int, offset: int) -> tuple[bytes, bool]:
    """A name that loops (to itself, through a forward pointer, back over its own label) or
    points into the header: never a name."""
    head = _head(qid, 1) + _QUESTION
    at = len(head)
    names = (
        struct.pack("!H", 0xC000 | at),
        struct.pack("!HH", 0xC000 | (at + 2), 0xC000 | at),
        bytes([1 + offset % 63]) + b"x" * (1 + offset % 63) + struct.pack("!H", 0xC000 | at),
        struct.pack("!H", 0xC000 | (offset % 12)),
    )
    return head + names[kind % 4] + _RR.pack(1, 1, 0, 4) + bytes(4), True


def _soup(qid: int, params: bytes) -> tuple[bytes, bool | None]:
    """Up to two records whose names are ``params`` with every byte >= 0xC0 a pointer."""
    head = _head(qid, 2) + _QUESTION
    half = len(params) // 2
    names = [bytearray(params[:half]) + b"\x00", bytearray(params[half:]) + b"\x00"]
    return head + b"".join(bytes(n) + _RR.pack(1, 1, 0, 4) + bytes(4) for n in names), None


def built(params: bytes) -> tuple[bytes, bool | None]:
    """(a message, whether it must get FORMERR: None if either way) from ``params``."""
    params = params + bytes(max(0, 5 - len(params)))
    kind, qid = params[0] % 4, (params[1] << 8) | params[2]
    number = (params[3] << 8) | params[4]
    size = params[0] >> 6
    label = bytes([size]) + b"l" * size if size else b""  # no label, or one of 1 to 3 bytes
    if kind == 0:
        return _record_chain(qid, number % 6000, label or b"\x01l")
    if kind == 1:
        return _deep_name(qid, number % 40000 or 1, label)
    if kind == 2:
        return _loop(qid, params[3], params[4])
    return _soup(qid, params[5:])


def test_one_input(data: bytes) -> None:
    if len(data) < 2:
        return
    control, payload = data[0], data[2:]
    FORWARDER.mode = data[1]
    formerr: bool | None = None
    if data[1] & 0x80:
        payload, formerr = built(payload)
        if not control & 1:
            payload = struct.pack("!H", len(payload)) + payload
    if control & 1:
        LOOP.run_until_complete(_udp(payload, formerr))
    else:
        LOOP.run_until_complete(_tcp(payload, control >> 2, bool(control & 2), formerr))
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
    chains = [
        b"\x00\x12\x34\x0f\xa0",  # 4000 records, each "\x01l" + a pointer
        b"\x40\x12\x34\x00\x40",  # 64 records, each "\x01l" + a pointer
        b"\x01\x12\x34\x9c\x3f",  # one name 8000-odd pointers deep (as many as reach)
        b"\x41\x12\x34\x00\x82",  # 130 deep, a 1-byte label after each pointer
        b"\x41\x12\x34\x00\x50",  # 80 deep: within the bounds
        b"\xc1\x12\x34\x00\x46",  # 70 deep, 3-byte labels: over 255 bytes
        b"\xc1\x12\x34\x00\x20",  # 32 deep, 3-byte labels: within
        b"\x01\x12\x34\x00\x7e",  # 126 pointers deep (127 with the name's own): within
        b"\x01\x12\x34\x00\x7f",  # one more: beyond
        b"\x02\x12\x34\x00\x05",  # a pointer to itself
        b"\x02\x12\x34\x01\x05",  # a forward pointer and one back
        b"\x02\x12\x34\x02\x05",  # back over its own label
        b"\x02\x12\x34\x03\x05",  # into the header
        b"\x03\x12\x34\x00\x00\x01a\xc0\x0c\x01b\xc0\x21",  # soup
    ]
    out += [
        bytes([transport, 0x80 | mode]) + c for c in chains for transport, mode in ((1, 1), (0, 2))
    ]
    return out


if __name__ == "__main__":
    sys.exit(main(test_one_input, seeds()))
