"""A DNS reply decoded with bounded work and shown as dig shows it, with where it came from.

``xdsfast dig`` prints what the agent's DNS proxy answered.  A forwarded answer is an
upstream resolver's bytes passed on as they came, so the reply is decoded as untrusted
input: names follow at most ``MAX_POINTERS`` compression pointers, each pointing back
(no loops), and are at most ``MAX_NAME`` bytes; record data must lie inside the message;
at most :data:`MAX_RECORDS` records are shown.  Labels are printed with dig's escapes
(``\\.``, ``\\DDD``), so nothing from the wire reaches the terminal as a control character.

Where an answer came from (:func:`source`) is read from the reply itself.  The agent
answers from its NameTable with AA set, RA clear and TTL 30 on every record (its
precomputed answers; a known name without the asked family is NOERROR with no
records); its own errors (SERVFAIL before the first NameTable or when no upstream
answered, REFUSED, FORMERR, NOTIMP) carry neither AA nor RA nor records.  Anything else
is an upstream resolver's answer, forwarded: recursive resolvers set RA.  An upstream
that is itself authoritative, sets no RA and uses TTL 30 would look local; no resolver
a pod uses behaves so.
"""

from __future__ import annotations

import socket
import struct
from typing import NamedTuple

from xdsfast.dns.wire import (
    AA,
    CD,
    FORMERR,
    HEADER,
    NOERROR,
    NOTIMP,
    QR,
    RD,
    SERVFAIL,
    TC,
    TTL,
    TYPE_A,
    TYPE_AAAA,
    TYPE_CNAME,
    TYPE_OPT,
    WireError,
    header,
    walk_name,
)

MAX_RECORDS = 1000  # records decoded and shown per reply; a 64 KiB reply could hold ~6000
RA = 0x0080
AD = 0x0020
REFUSED = 5

TYPES = {
    TYPE_A: "A",
    2: "NS",
    TYPE_CNAME: "CNAME",
    6: "SOA",
    12: "PTR",
    15: "MX",
    16: "TXT",
    TYPE_AAAA: "AAAA",
    33: "SRV",
    39: "DNAME",
    TYPE_OPT: "OPT",
    65: "HTTPS",
    255: "ANY",
}
TYPE_CODES = {name: code for code, name in TYPES.items() if name != "OPT"}
CLASSES = {1: "IN", 3: "CH", 4: "HS", 255: "ANY"}
RCODES = {
    0: "NOERROR",
    1: "FORMERR",
    2: "SERVFAIL",
    3: "NXDOMAIN",
    4: "NOTIMP",
    5: "REFUSED",
    6: "YXDOMAIN",
    7: "YXRRSET",
    8: "NXRRSET",
    9: "NOTAUTH",
    10: "NOTZONE",
}
OPCODES = {0: "QUERY", 1: "IQUERY", 2: "STATUS", 4: "NOTIFY", 5: "UPDATE"}
_FLAG_NAMES = ((QR, "qr"), (AA, "aa"), (TC, "tc"), (RD, "rd"), (RA, "ra"), (AD, "ad"), (CD, "cd"))
_RR = struct.Struct("!HHIH")
_SPECIAL = frozenset(b'.\\"()@$;')  # escaped with a backslash in names, as dig does

_AGENT_RCODES = frozenset({FORMERR, SERVFAIL, NOTIMP, REFUSED})  # the agent's own replies
FROM_TABLE = "the NameTable"
FORWARDED = "forwarded"
FROM_AGENT = "the agent"


def type_name(code: int) -> str:
    return TYPES.get(code, f"TYPE{code}")


def type_code(text: str) -> int:
    """``A``, ``aaaa``, ``TYPE65`` or ``65`` -> the type's number; raises ValueError."""
    upper = text.upper()
    if upper in TYPE_CODES:
        return TYPE_CODES[upper]
    digits = upper.removeprefix("TYPE")
    if digits.isdigit() and 0 < int(digits) < 65536 and int(digits) != TYPE_OPT:
        return int(digits)
    raise ValueError(f"unknown DNS type {text!r} (A, AAAA, CNAME, SRV, TXT, ... or TYPEnnn)")


class Record(NamedTuple):
    name: str
    rtype: int
    rclass: int
    ttl: int
    data: str  # presentation form (for OPT: its UDP size and flags)


class Reply(NamedTuple):
    """A decoded reply: header fields, and each section's records (question: TTL 0, no data)."""

    msg_id: int
    flags: int
    counts: tuple[int, int, int, int]
    question: list[Record]
    answer: list[Record]
    authority: list[Record]
    additional: list[Record]
    size: int
    problem: str  # why decoding stopped early ("" when the whole message was read)

    @property
    def rcode(self) -> int:
        return self.flags & 0xF

    @property
    def opcode(self) -> int:
        return (self.flags >> 11) & 0xF


def read_name(data: bytes, pos: int) -> tuple[str, int]:
    """(presentation form with dig's escapes, offset just past the name in place).

    Raises WireError.  Bounded as the agent bounds a query's names (``wire.walk_name``)."""
    labels: list[bytes] = []
    end = walk_name(data, pos, labels)
    return (".".join(map(_escape, labels)) + "." if labels else "."), end


def _escape(label: bytes) -> str:
    """A label as dig shows it: printable ASCII as is, ``.\\"()@$;`` after a backslash,
    anything else (space, control characters, non-ASCII) as ``\\DDD``."""
    return "".join(
        ("\\" + chr(b) if b in _SPECIAL else chr(b)) if 0x20 < b < 0x7F else f"\\{b:03d}"
        for b in label
    )


def _text_string(data: bytes) -> str:
    return (
        '"'
        + "".join(chr(b) if 0x20 <= b < 0x7F and b not in b'"\\' else f"\\{b:03d}" for b in data)
        + '"'
    )


def _rdata(data: bytes, rtype: int, start: int, end: int) -> str:
    """Record data in presentation form; RFC 3597's ``\\# len hex`` when not understood."""
    raw = data[start:end]
    try:
        if rtype == TYPE_A and len(raw) == 4:
            return socket.inet_ntop(socket.AF_INET, raw)
        if rtype == TYPE_AAAA and len(raw) == 16:
            return socket.inet_ntop(socket.AF_INET6, raw)
        if rtype in (2, TYPE_CNAME, 12, 39):
            name, stop = read_name(data, start)
            if stop == end:
                return name
        elif rtype == 15 and len(raw) >= 3:
            name, stop = read_name(data, start + 2)
            if stop == end:
                return f"{struct.unpack_from('!H', raw)[0]} {name}"
        elif rtype == 33 and len(raw) >= 7:
            name, stop = read_name(data, start + 6)
            if stop == end:
                priority, weight, port = struct.unpack_from("!HHH", raw)
                return f"{priority} {weight} {port} {name}"
        elif rtype == 6:
            mname, pos = read_name(data, start)
            rname, pos = read_name(data, pos)
            if pos + 20 == end:
                numbers = " ".join(map(str, struct.unpack_from("!IIIII", data, pos)))
                return f"{mname} {rname} {numbers}"
        elif rtype == 16 and raw:
            strings, pos = [], 0
            while pos < len(raw):
                stop = pos + 1 + raw[pos]
                if stop > len(raw):
                    break
                strings.append(_text_string(raw[pos + 1 : stop]))
                pos = stop
            else:
                return " ".join(strings)
    except WireError:
        pass
    return f"\\# {len(raw)} {raw.hex()}".rstrip()


def decode(data: bytes) -> Reply:
    """Decode a reply as far as it is well-formed (``problem`` says where it stopped);
    raises WireError only when there is not even a header."""
    msg_id, flags, *counts = header(data)
    sections: list[list[Record]] = [[], [], [], []]
    pos = HEADER
    problem = ""
    shown = 0
    try:
        for section, count in enumerate(counts):
            for _ in range(count):
                if shown >= MAX_RECORDS:
                    problem = f"more than {MAX_RECORDS} records: the rest are not shown"
                    raise StopIteration
                name, pos = read_name(data, pos)
                if section == 0:
                    if pos + 4 > len(data):
                        raise WireError("question type or class missing")
                    rtype, rclass = struct.unpack_from("!HH", data, pos)
                    pos += 4
                    sections[0].append(Record(name, rtype, rclass, 0, ""))
                    shown += 1
                    continue
                if pos + _RR.size > len(data):
                    raise WireError("record header runs past the end")
                rtype, rclass, ttl, rdlength = _RR.unpack_from(data, pos)
                start = pos + _RR.size
                pos = start + rdlength
                if pos > len(data):
                    raise WireError("record data runs past the end")
                if rtype == TYPE_OPT:
                    text = f"udp: {rclass}, version: {(ttl >> 16) & 0xFF}"
                else:
                    text = _rdata(data, rtype, start, pos)
                sections[section].append(Record(name, rtype, rclass, ttl, text))
                shown += 1
    except WireError as exc:
        problem = f"malformed reply: {exc}"
    except StopIteration:
        pass
    c = (counts[0], counts[1], counts[2], counts[3])
    question, answer, authority, additional = sections
    return Reply(msg_id, flags, c, question, answer, authority, additional, len(data), problem)


def source(reply: Reply) -> str:
    """FROM_TABLE, FROM_AGENT or FORWARDED (see the module docstring for why)."""
    flags = reply.flags
    if flags & RA:
        return FORWARDED
    local = not reply.authority and not [r for r in reply.additional if r.rtype != TYPE_OPT]
    if flags & AA and reply.rcode == NOERROR and local and all(r.ttl == TTL for r in reply.answer):
        return FROM_TABLE
    if not flags & AA and reply.rcode in _AGENT_RCODES and local and not reply.answer:
        return FROM_AGENT
    return FORWARDED


def source_line(reply: Reply) -> str:
    """What :func:`source` found, in words."""
    found = source(reply)
    if found == FROM_TABLE:
        return ";; from the NameTable: answered by the agent itself (AA set, RA clear, TTL 30)"
    if found == FORWARDED:
        return ";; forwarded: an upstream resolver's answer, passed on by the agent"
    why = {
        SERVFAIL: "no NameTable from istiod yet, or no upstream resolver answered",
        REFUSED: "not in the NameTable, and the agent forwards for loopback clients only",
    }.get(reply.rcode, "the agent could not serve this query")
    return f";; from the agent: {RCODES.get(reply.rcode, reply.rcode)}, {why}"


def render(reply: Reply, *, server: str, transport: str, elapsed_ms: float) -> str:
    """dig's layout: header, flags, sections, and the server that answered."""
    flag_text = " ".join(name for bit, name in _FLAG_NAMES if reply.flags & bit)
    qd, an, ns, ar = reply.counts
    lines = [
        source_line(reply),
        f";; ->>HEADER<<- opcode: {OPCODES.get(reply.opcode, reply.opcode)}, "
        f"status: {RCODES.get(reply.rcode, reply.rcode)}, id: {reply.msg_id}",
        f";; flags: {flag_text}; QUERY: {qd}, ANSWER: {an}, AUTHORITY: {ns}, ADDITIONAL: {ar}",
    ]
    opt = [r for r in reply.additional if r.rtype == TYPE_OPT]
    if opt:
        lines += ["", ";; OPT PSEUDOSECTION:", f"; EDNS: {opt[0].data}"]
    if reply.question:
        lines += ["", ";; QUESTION SECTION:"]
        lines += [
            f";{q.name}\t\t{CLASSES.get(q.rclass, q.rclass)}\t{type_name(q.rtype)}"
            for q in reply.question
        ]
    for title, records in (
        ("ANSWER", reply.answer),
        ("AUTHORITY", reply.authority),
        ("ADDITIONAL", [r for r in reply.additional if r.rtype != TYPE_OPT]),
    ):
        if records:
            lines += ["", f";; {title} SECTION:"]
            lines += [
                f"{r.name}\t\t{r.ttl}\t{CLASSES.get(r.rclass, f'CLASS{r.rclass}')}\t"
                f"{type_name(r.rtype)}\t{r.data}"
                for r in records
            ]
    if reply.problem:
        lines += ["", f";; {reply.problem}"]
    lines += [
        "",
        f";; Query time: {elapsed_ms:.0f} msec",
        f";; SERVER: {server} ({transport})",
        f";; MSG SIZE  rcvd: {reply.size}",
    ]
    return "\n".join(lines) + "\n"
