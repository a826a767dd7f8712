"""GETs to a running agent's status server, bounded in time and bytes, with one-line errors.

``xdsfast status`` and ``xdsfast check`` use this; ``check`` runs as a Kubernetes exec
probe every few seconds, so it must start fast and never hang.  Hence a plain blocking
socket and a minimal HTTP/1.0 exchange (no asyncio, http.client, grpc or protobuf to
import): every receive gets the time left before one deadline, the head and the body
are capped, and anything else goes wrong as an :class:`AgentError` that says why in
one line.  The body can also be handed over in chunks as it arrives, so a large
``/debug/ndsz`` is looked at with bounded memory.
"""

from __future__ import annotations

import errno
import os
import socket
import time
from collections.abc import Callable
from typing import NamedTuple

MAX_HEAD = 64 * 1024  # the status server's heads are a few hundred bytes
CHUNK = 256 * 1024


class AgentError(Exception):
    """The agent could not be asked, or did not answer as a status server does."""


class Endpoint(NamedTuple):
    """Where the status server listens."""

    host: str
    port: int

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


def parse_address(address: str) -> Endpoint:
    """``HOST:PORT``, ``[V6]:PORT`` or a ``http://`` URL of either; raises ValueError."""
    text = address.strip()
    if text.startswith("http://"):
        text = text[len("http://") :].rstrip("/")
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        host = ""
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{address!r} is not HOST:PORT")
    return Endpoint(host, int(port))


class Answer(NamedTuple):
    """A status server's response: the status code and its body (empty when streamed)."""

    status: int
    body: bytes


def get(
    endpoint: Endpoint,
    path: str,
    *,
    timeout: float,
    limit: int,
    consume: Callable[[bytes], None] | None = None,
) -> Answer:
    """``GET path``: the status and up to ``limit`` bytes of body, all within ``timeout``.

    With ``consume``, the body is passed to it chunk by chunk instead of kept (``limit``
    still caps how much is read).  Raises :class:`AgentError`."""
    deadline = time.monotonic() + timeout
    sock = _connect(endpoint, deadline, timeout)
    try:
        request = f"GET {path} HTTP/1.0\r\nHost: {endpoint.url[7:]}\r\nUser-Agent: xdsfast\r\n\r\n"
        try:
            sock.sendall(request.encode("ascii"))
            return _read_answer(sock, deadline, limit, consume)
        except AgentError as exc:
            raise AgentError(f"{endpoint.url}{path}: {exc}") from None
        except OSError as exc:
            raise AgentError(f"{endpoint.url}{path}: {_reason(exc, timeout)}") from None
    finally:
        sock.close()


def _connect(endpoint: Endpoint, deadline: float, timeout: float) -> socket.socket:
    try:
        return socket.create_connection(endpoint, timeout=max(deadline - time.monotonic(), 0.001))
    except OSError as exc:
        raise AgentError(f"no xdsfast agent at {endpoint.url}: {_reason(exc, timeout)}") from None


def _reason(exc: OSError, timeout: float) -> str:
    """A socket error in a few words (what ``connection refused`` is to ECONNREFUSED)."""
    if isinstance(exc, TimeoutError):  # socket.timeout is TimeoutError
        return f"no answer within {timeout:g}s"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve the host ({exc.strerror or exc})"
    if exc.errno is not None and exc.errno > 0:
        return os.strerror(exc.errno).lower()
    return str(exc) or type(exc).__name__


def _recv(sock: socket.socket, deadline: float, size: int) -> bytes:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError(errno.ETIMEDOUT, "timed out")
    sock.settimeout(left)
    return sock.recv(size)


def _read_answer(
    sock: socket.socket, deadline: float, limit: int, consume: Callable[[bytes], None] | None
) -> Answer:
    data = b""
    while (end := data.find(b"\r\n\r\n")) < 0:
        if len(data) > MAX_HEAD:
            raise AgentError(f"response head over {MAX_HEAD} bytes: not xdsfast's status server")
        chunk = _recv(sock, deadline, 4096)
        if not chunk:
            raise AgentError("the connection closed before a response: not xdsfast's status server")
        data += chunk
    status, length = _parse_head(data[:end])
    body = data[end + 4 :]
    if (length is not None and length > limit) or len(body) > limit:
        raise AgentError(f"response body over {limit} bytes")
    kept: list[bytes] = []
    received = len(body)
    if body:
        if consume is not None:
            consume(body)
        else:
            kept.append(body)
    while length is None or received < length:
        chunk = _recv(sock, deadline, CHUNK)
        if not chunk:
            if length is not None:
                raise AgentError("the connection closed in the middle of the response")
            break
        received += len(chunk)
        if received > limit:
            raise AgentError(f"response body over {limit} bytes")
        if consume is not None:
            consume(chunk)
        else:
            kept.append(chunk)
    return Answer(status, b"".join(kept))


def _parse_head(head: bytes) -> tuple[int, int | None]:
    """(status code, Content-Length or None) of a response head; raises AgentError."""
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        raise AgentError("not an HTTP response: not xdsfast's status server")
    length: int | None = None
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            value = value.strip()
            if not value.isdigit() or len(value) > 15:
                raise AgentError("bad Content-Length in the response")
            length = int(value)
    return int(parts[1]), length
