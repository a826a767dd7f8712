"""What the DNS proxy does with one query message, whatever transport carried it.

Fast path (``fast``): a standard query with a plain query's counts (one
question, no answer or authority record, at most two additional ones) whose
question's name (lowercased) the compiled table has, asked for A or AAAA.  The
table writes the reply (``_dnstable``): the client's ID, flags derived from the
query's (QR, AA, RD and CD copied), the client's question as sent and the
answer records in the next round-robin order: no parse, and nothing after the
question is read.  Anything else returns None and goes to ``slow``.

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

import logging

from xdsfast import log
from xdsfast.dns.metrics import DnsMetrics
from xdsfast.dns.table import DnsTable
from xdsfast.dns.wire import (
    FORMERR,
    NOTIMP,
    OPCODE,
    QR,
    SERVFAIL,
    TCP_MAX,
    WireError,
    check_query,
    error_reply,
    header,
    truncate,
)

_log = log.scope("dns")

DROP = b""  # no reply at all (not a query, or too short to answer)
FORWARD = None  # ask the upstream resolvers


class Handler:
    """Answers from ``table``; ``respond_before_sync`` forwards until the first table."""

    def __init__(
        self, table: DnsTable, metrics: DnsMetrics, *, respond_before_sync: bool = False
    ) -> None:
        self.table = table
        self.metrics = metrics
        self.respond_before_sync = respond_before_sync

    def fast(self, data: bytes) -> bytes | None:
        """The reply to a plain query of a known name; None otherwise.

        A reply is final on any transport: it fits in 512 bytes.
        """
        answers = self.table.answers
        if answers is None:
            return None
        reply = answers.fast(data)
        if reply is not None:
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
        # Only A and AAAA of class IN, of a name or under a "*." wildcard, are local.
        reply = answers.reply(data, qend)
        if reply is None:
            return FORWARD, limit
        return truncate(reply, limit), limit

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
