"""``xdsfast dig``: one question to the agent's DNS proxy, over UDP or TCP, with a deadline.

For checking mesh names from inside a pod that has no ``dig``.  Blocking sockets (the
command does one thing, then exits): every receive waits at most the time left before
one deadline, a UDP reply must carry the query's ID and question (anything else on the
socket is skipped, a bounded number of times), a truncated UDP reply is asked again
over TCP as dig does, and TCP replies are at most 65535 bytes by their framing.  Each
address the host resolves to is tried in turn while the deadline allows (``localhost``
may be 127.0.0.1 or ::1, as the agent binds by resolv.conf's nameservers).
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import time
from typing import NamedTuple

from xdsfast.dns.wire import HEADER, QR, RD, TC, TCP_MAX, encode_name, question_end

MAX_STRAY = 64  # datagrams on the UDP socket that are not our reply, skipped before giving up


class DigError(Exception):
    """The question could not be asked or got no usable answer; the message says why."""


class Exchange(NamedTuple):
    """A reply and how it was had."""

    reply: bytes
    server: str  # ``127.0.0.1#15053`` as dig writes it
    transport: str  # UDP or TCP
    elapsed_ms: float
    retried_tcp: bool  # the UDP reply was truncated and the question asked again over TCP


def query(name: str, qtype: int, msg_id: int) -> bytes:
    """A standard query with RD set; raises DigError for a name that is not a DNS name."""
    fqdn = name if name.endswith(".") else name + "."
    wire = encode_name(fqdn)
    if wire is None:
        raise DigError(f"{name!r} is not a DNS name (ASCII labels of 1-63 bytes, 255 in all)")
    return struct.pack("!HHHHHH", msg_id, RD, 1, 0, 0, 0) + wire + struct.pack("!HH", qtype, 1)


def new_id() -> int:
    return int.from_bytes(os.urandom(2), "big")


def addresses(host: str, port: int) -> list[tuple[int, tuple[str, int]]]:
    """(family, sockaddr) for each address of ``host``; raises DigError."""
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise DigError(
            f"cannot resolve {host!r}: {getattr(exc, 'strerror', None) or exc}"
        ) from None
    out: list[tuple[int, tuple[str, int]]] = []
    for family, _, _, _, sockaddr in found:
        entry = (int(family), (str(sockaddr[0]), int(sockaddr[1])))
        if entry not in out:
            out.append(entry)
    return out


def ask(host: str, port: int, message: bytes, *, tcp: bool, timeout: float) -> Exchange:
    """Send ``message`` to the first address of ``host`` that answers; raises DigError."""
    deadline = time.monotonic() + timeout
    where = f"{host}#{port}"
    failures: list[str] = []
    for family, sockaddr in addresses(host, port):
        shown = f"{sockaddr[0]}#{sockaddr[1]}"
        started = time.monotonic()
        try:
            if not tcp:
                reply = _udp(family, sockaddr, message, deadline)
                if not header_flags(reply) & TC:
                    return Exchange(reply, shown, "UDP", _ms(started), False)
                started = time.monotonic()
                reply = _tcp(family, sockaddr, message, deadline)
                return Exchange(reply, shown, "TCP", _ms(started), True)
            reply = _tcp(family, sockaddr, message, deadline)
            return Exchange(reply, shown, "TCP", _ms(started), False)
        except TimeoutError:
            raise DigError(f"no answer from {shown} within {timeout:g}s") from None
        except OSError as exc:
            failures.append(f"{shown}: {_reason(exc)}")
            if time.monotonic() >= deadline:
                break
    detail = "; ".join(failures) or "no address"
    raise DigError(f"no DNS proxy at {where} ({detail})")


def _ms(started: float) -> float:
    return (time.monotonic() - started) * 1000


def _reason(exc: OSError) -> str:
    """``connection refused`` for ECONNREFUSED; our own reasons as they were written."""
    text = exc.strerror or (os.strerror(exc.errno) if exc.errno else "") or str(exc)
    return (text[:1].lower() + text[1:]) or type(exc).__name__


def header_flags(reply: bytes) -> int:
    flags: int = struct.unpack_from("!H", reply, 2)[0]
    return flags


def _left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError(errno.ETIMEDOUT, "timed out")
    return left


def _matches(reply: bytes, message: bytes, qend: int) -> bool:
    """Our reply: our ID, QR set, and our question (names compared without case)."""
    return (
        len(reply) >= qend
        and reply[:2] == message[:2]
        and bool(header_flags(reply) & QR)
        and reply[4:6] == b"\x00\x01"
        and reply[HEADER:qend].lower() == message[HEADER:qend].lower()
    )


def _udp(family: int, sockaddr: tuple[str, int], message: bytes, deadline: float) -> bytes:
    qend = question_end(message)
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.settimeout(_left(deadline))
        sock.connect(sockaddr)  # a closed port then shows as ECONNREFUSED, not a timeout
        sock.send(message)
        for _ in range(MAX_STRAY):
            sock.settimeout(_left(deadline))
            reply = sock.recv(TCP_MAX)
            if _matches(reply, message, qend):
                return reply
    raise OSError(errno.EPROTO, f"{MAX_STRAY} datagrams that were not the reply")


def _tcp(family: int, sockaddr: tuple[str, int], message: bytes, deadline: float) -> bytes:
    qend = question_end(message)
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(_left(deadline))
        sock.connect(sockaddr)
        sock.settimeout(_left(deadline))
        sock.sendall(struct.pack("!H", len(message)) + message)
        length = struct.unpack("!H", _read_exactly(sock, 2, deadline))[0]
        reply = _read_exactly(sock, length, deadline)
    if not _matches(reply, message, qend):
        raise OSError(errno.EPROTO, "the reply over TCP is not for our question")
    return reply


def _read_exactly(sock: socket.socket, size: int, deadline: float) -> bytes:
    data = b""
    while len(data) < size:
        sock.settimeout(_left(deadline))
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise OSError(errno.ECONNRESET, "the connection closed before the whole reply")
        data += chunk
    return data
