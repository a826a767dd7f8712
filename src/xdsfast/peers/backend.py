"""A tiny HTTP/1.1 backend and an HTTP/1.1 GET client, both on plain asyncio.

The backend is the upstream that Envoy's sample listener routes to; the client
sends traffic through Envoy and reads Envoy's admin API, so no HTTP library is
needed.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping

DEFAULT_BODY = b"hello from the xdsfast demo backend\n"

_MAX_HEADER_BYTES = 64 * 1024


class Backend:
    """HTTP/1.1 server answering every request ``200`` with a fixed body.

    Keep-alive is supported because Envoy pools its upstream connections.
    """

    def __init__(self, body: bytes = DEFAULT_BODY, host: str = "127.0.0.1", port: int = 0) -> None:
        self.body = body
        self.host = host
        self.port = port
        self.requests = 0
        self.last_headers: dict[str, str] = {}
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        """Listen; afterwards ``.port`` is the real port."""
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Close the listening socket and every open connection."""
        if self._server is None:
            return
        self._server.close()
        close_clients = getattr(self._server, "close_clients", None)  # Python >= 3.13
        if close_clients is not None:
            close_clients()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._server.wait_closed(), 2.0)
        self._server = None

    async def __aenter__(self) -> Backend:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while await self._serve_one(reader, writer):
                pass
        except (
            ConnectionError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            ValueError,
        ):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _serve_one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Serve one request; return whether the connection stays open."""
        head = await reader.readuntil(b"\r\n\r\n")
        if len(head) > _MAX_HEADER_BYTES:
            return False
        _, headers = _parse_head(head)
        length = int(headers.get("content-length", "0"))
        if length:
            await reader.readexactly(length)
        self.requests += 1
        self.last_headers = headers
        close = headers.get("connection", "").lower() == "close"
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n"
            + b"content-length: %d\r\n" % len(self.body)
            + (b"connection: close\r\n" if close else b"")
            + b"\r\n"
            + self.body
        )
        await writer.drain()
        return not close


def _parse_head(head: bytes) -> tuple[str, dict[str, str]]:
    """Split an HTTP head into its first line and lower-cased headers."""
    lines = head.decode("latin-1").split("\r\n")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if ":" in line:
            key, value = line.split(":", 1)
            headers[key.strip().lower()] = value.strip()
    return lines[0], headers


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    body = bytearray()
    while True:
        size_line = await reader.readuntil(b"\r\n")
        size = int(size_line.split(b";", 1)[0].strip(), 16)
        if size == 0:
            await reader.readuntil(b"\r\n")  # trailers (none) + final CRLF
            return bytes(body)
        body += await reader.readexactly(size)
        await reader.readexactly(2)


async def http_get(
    host: str,
    port: int,
    path: str = "/",
    headers: Mapping[str, str] | None = None,
    timeout: float = 5.0,
) -> tuple[int, dict[str, str], bytes]:
    """GET ``path`` over a fresh HTTP/1.1 connection; return (status, headers, body).

    Handles content-length, chunked and read-to-EOF bodies (Envoy's admin API
    answers chunked). Raises ``TimeoutError`` after ``timeout`` seconds.
    """
    try:
        return await asyncio.wait_for(_get(host, port, path, headers or {}), timeout)
    except asyncio.TimeoutError:  # distinct from the builtin before Python 3.11
        raise TimeoutError(f"GET http://{host}:{port}{path} took over {timeout}s") from None


async def _get(
    host: str, port: int, path: str, headers: Mapping[str, str]
) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        if not any(k.lower() == "host" for k in headers):
            extra = f"host: {host}\r\n{extra}"
        request = f"GET {path} HTTP/1.1\r\n{extra}connection: close\r\n\r\n"
        writer.write(request.encode("latin-1"))
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        status_line, resp_headers = _parse_head(head)
        status = int(status_line.split(" ", 2)[1])
        if resp_headers.get("transfer-encoding", "").lower() == "chunked":
            body = await _read_chunked(reader)
        elif "content-length" in resp_headers:
            body = await reader.readexactly(int(resp_headers["content-length"]))
        else:
            body = await reader.read()
        return status, resp_headers, body
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
