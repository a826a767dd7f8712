"""What the DNS proxy does with one query message, whatever transport carried it.

Fast path (``fast``): a standard query with a plain query's counts (one
question, no answer or authority record, at most two additional ones) whose
question bytes (lowercased) are a key of the precomputed answers.  The reply is
the client's ID, flags derived from the query's (QR, AA, RD and CD copied), the
precomputed counts, the client's question as sent and the next precomputed
answer order: no parse, no encode, and nothing after the question is read.
Anything else returns None and goes to ``slow``.

Slow path (``slow``): validates the message with bounded work
(``wire.check_query``: counts first, then names with capped labels and
pointers; no general-purpose parser sees untrusted bytes), then answers
locally A/AAAA questions of known or wildcard names, returns SERVFAIL before
the first table (or forwards, in ``:53`` mode), FORMERR for malformed
queries, NOTIMP for other opcodes, and says "forward" for the rest.
Malformed queries and dropped messages are counted and logged at debug only,
so a flood of them cannot flood the log.
"""

from __future__ import annotations

import itertools
import logging
import struct

from xdsfast import log
from xdsfast.dns.metrics import DnsMetrics
from xdsfast.dns.table import A_IN, AAAA_IN, ENTRY_HEADER, DnsTable, Entry
from xdsfast.dns.wire import (
    FORMERR,
    HEADER,
    MAX_ADDITIONAL,
    NOTIMP,
    OPCODE,
    QR,
    SERVFAIL,
    TCP_MAX,
    UDP_MIN,
    WireError,
    check_query,
    error_reply,
    header,
    parent_wildcards,
    reply_flags,
    truncate,
)

_log = log.scope("dns")

DROP = b""  # no reply at all (not a query, or too short to answer)
FORWARD = None  # ask the upstream resolvers

# Reply flag bytes for a local answer, indexed by (query byte 2 & RD) | (query byte 3 & CD):
# QR, opcode QUERY, AA, RD copied; RA clear; CD copied; NOERROR.
_FLAGS = [b""] * 0x12
for _rd in (0, 1):
    for _cd in (0, 0x10):
        _FLAGS[_rd | _cd] = struct.pack("!H", reply_flags((_rd << 8) | _cd, 0, authoritative=True))


_TURNS = itertools.count()  # round-robin: which precomputed order the next answer uses


def _local_reply(data: bytes, qend: int, entry: Entry) -> bytes:
    """The reply: the query's ID, flags, the entry's counts, the question as sent, and the
    entry's answer section in its next precomputed order (see ``table.Entry``)."""
    size = (entry[0] << 8) | entry[1]
    if size == 0 or len(entry) == ENTRY_HEADER + size:
        section = entry[ENTRY_HEADER:]
    else:
        start = ENTRY_HEADER + next(_TURNS) % ((len(entry) - ENTRY_HEADER) // size) * size
        section = entry[start : start + size]
    return b"".join(
        (data[:2], _FLAGS[(data[2] & 1) | (data[3] & 0x10)], entry[2:10], data[12:qend], section)
    )


class Handler:
    """Answers from ``table``; ``respond_before_sync`` forwards until the first table."""

    def __init__(
        self, table: DnsTable, metrics: DnsMetrics, *, respond_before_sync: bool = False
    ) -> None:
        self.table = table
        self.metrics = metrics
        self.respond_before_sync = respond_before_sync

    def fast(self, data: bytes) -> bytes | None:
        """The precomputed reply to a plain query of a known name; None otherwise.

        A reply is final on any transport: it fits in 512 bytes.
        """
        answers = self.table.answers
        # No table yet, too short, a response, not QUERY, or not the counts of a plain query
        # (one question, no answer or authority record, at most OPT and TSIG): slow path.
        if (
            answers is None
            or len(data) < 17
            or data[2] & 0xF8
            or data[4:11] != b"\x00\x01\x00\x00\x00\x00\x00"
            or data[11] > MAX_ADDITIONAL
        ):
            return None
        qend = data.find(0, HEADER) + 5  # a key's name has no NUL byte before its end
        if qend < 17 or qend > len(data):
            return None
        entry = answers.get(data[HEADER:qend].lower())
        if entry is None:
            return None
        reply = _local_reply(data, qend, entry)
        if len(reply) > UDP_MIN:
            return None  # may need the client's EDNS size: the slow path truncates
        self.metrics.requests += 1
        return reply

    def slow(self, data: bytes, tcp: bool) -> tuple[bytes | None, int]:
        """(reply, or DROP, or FORWARD; the size limit for the reply) for any message."""
        limit = TCP_MAX
        try:
            _, flags, *_ = header(data)
        except WireError:
            return self._malformed(data, tcp, "none", "shorter than a DNS header"), limit
        if flags & QR:  # a response sent to us: never answer (no reflection loops)
            return self._malformed(data, tcp, "none", "a response, not a query"), limit
        self.metrics.requests += 1
        if flags & OPCODE:
            return error_reply(data, NOTIMP, with_question=False), limit
        try:
            qend, udp_limit = check_query(data)  # the whole message, bounded work
        except WireError as exc:
            self._malformed(data, tcp, "formerr", str(exc))
            return error_reply(data, FORMERR, with_question=False), limit
        if not tcp:
            limit = udp_limit
        answers = self.table.answers
        if answers is None:
            if self.respond_before_sync:
                return FORWARD, limit
            return error_reply(data, SERVFAIL, with_question=True), limit
        qtype_class = data[qend - 4 : qend]
        if qtype_class not in (A_IN, AAAA_IN):
            return FORWARD, limit  # only A and AAAA of class IN are answered locally
        name = data[HEADER : qend - 4].lower()
        entry = answers.get(name + qtype_class)
        if entry is None:
            for wildcard in parent_wildcards(name):
                entry = answers.get(wildcard + qtype_class)
                if entry is not None:
                    break
            else:
                return FORWARD, limit
        return truncate(_local_reply(data, qend, entry), limit), limit

    def _malformed(self, data: bytes, tcp: bool, reply: str, reason: str) -> bytes:
        """Count a message not served as a query (``reply``: formerr or none), log it at
        debug (never higher: a flood must not flood the log); DROP for the caller."""
        self.metrics.malformed.inc_label(reply)
        if _log.isEnabledFor(logging.DEBUG):
            _log.debug(
                "malformed DNS message",
                extra=log.fields(
                    reason=reason, reply=reply, size=len(data), protocol="tcp" if tcp else "udp"
                ),
            )
        return DROP

    def servfail(self, data: bytes) -> bytes:
        """SERVFAIL for a query that could not be forwarded."""
        return error_reply(data, SERVFAIL, with_question=True)
