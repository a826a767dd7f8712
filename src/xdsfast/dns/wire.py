"""DNS wire-format pieces the proxy handles as raw bytes: names, headers, replies, truncation.

Everything here works on bytes as they travel, so a reply keeps the client's
question exactly as sent (case included) and a forwarded answer stays the
upstream's bytes unless it has to be cut to fit.

Queries come from untrusted clients, so ``check_query`` validates one with
bounded work, whatever its size: the header's counts first (a query has one
question, no answers, and at most a few other records), then each name with
a capped number of labels and compression pointers.  A message over those
bounds is malformed (FORMERR), never a long parse on the event loop.
"""

from __future__ import annotations

import struct

HEADER = 12
UDP_MIN = 512  # the classic UDP limit, and the floor of any EDNS size
TCP_MAX = 65535

TYPE_A = 1
TYPE_CNAME = 5
TYPE_AAAA = 28
TYPE_OPT = 41
CLASS_IN = 1

NOERROR = 0
FORMERR = 1
SERVFAIL = 2
NOTIMP = 4

QR = 0x8000
AA = 0x0400
TC = 0x0200
RD = 0x0100
CD = 0x0010
OPCODE = 0x7800

TTL = 30  # Istio's fixed TTL for local answers, in seconds

# What a query may carry besides its one question (more is FORMERR, before any name is read):
MAX_AUTHORITY = 1  # an IXFR query's SOA (RFC 1995); other queries carry none
MAX_ADDITIONAL = 2  # the EDNS OPT record, and a TSIG or SIG(0) after it
MAX_NAME = 255  # bytes of a name's wire form, all labels and the root (RFC 1035)
MAX_POINTERS = 127  # compression pointers followed for one name: no more than its labels
MAX_OPTIONS = 32  # EDNS options in a query's OPT record (clients send a handful)

_COUNTS = struct.Struct("!HHHH")
_HEADER = struct.Struct("!HHHHHH")
_RR = struct.Struct("!HHIH")  # type, class, ttl, rdlength


class WireError(ValueError):
    """Bytes that are not a well-formed DNS message (or not the part we need)."""


def encode_name(name: str) -> bytes | None:
    """The wire form of a fully qualified name (``a.b.``); None if it cannot be one."""
    return NameEncoder().encode(name)


class NameEncoder:
    """``encode_name`` that remembers suffixes: names sharing a domain encode in one step."""

    def __init__(self) -> None:
        self._memo: dict[str, bytes | None] = {".": b"\x00"}

    def encode(self, name: str) -> bytes | None:
        wire = self._memo.get(name)
        if wire is not None or name in self._memo:
            return wire
        head, dot, rest = name.partition(".")
        tail: bytes | None = None  # None: not fully qualified, or a bad label below
        if dot and rest != ".":  # "a.." has an empty label: no name
            tail = self.encode(rest) if rest else b"\x00"
        wire = None
        if tail is not None and 0 < len(head) < 64 and head.isascii():
            wire = bytes((len(head),)) + head.encode("ascii") + tail
            if len(wire) > 255:
                wire = None
        self._memo[name] = wire
        return wire


def decode_name(wire: bytes) -> str:
    """``b"\\x01a\\x00"`` -> ``"a."`` for an uncompressed wire name (for logs and tests)."""
    labels = []
    pos = 0
    while wire[pos]:
        length = wire[pos]
        labels.append(wire[pos + 1 : pos + 1 + length].decode("ascii", "backslashreplace"))
        pos += 1 + length
    return ".".join(labels) + "."


def question_end(data: bytes) -> int:
    """Offset just past the first question (name, type, class).

    The first question's name cannot be compressed (there is nothing before it
    to point at), so a pointer there is as malformed as a short packet.
    """
    pos = HEADER
    size = len(data)
    while True:
        if pos >= size:
            raise WireError("question name runs past the end")
        length = data[pos]
        if length == 0:
            break
        if length >= 64:
            raise WireError("compressed or invalid label in the question")
        pos += 1 + length
        if pos - HEADER > 255:
            raise WireError("question name longer than 255 bytes")
    end = pos + 5
    if end > size:
        raise WireError("question type or class missing")
    return end


def walk_name(data: bytes, pos: int, labels: list[bytes] | None = None) -> int:
    """Offset just past the name at ``pos`` in place, after walking it whole (its labels,
    uncompressed, appended to ``labels`` when given).

    Compression pointers are followed, at most ``MAX_POINTERS`` of them, each to an
    offset after the header and before the start of everything read so far (where
    an encoder can only have written the suffix earlier), so no loop is possible;
    the labels met on the way may add up to ``MAX_NAME`` bytes.  A name thus costs
    a few hundred steps at most, however the message is built.
    """
    size = len(data)
    end = 0  # where the name stops in place: after its first pointer, or its root label
    length = 1  # wire length so far, the root label included
    hops = 0
    floor = pos  # the lowest offset read so far: a pointer must go below it
    while True:
        if pos >= size:
            raise WireError("name runs past the end")
        label = data[pos]
        if label >= 0xC0:
            if pos + 1 >= size:
                raise WireError("compression pointer runs past the end")
            target = ((label & 0x3F) << 8) | data[pos + 1]
            if not HEADER <= target < floor:
                raise WireError("compression pointer does not point back")
            hops += 1
            if hops > MAX_POINTERS:
                raise WireError(f"name follows more than {MAX_POINTERS} compression pointers")
            if not end:
                end = pos + 2
            pos = floor = target
            continue
        if label == 0:
            return end or pos + 1
        if label >= 64:
            raise WireError("invalid label type")
        length += 1 + label
        if length > MAX_NAME:
            raise WireError(f"name longer than {MAX_NAME} bytes")
        stop = pos + 1 + label
        if stop > size:
            raise WireError("label runs past the end")
        if labels is not None:
            labels.append(data[pos + 1 : stop])
        pos = stop


def name_end(data: bytes, pos: int) -> int:
    """``walk_name`` for a name in a query: its labels must be UTF-8, as the proxy has
    always required of the names in a query."""
    labels: list[bytes] = []
    end = walk_name(data, pos, labels)
    try:
        for label in labels:
            label.decode()
    except UnicodeDecodeError:
        raise WireError("label is not UTF-8") from None
    return end


def _check_options(data: bytes, start: int, end: int) -> None:
    """An OPT record's data: whole option TLVs (code, length, value), few of them."""
    pos = start
    for _ in range(MAX_OPTIONS):
        if pos == end:
            return
        if pos + 4 > end:
            raise WireError("EDNS option header runs past the record")
        pos += 4 + ((data[pos + 2] << 8) | data[pos + 3])
        if pos > end:
            raise WireError("EDNS option runs past the record")
    if pos != end:
        raise WireError(f"more than {MAX_OPTIONS} EDNS options")


def check_query(data: bytes) -> tuple[int, int]:
    """(offset just past the question, the client's UDP size) of a well-formed query.

    Raises WireError for anything else, with bounded work: the counts are checked
    before any name is read (one question, no answers, at most ``MAX_AUTHORITY`` and
    ``MAX_ADDITIONAL`` records), the question's name is uncompressed, every other name
    goes through ``name_end``, record data must lie inside the message (and be
    non-empty, OPT aside), and at most one OPT record, in the additional section,
    with whole options.  The UDP size is the OPT's (at least 512), else 512.  Bytes
    after the last record are ignored.
    """
    _, _, qdcount, ancount, nscount, arcount = header(data)
    if qdcount != 1:
        raise WireError("not one question")
    if ancount or nscount > MAX_AUTHORITY or arcount > MAX_ADDITIONAL:
        raise WireError("more records than a query carries")
    qend = question_end(data)
    try:
        # One decode checks every label: a length byte (< 64) neither continues nor ends
        # a multi-byte character.
        data[HEADER : qend - 4].decode()
    except UnicodeDecodeError:
        raise WireError("question name is not UTF-8") from None
    size = len(data)
    udp = 0
    pos = qend
    for index in range(nscount + arcount):
        pos = name_end(data, pos)
        if pos + _RR.size > size:
            raise WireError("record header runs past the end")
        rtype, rclass, _, rdlength = _RR.unpack_from(data, pos)
        start = pos + _RR.size
        pos = start + rdlength
        if pos > size:
            raise WireError("record data runs past the end")
        if rtype == TYPE_OPT:
            if udp or index < nscount:
                raise WireError("more than one OPT record, or one outside the additional section")
            _check_options(data, start, pos)
            udp = max(rclass, UDP_MIN)
        elif not rdlength:
            raise WireError("record with no data")
    return qend, udp or UDP_MIN


def parent_wildcards(name: bytes) -> list[bytes]:
    """``*.b.c.``, ``*.c.`` for ``a.b.c.`` (wire forms), most specific first."""
    out = []
    pos = 0
    while name[pos]:
        pos += 1 + name[pos]
        if name[pos] == 0:
            break  # Istio never matches a bare "*." wildcard
        out.append(b"\x01*" + name[pos:])
    return out


def header(data: bytes) -> tuple[int, int, int, int, int, int]:
    """(id, flags, qdcount, ancount, nscount, arcount); raises WireError if short."""
    if len(data) < HEADER:
        raise WireError("shorter than a DNS header")
    fields: tuple[int, int, int, int, int, int] = _HEADER.unpack_from(data)
    return fields


def reply_flags(query_flags: int, rcode: int, *, authoritative: bool) -> int:
    """A reply's flags as a resolver derives them: QR, the query's opcode, RD and CD."""
    flags = QR | (query_flags & (OPCODE | RD | CD)) | rcode
    if authoritative:
        flags |= AA
    return flags


def error_reply(data: bytes, rcode: int, *, with_question: bool) -> bytes:
    """An empty reply with ``rcode`` (RA and AA clear), echoing the question if asked."""
    msg_id, flags, *_ = header(data)
    if with_question:
        question = data[HEADER : question_end(data)]
        counts = _COUNTS.pack(1, 0, 0, 0)
    else:
        question = b""
        counts = _COUNTS.pack(0, 0, 0, 0)
    head = struct.pack("!HH", msg_id, reply_flags(flags, rcode, authoritative=False))
    return head + counts + question


def skip_name(data: bytes, pos: int) -> int:
    """Offset after a (possibly compressed) name starting at ``pos``."""
    size = len(data)
    while True:
        if pos >= size:
            raise WireError("name runs past the end")
        length = data[pos]
        if length == 0:
            return pos + 1
        if length >= 0xC0:
            if pos + 2 > size:
                raise WireError("pointer runs past the end")
            return pos + 2
        if length >= 64:
            raise WireError("invalid label type")
        pos += 1 + length


def _records(data: bytes, pos: int, count: int) -> list[tuple[int, int, int]]:
    """(start, end, type) of ``count`` records from ``pos``."""
    out = []
    for _ in range(count):
        start = pos
        pos = skip_name(data, pos)
        if pos + _RR.size > len(data):
            raise WireError("record header runs past the end")
        rtype, _, _, rdlength = _RR.unpack_from(data, pos)
        pos += _RR.size + rdlength
        if pos > len(data):
            raise WireError("record data runs past the end")
        out.append((start, pos, rtype))
    return out


def truncate(msg: bytes, limit: int) -> bytes:
    """``msg`` if it fits in ``limit`` bytes, else cut at a record boundary, TC set.

    Whole records are kept in order (answers, then authority, then additional)
    while they fit; the EDNS OPT record, if any, is kept at the end.  Only the
    prefix of the message is kept, so compression pointers (which point
    backwards) stay valid.  TC is set when answer or authority records had to
    go.  A message that cannot be walked becomes its header with TC and no
    records, which makes the client retry over TCP.
    """
    if len(msg) <= limit:
        return msg
    msg_id, flags, qdcount, ancount, nscount, arcount = header(msg)
    try:
        pos = HEADER
        for _ in range(qdcount):
            pos = skip_name(msg, pos) + 4
        if pos > len(msg):
            raise WireError("question runs past the end")
        question_stop = pos
        records = _records(msg, pos, ancount + nscount + arcount)
    except WireError:
        return _HEADER.pack(msg_id, flags | TC, 0, 0, 0, 0)
    opt = b""
    for start, end, rtype in records[ancount + nscount :]:
        if rtype == TYPE_OPT:
            opt = msg[start:end]
            break
    if question_stop + len(opt) > limit:
        opt = b""
    budget = limit - len(opt)
    kept = 0
    cut = question_stop
    for index, (start, end, rtype) in enumerate(records):
        if end > budget:
            break
        if rtype == TYPE_OPT and index >= ancount + nscount:
            continue  # re-appended below; anything after it is cut anyway
        if start != cut:
            break  # an OPT record was skipped in the middle: stop at a clean prefix
        cut = end
        kept += 1
    an = min(kept, ancount)
    ns = min(max(kept - ancount, 0), nscount)
    ar = max(kept - ancount - nscount, 0) + (1 if opt else 0)
    if an < ancount or ns < nscount:
        flags |= TC
    return _HEADER.pack(msg_id, flags, qdcount, an, ns, ar) + msg[HEADER:cut] + opt


def udp_limit_from_opt(data: bytes, question_stop: int) -> int:
    """The client's UDP size: its EDNS OPT's (at least 512), else 512."""
    _, _, _, ancount, nscount, arcount = header(data)
    try:
        records = _records(data, question_stop, ancount + nscount + arcount)
    except WireError:
        return UDP_MIN
    for start, _end, rtype in records[ancount + nscount :]:
        if rtype == TYPE_OPT:
            pos = skip_name(data, start)
            size: int = struct.unpack_from("!H", data, pos + 2)[0]
            return max(size, UDP_MIN)
    return UDP_MIN
