"""Hostile DNS messages against a running DNS proxy on loopback: compression-pointer chains
and loops get FORMERR after bounded work, and the proxy goes on answering.

Such a query once froze the process for seconds: a chain of names (each one label and a
pointer to the previous one) made the parser's pointer following super-linear.  "Bounded
work" is checked without a clock: the steps run on the event loop's thread while one hostile
message is handled (Python lines with ``sys.settrace``, C calls with ``sys.setprofile``) are
counted, and dnslib's parser (the one that went super-linear) must never be called.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.rrset
import dns.tsigkeyring
import dnslib
import pytest
from dns.edns import ECSOption, GenericOption, OptionType
from test_dns import (
    TRANSPORTS,
    Dns,
    addresses,
    fed,
    good_query,
    is_local,
    open_udp,
    start_dns,
)

from xdsfast.dns import server as dns_server
from xdsfast.dns.handler import Handler
from xdsfast.dns.metrics import DnsMetrics
from xdsfast.dns.table import DnsTable
from xdsfast.metrics import Metrics
from xdsfast.peers import mesh

__all__ = ["fed", "start_dns"]  # fixtures, imported for pytest

FORMERR = dns.rcode.FORMERR
# Steps (Python lines and C calls) allowed on the loop while one hostile message is handled
# and its reply reaches the test, the test's own awaiting included: the fixed code takes a few
# thousand at most (a name walk is capped), the old dnslib parse of a 16 KB chain millions.
STEP_BOUND = 20_000
RR = struct.Struct("!HHIH")
PRIVATE_TYPE = 65280  # a private-use type: its data is opaque to any parser


def _head(qid: int, arcount: int) -> bytes:
    return struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, arcount)


# "hostile.example. A IN", at offset 12: a name the table does not know, so the message is
# not answered from the table before its records are read (the fast path reads the header
# and the question only).
QUESTION = b"\x07hostile\x07example\x00\x00\x01\x00\x01"


POINTABLE = 0x4000  # a compression pointer has 14 bits: it reaches the first 16 KiB only


def record_chain(size: int, qid: int = 0xBEEF) -> bytes:
    """A query whose additional section is ``size`` bytes of records, each named by one label
    and a pointer to the previous record's name (the first one points at the question).  Past
    the reach of a pointer, each record points at the last (deepest) name within it: the
    costliest a lenient parser can be made to read."""
    body = bytearray(QUESTION)
    previous = 12
    count = 0
    while 12 + len(body) + 18 <= size:
        start = 12 + len(body)
        body += b"\x01b" + struct.pack("!H", 0xC000 | previous) + RR.pack(1, 1, 0, 4)
        body += b"\x7f\x00\x00\x01"
        if start < POINTABLE:
            previous = start
        count += 1
    return _head(qid, count) + bytes(body)


def deep_name(size: int, *, labels: bool, qid: int = 0xBEEF) -> bytes:
    """A query of ``size`` bytes with two additional records, within the counts a query may
    have: the first one's data is a chain of pointers (each after a label if ``labels``) as
    long as pointers reach, and the second one's name points at the chain's end, so reading
    that one name walks the whole chain."""
    head = _head(qid, 2) + QUESTION + b"\x00"  # the first record's name: the root
    data_start = len(head) + RR.size
    tail = 2 + RR.size + 4  # the second record
    chain = bytearray()
    previous = 12
    element = (b"\x02cc" if labels else b"") + b"\xc0\x00"
    while data_start + len(chain) + len(element) + tail <= size:
        here = data_start + len(chain)
        if here + len(element) > POINTABLE:
            chain += bytes(size - tail - data_start - len(chain))  # padding, never read
            break
        chain += element[:-2] + struct.pack("!H", 0xC000 | previous)
        previous = here
    first = RR.pack(PRIVATE_TYPE, 1, 0, len(chain)) + bytes(chain)
    second = struct.pack("!H", 0xC000 | previous) + RR.pack(1, 1, 0, 4) + b"\x7f\x00\x00\x01"
    return head + first + second


def pointer_loop(kind: str, qid: int = 0xBEEF) -> bytes:
    """A query whose additional record's name loops: a pointer to itself, to a pointer back
    to it, or to a label just before it (which leads back to the same pointer)."""
    head = _head(qid, 1) + QUESTION
    at = len(head)
    if kind == "self":
        name = struct.pack("!H", 0xC000 | at)
    elif kind == "pair":  # at -> at + 2 -> at
        name = struct.pack("!HH", 0xC000 | (at + 2), 0xC000 | at)
    else:  # "label": "\x01d" then a pointer back to the "\x01d"
        name = b"\x01d" + struct.pack("!H", 0xC000 | at)
    return head + name + RR.pack(1, 1, 0, 4) + b"\x7f\x00\x00\x01"


HOSTILE = {
    "chain16k": record_chain(16_000),
    "chain65k": record_chain(65_000),
    "labels16k": deep_name(16_000, labels=True),
    "labels65k": deep_name(65_000, labels=True),
    "pointers65k": deep_name(65_000, labels=False),
    "loop_self": pointer_loop("self"),
    "loop_pair": pointer_loop("pair"),
    "loop_label": pointer_loop("label"),
}


class Work:
    """Steps run on this thread while counting: Python lines (pure-Python loops included) and
    C calls.  This thread is the event loop's, where the in-process proxy runs; the test's own
    awaiting is counted too (a few hundred steps).  Past ``cap`` it stops counting, so the old
    code fails fast rather than slowly."""

    def __init__(self, cap: int = STEP_BOUND) -> None:
        self.cap = cap
        self.steps = 0
        self._saved: tuple[Any, Any] = (None, None)

    def _over(self) -> bool:
        self.steps += 1
        if self.steps <= self.cap:
            return False
        sys.settrace(self._saved[0])
        sys.setprofile(self._saved[1])
        return True

    def _line(self, frame: FrameType, event: str, arg: Any) -> Any:
        return None if self._over() else self._line

    def _call(self, frame: FrameType, event: str, arg: Any) -> None:
        if event == "c_call":
            self._over()

    @contextmanager
    def counting(self) -> Iterator[None]:
        self._saved = (sys.gettrace(), sys.getprofile())
        sys.settrace(self._line)
        sys.setprofile(self._call)
        try:
            yield
        finally:
            sys.settrace(self._saved[0])
            sys.setprofile(self._saved[1])


@pytest.fixture
def parses(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Sizes of the messages given to dnslib's parser from now on (the fake upstream parses
    what is forwarded to it: the tests forward nothing)."""
    calls: list[int] = []
    original = dnslib.DNSRecord.parse

    def recording(packet: bytes) -> dnslib.DNSRecord:
        calls.append(len(packet))
        return original(packet)

    monkeypatch.setattr(dnslib.DNSRecord, "parse", staticmethod(recording))
    return calls


def assert_formerr(reply: bytes, qid: int = 0xBEEF) -> None:
    assert reply[:2] == qid.to_bytes(2, "big")
    assert reply[2] & 0x80  # QR
    assert reply[3] & 0x0F == FORMERR
    assert reply[4:12] == bytes(8)  # no question echoed, no records


def assert_backend(reply: dns.message.Message, qid: int) -> None:
    assert reply.id == qid and is_local(reply)
    assert sorted(addresses(reply)) == ["10.0.0.1", "10.0.0.2", "10.0.0.3"]


def malformed(env: Dns) -> float:
    """Malformed queries answered FORMERR so far (xdsfast_dns_malformed_messages_total)."""
    found = env.agent.metrics.sample("xdsfast_dns_malformed_messages_total", {"reply": "formerr"})
    return 0.0 if found is None else found


async def tcp_exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, message: bytes
) -> bytes:
    writer.write(len(message).to_bytes(2, "big") + message)
    size = int.from_bytes(await asyncio.wait_for(reader.readexactly(2), 10), "big")
    return await asyncio.wait_for(reader.readexactly(size), 10)


# -- the messages themselves --------------------------------------------------------------------


def test_the_hostile_messages_are_what_they_say() -> None:
    """The builders make what the tests claim: big, and (loops aside) messages a lenient
    parser reads, with thousands of records or one name thousands of pointers deep."""
    for case in ("chain16k", "labels16k"):
        data = HOSTILE[case]
        assert 15_900 <= len(data) <= 16_000
    for case in ("chain65k", "labels65k", "pointers65k"):
        assert 64_900 <= len(HOSTILE[case]) <= 65_000
    assert struct.unpack_from("!H", HOSTILE["chain65k"], 10)[0] > 3000  # ARCOUNT
    small = record_chain(600)  # short enough for dnslib's recursive name reading
    parsed = dnslib.DNSRecord.parse(small)
    assert len(parsed.ar) == struct.unpack_from("!H", small, 10)[0] > 30
    assert str(parsed.ar[-1].rname).startswith("b.b.b.b.")
    deep = deep_name(600, labels=True)
    assert str(dnslib.DNSRecord.parse(deep).ar[1].rname).count("cc.") > 100


# -- over real sockets ----------------------------------------------------------------------


@pytest.mark.parametrize("case", list(HOSTILE))
async def test_hostile_udp_query_gets_formerr_after_bounded_work(
    fed: Dns, parses: list[int], case: str
) -> None:
    transport, client = await open_udp(fed.port)
    before = malformed(fed)
    try:
        work = Work()
        with work.counting():
            transport.sendto(HOSTILE[case])
            reply = await client.recv()
        assert work.steps <= STEP_BOUND, f"{work.steps} steps for one message"
        assert_formerr(reply)
        transport.sendto(good_query(7))  # and a normal query right after is answered
        assert_backend(dns.message.from_wire(await client.recv()), 7)
    finally:
        transport.close()
    assert parses == []  # dnslib never saw the hostile message (nor the good one)
    assert malformed(fed) == before + 1
    assert fed.upstreams[0].queries == []


@pytest.mark.parametrize("case", list(HOSTILE))
async def test_hostile_tcp_query_gets_formerr_after_bounded_work(
    fed: Dns, parses: list[int], case: str
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", fed.port)
    before = malformed(fed)
    try:
        work = Work()
        with work.counting():
            reply = await tcp_exchange(reader, writer, HOSTILE[case])
        assert work.steps <= STEP_BOUND, f"{work.steps} steps for one message"
        assert_formerr(reply)
        again = await tcp_exchange(reader, writer, good_query(8))  # same connection goes on
        assert_backend(dns.message.from_wire(again), 8)
    finally:
        writer.close()
    assert parses == []
    assert malformed(fed) == before + 1
    assert fed.upstreams[0].queries == []


async def test_chains_every_so_often_while_normal_queries_continue(
    fed: Dns, parses: list[int]
) -> None:
    """A 65 KB chain over UDP and one over TCP every few queries: every normal query, on
    either transport, is answered from the table, and every chain gets FORMERR after bounded
    work."""
    transport, client = await open_udp(fed.port)
    reader, writer = await asyncio.open_connection("127.0.0.1", fed.port)
    try:
        for round_ in range(8):
            udp_chain = record_chain(65_000, qid=round_)
            tcp_chain = deep_name(65_000, labels=True, qid=round_)
            work = Work()
            with work.counting():
                transport.sendto(udp_chain)
                udp_reply = await client.recv()
                tcp_reply = await tcp_exchange(reader, writer, tcp_chain)
            assert work.steps <= STEP_BOUND, f"{work.steps} steps for two messages"
            assert_formerr(udp_reply, round_)
            assert_formerr(tcp_reply, round_)
            for i in range(10):
                qid = 100 * round_ + i
                transport.sendto(good_query(qid))
                assert_backend(dns.message.from_wire(await client.recv()), qid)
                reply = await tcp_exchange(reader, writer, good_query(qid + 50))
                assert_backend(dns.message.from_wire(reply), qid + 50)
    finally:
        transport.close()
        writer.close()
    assert parses == []
    assert malformed(fed) == 16


# -- from a client that is not on loopback (fake transports: tests use loopback only) -------


class _FakeUdp:
    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def sendto(self, data: bytes, addr: Any = None) -> None:
        self.sent.append(bytes(data))

    def is_closing(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return 0


class _FakeTcp:
    def __init__(self, peer: tuple[str, int]) -> None:
        self.peer = peer
        self.out = bytearray()
        self.closed = False

    def write(self, data: bytes) -> None:
        self.out += data

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.peer if name == "peername" else default

    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True


class _NoUpstream:
    def __init__(self) -> None:
        self.asked: list[bytes] = []

    async def forward(self, query: bytes, tcp: bool) -> bytes | None:
        self.asked.append(query)
        return None


@pytest.mark.parametrize("tcp", TRANSPORTS)
@pytest.mark.parametrize("case", ["chain65k", "labels65k", "loop_pair"])
async def test_a_remote_client_gets_formerr_without_a_parse(
    parses: list[int], tcp: bool, case: str
) -> None:
    """The old parse ran before the REFUSED check, so a non-loopback client could freeze the
    proxy too; now the bounded check comes first and nothing is forwarded or parsed."""
    table = DnsTable()
    table.update(mesh.sample_name_table(), "1")
    await table.wait_updates(1)
    metrics = Metrics()
    upstream = _NoUpstream()
    handler = Handler(table, DnsMetrics(metrics))
    server = dns_server.DnsServer(handler, upstream)  # type: ignore[arg-type]
    data = HOSTILE[case]
    work = Work()
    with work.counting():
        if tcp:
            fake = _FakeTcp(("10.1.2.3", 5353))
            conn = dns_server._Tcp(server)
            conn.connection_made(fake)  # type: ignore[arg-type]
            conn.data_received(len(data).to_bytes(2, "big") + data)
            replies = [bytes(fake.out[2:])]
            conn.connection_lost(None)
        else:
            udp = _FakeUdp()
            proto = dns_server._Udp(server)
            proto.connection_made(udp)  # type: ignore[arg-type]
            proto.datagram_received(data, ("10.1.2.3", 5353))
            replies = udp.sent
    assert work.steps <= STEP_BOUND
    assert len(replies) == 1
    assert_formerr(replies[0])
    assert parses == [] and upstream.asked == []
    assert metrics.sample("xdsfast_dns_malformed_messages_total", {"reply": "formerr"}) == 1
    table.close()


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_malformed_messages_are_counted_and_logged_at_debug_only() -> None:
    """Each one is counted by what it got (FORMERR, or nothing) and logged once, at debug:
    a flood of them cannot flood the log at the default level, and no bytes are logged."""
    metrics = Metrics()
    handler = Handler(DnsTable(), DnsMetrics(metrics))
    response = bytearray(good_query(3))
    response[2] |= 0x80
    logger = logging.getLogger("xdsfast.dns")
    records = _Records()
    level = logger.level
    logger.addHandler(records)
    logger.setLevel(logging.DEBUG)
    try:
        for data in (HOSTILE["chain65k"], HOSTILE["loop_self"], b"\x12\x34", bytes(response)):
            handler.slow(data, tcp=False)
    finally:
        logger.removeHandler(records)
        logger.setLevel(level)
    assert [r.levelno for r in records.records] == [logging.DEBUG] * 4
    fields = [r.fields for r in records.records]  # type: ignore[attr-defined]
    assert [f["reason"] for f in fields] == [
        "more records than a query carries",
        "compression pointer does not point back",
        "shorter than a DNS header",
        "a response, not a query",
    ]
    assert [f["reply"] for f in fields] == ["formerr", "formerr", "none", "none"]
    assert fields[0]["size"] == len(HOSTILE["chain65k"])
    name = "xdsfast_dns_malformed_messages_total"
    assert metrics.sample(name, {"reply": "formerr"}) == 2
    assert metrics.sample(name, {"reply": "none"}) == 2
    assert f'{name}{{reply="formerr"}} 2' in metrics.exposition().decode()


# -- what must not change: real clients' queries ----------------------------------------------


@pytest.mark.parametrize("tcp", TRANSPORTS)
async def test_queries_with_edns_options_and_tsig_are_still_served(fed: Dns, tcp: bool) -> None:
    """What real clients add to a query (EDNS options: client subnet, a cookie, padding, an
    empty keepalive; a TSIG signature) stays within the bounds: answered from the table, or
    forwarded byte for byte."""
    options = [
        ECSOption("192.0.2.0", 24),
        GenericOption(OptionType.COOKIE, b"\x01" * 8),  # a client cookie
        GenericOption(OptionType.KEEPALIVE, b""),  # empty in a query
        GenericOption(OptionType.PADDING, b"\x00" * 300),
    ]
    keyring = dns.tsigkeyring.from_text({"key.example.": "c2VjcmV0c2VjcmV0c2VjcmV0"})
    transport, client = await open_udp(fed.port)
    reader, writer = await asyncio.open_connection("127.0.0.1", fed.port)
    try:
        for name, local in (("backend.", True), ("elsewhere.example.", False)):
            q = dns.message.make_query(name, "A", use_edns=0, payload=1232, options=options)
            q.use_tsig(keyring, keyname="key.example.")
            wire = q.to_wire()
            assert struct.unpack_from("!H", wire, 10)[0] == 2  # OPT and TSIG
            if tcp:
                raw = await tcp_exchange(reader, writer, wire)
            else:
                transport.sendto(wire)
                raw = await client.recv()
            reply = dns.message.from_wire(raw)
            assert reply.id == q.id and reply.rcode() == dns.rcode.NOERROR
            assert is_local(reply) is local
    finally:
        transport.close()
        writer.close()
    assert fed.upstreams[0].queries == [("tcp" if tcp else "udp", wire)]


async def test_an_ixfr_query_with_its_soa_is_forwarded(fed: Dns) -> None:
    """An IXFR query carries the client's SOA in the authority section (RFC 1995), its name
    compressed to the question's: the one authority record a query may have."""
    zone = dns.name.from_text("zone.example.")
    q = dns.message.make_query(zone, dns.rdatatype.IXFR)
    soa = dns.rrset.from_text(
        zone, 0, "IN", "SOA", "ns.zone.example. admin.zone.example. 7 3600 600 86400 60"
    )
    q.authority.append(soa)
    wire = q.to_wire()
    assert wire[6:10] == b"\x00\x00\x00\x01" and b"\xc0\x0c" in wire[12 + 18 :]
    reply = await fed.send(q, tcp=True)
    assert reply.rcode() == dns.rcode.NOERROR
    assert fed.upstreams[0].queries == [("tcp", wire)]


async def test_more_records_than_a_query_has_is_formerr_even_for_a_known_name(
    fed: Dns, parses: list[int]
) -> None:
    """The counts are checked first, on the fast path too: a known name with an answer record
    or three additional ones is not answered from the table but refused as malformed."""
    transport, client = await open_udp(fed.port)
    try:
        base = good_query(0xBEEF)
        opt = b"\x00" + RR.pack(41, 1232, 0, 0)
        bad = [
            base[:6] + b"\x00\x01" + base[8:],  # ANCOUNT 1
            base[:10] + b"\x00\x03" + base[12:] + opt * 3,  # three OPT records
            base[:8] + b"\x00\x02" + base[10:],  # NSCOUNT 2
        ]
        for data in bad:
            transport.sendto(data)
            assert_formerr(await client.recv())
        transport.sendto(base[:10] + b"\x00\x01" + base[12:] + opt)  # one OPT: answered
        assert_backend(dns.message.from_wire(await client.recv()), 0xBEEF)
    finally:
        transport.close()
    assert parses == []


# -- the bounded check itself ---------------------------------------------------------------


def _with_record(name: bytes, rtype: int = 1, data: bytes = b"\x7f\x00\x00\x01") -> bytes:
    return _head(0xBEEF, 1) + QUESTION + name + RR.pack(rtype, 1, 0, len(data)) + data


def test_check_query_follows_real_compression() -> None:
    from xdsfast.dns.wire import check_query, name_end

    # A name that is one label and a pointer to the question, then one pointing at that.
    data = _head(1, 2) + QUESTION + b"\x01a\xc0\x0c" + RR.pack(PRIVATE_TYPE, 1, 0, 1) + b"\x00"
    data += b"\x01b\xc0" + bytes([len(_head(1, 2) + QUESTION)]) + RR.pack(1, 1, 0, 4) + bytes(4)
    assert check_query(data) == (len(_head(1, 2) + QUESTION), 512)
    assert name_end(data, len(_head(1, 2) + QUESTION)) == len(_head(1, 2) + QUESTION) + 4
    opt = b"\x00" + RR.pack(41, 4096, 0, 8) + b"\x00\x0a\x00\x04abcd"
    assert check_query(_head(2, 1) + QUESTION + opt)[1] == 4096


BEYOND_BOUNDS = {
    "record_chain": (HOSTILE["chain16k"], "more records than a query carries"),
    "label_chain": (HOSTILE["labels65k"], "name longer than 255 bytes"),
    "pointer_chain": (HOSTILE["pointers65k"], "more than 127 compression pointers"),
    "loop_self": (HOSTILE["loop_self"], "does not point back"),
    "loop_pair": (HOSTILE["loop_pair"], "does not point back"),
    "loop_label": (HOSTILE["loop_label"], "does not point back"),
    "into_header": (_with_record(b"\xc0\x02"), "does not point back"),
    "label_type": (_with_record(b"\x41" + b"x" * 65 + b"\x00"), "invalid label type"),
    "not_utf8": (_with_record(b"\x01\xff\x00"), "not UTF-8"),
    "option_past_end": (
        _with_record(b"\x00", rtype=41, data=b"\x00\x0a\x00\x09abcd"),
        "EDNS option runs past",
    ),
    "many_options": (
        _with_record(b"\x00", rtype=41, data=b"\x00\x0b\x00\x00" * 33),
        "more than 32 EDNS",
    ),
    "empty_data": (_with_record(b"\x00", rtype=16, data=b""), "record with no data"),
    "short_data": (_with_record(b"\x00")[:-1], "record data runs past the end"),
}


@pytest.mark.parametrize("case", list(BEYOND_BOUNDS))
def test_check_query_refuses_beyond_its_bounds(case: str) -> None:
    from xdsfast.dns.wire import WireError, check_query

    data, reason = BEYOND_BOUNDS[case]
    with pytest.raises(WireError, match=reason):
        check_query(data)


def test_a_name_at_the_bounds_is_accepted() -> None:
    """127 one-byte labels, each followed by a pointer, make a 255-byte name: the largest
    there is, and as many pointers as it may follow."""
    from xdsfast.dns.wire import check_query

    head = _head(0xBEEF, 2) + b"\x00\x00\x01\x00\x01"  # the root: a 1-byte question name
    chain = bytearray()
    previous = 12
    for _ in range(126):
        here = len(head) + 1 + RR.size + len(chain)
        chain += b"\x01c" + struct.pack("!H", 0xC000 | previous)
        previous = here
    data = head + b"\x00" + RR.pack(PRIVATE_TYPE, 1, 0, len(chain)) + bytes(chain)
    data += b"\x01c" + struct.pack("!H", 0xC000 | previous) + RR.pack(1, 1, 0, 4) + bytes(4)
    assert check_query(data)[0] == len(head)
    assert str(dnslib.DNSRecord.parse(data).ar[1].rname).count("c.") == 127
