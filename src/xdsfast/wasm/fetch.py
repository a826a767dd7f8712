"""Downloading a Wasm module over http/https: asyncio streams and ``ssl``, nothing else.

One fetch has one deadline for all its attempts (the plugin's ``http_uri.timeout``,
else 5 s); each attempt is also capped (``WASM_HTTP_REQUEST_TIMEOUT``). Connection
errors, timeouts and 5xx answers (except 501, 505, 511) and 408/429 are retried,
at most ``WASM_HTTP_REQUEST_MAX_RETRIES`` attempts in all, with a short backoff that
never outlasts the deadline. A body over ``ISTIO_WASM_MAX_BINARY_SIZE_BYTES`` is
refused without reading it all. Redirects are followed (at most 10). Hosts whose
addresses fall in ``BLOCKED_CIDRS_IN_WASM_FETCH`` are refused (SSRF guard).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from urllib.parse import urljoin, urlsplit

from xdsfast.config import (
    DEFAULT_WASM_HTTP_MAX_RETRIES,
    DEFAULT_WASM_HTTP_REQUEST_TIMEOUT,
    DEFAULT_WASM_MAX_BINARY_SIZE,
)

_MAX_REDIRECTS = 10
_MAX_HEAD = 64 * 1024
_CHUNK = 64 * 1024
_BACKOFF_FIRST = 0.1
_BACKOFF_MAX = 1.0
_NOT_RETRIED_5XX = (501, 505, 511)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class FetchError(Exception):
    """A module could not be downloaded; ``retryable`` says whether another attempt may help."""

    def __init__(self, message: str, *, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


@dataclass(frozen=True)
class FetchSettings:
    """How downloads are made (from ``Config``)."""

    attempt_timeout: float = DEFAULT_WASM_HTTP_REQUEST_TIMEOUT
    max_attempts: int = DEFAULT_WASM_HTTP_MAX_RETRIES
    max_size: int = DEFAULT_WASM_MAX_BINARY_SIZE
    insecure_hosts: tuple[str, ...] = ()  # WASM_INSECURE_REGISTRIES ("*" = all)
    blocked: tuple[Network, ...] = field(default_factory=tuple)  # BLOCKED_CIDRS_IN_WASM_FETCH

    def insecure(self, host: str) -> bool:
        return "*" in self.insecure_hosts or host in self.insecure_hosts


def parse_cidrs(text: str) -> tuple[Network, ...]:
    """``BLOCKED_CIDRS_IN_WASM_FETCH``: comma-separated CIDRs; raises ValueError."""
    return tuple(
        ipaddress.ip_network(part.strip(), strict=False) for part in text.split(",") if part.strip()
    )


async def fetch(url: str, timeout: float, settings: FetchSettings) -> bytes:
    """The body of ``url`` (200 OK), or FetchError; the whole call ends within ``timeout``."""
    deadline = time.monotonic() + timeout
    attempts = max(1, settings.max_attempts)
    backoff = _BACKOFF_FIRST
    last: FetchError | None = None
    for attempt in range(attempts):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        try:
            return await asyncio.wait_for(
                _get_following(url, settings), min(remaining, settings.attempt_timeout)
            )
        except asyncio.TimeoutError:
            last = FetchError(f"no complete answer from {_redact(url)} in time")
        except FetchError as exc:
            last = exc
            if not exc.retryable:
                raise
        if attempt + 1 < attempts:
            pause = min(backoff, deadline - time.monotonic())
            if pause <= 0:
                break
            await asyncio.sleep(pause)
            backoff = min(backoff * 2, _BACKOFF_MAX)
    if last is None:
        last = FetchError(f"no time left to download {_redact(url)} (timeout {timeout}s)")
    raise FetchError(f"{last} (after {attempt + 1} attempt(s))")


def _redact(url: str) -> str:
    """The URL without user info or query (they may carry credentials)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


async def _get_following(url: str, settings: FetchSettings) -> bytes:
    for _ in range(_MAX_REDIRECTS + 1):
        status, headers, reader, writer = await _request(url, settings)
        try:
            if status in (301, 302, 303, 307, 308) and "location" in headers:
                url = urljoin(url, headers["location"])
                continue
            if status != 200:
                retryable = (status >= 500 and status not in _NOT_RETRIED_5XX) or status in (
                    408,
                    429,
                )
                raise FetchError(f"{_redact(url)} answered HTTP {status}", retryable=retryable)
            return await _body(reader, headers, settings.max_size, url)
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
    raise FetchError(f"too many redirects from {_redact(url)}", retryable=False)


async def _request(
    url: str, settings: FetchSettings
) -> tuple[int, dict[str, str], asyncio.StreamReader, asyncio.StreamWriter]:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise FetchError(f"cannot download {_redact(url)}: not an http(s) URL", retryable=False)
    host = parts.hostname
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise FetchError(f"bad port in {_redact(url)}", retryable=False) from None
    address = await _resolve(host, port, settings.blocked)
    context: ssl.SSLContext | None = None
    if parts.scheme == "https":
        context = ssl.create_default_context()
        if settings.insecure(host):
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
    try:
        reader, writer = await asyncio.open_connection(
            address, port, ssl=context, server_hostname=host if context else None
        )
    except (OSError, ssl.SSLError) as exc:
        raise FetchError(f"cannot connect to {_redact(url)}: {exc}") from None
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    authority = parts.netloc.rpartition("@")[2]
    writer.write(
        f"GET {path} HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: xdsfast\r\n"
        "Accept: */*\r\nAccept-Encoding: identity\r\nConnection: close\r\n\r\n".encode()
    )
    try:
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
        writer.close()
        raise FetchError(f"no answer from {_redact(url)}: {exc!r}") from None
    if len(head) > _MAX_HEAD:
        writer.close()
        raise FetchError(f"{_redact(url)} sent an oversized header", retryable=False)
    lines = head.decode("latin-1").split("\r\n")
    fields = lines[0].split(" ", 2)
    if len(fields) < 2 or not fields[0].startswith("HTTP/1.") or not fields[1].isdigit():
        writer.close()
        raise FetchError(f"{_redact(url)} did not answer HTTP/1.x")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return int(fields[1]), headers, reader, writer


async def _resolve(host: str, port: int, blocked: Sequence[Network]) -> str:
    """An address of ``host`` to connect to; refused if any address is in ``blocked``."""
    if not blocked:
        return host
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise FetchError(f"cannot resolve {host}: {exc}") from None
    addresses = [str(info[4][0]) for info in infos]
    for text in addresses:
        ip = ipaddress.ip_address(text.split("%")[0])
        if any(ip.version == net.version and ip in net for net in blocked):
            raise FetchError(
                f"{host} resolves to {ip}, blocked by BLOCKED_CIDRS_IN_WASM_FETCH",
                retryable=False,
            )
    return addresses[0]


async def _body(
    reader: asyncio.StreamReader, headers: dict[str, str], limit: int, url: str
) -> bytes:
    too_big = FetchError(
        f"module at {_redact(url)} is larger than {limit} bytes (ISTIO_WASM_MAX_BINARY_SIZE_BYTES)",
        retryable=False,
    )
    try:
        if "chunked" in headers.get("transfer-encoding", "").lower():
            return await _chunked(reader, limit, too_big)
        length = headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                raise FetchError(f"{_redact(url)}: bad Content-Length {length!r}")
            if int(length) > limit:
                raise too_big
            return await reader.readexactly(int(length))
        body = bytearray()
        while chunk := await reader.read(_CHUNK):
            body += chunk
            if len(body) > limit:
                raise too_big
        return bytes(body)
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
        raise FetchError(f"download from {_redact(url)} broke off: {exc!r}") from None


async def _chunked(reader: asyncio.StreamReader, limit: int, too_big: FetchError) -> bytes:
    body = bytearray()
    while True:
        size_line = await reader.readuntil(b"\r\n")
        size = int(size_line.split(b";", 1)[0].strip(), 16)
        if size == 0:
            with contextlib.suppress(asyncio.IncompleteReadError):
                while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers
                    pass
            return bytes(body)
        if len(body) + size > limit:
            raise too_big
        body += await reader.readexactly(size)
        await reader.readexactly(2)
