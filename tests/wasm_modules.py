"""A loopback HTTP server for Wasm modules (``ModuleServer``): the module, slowly, failing,
oversized, chunked, redirected; shared by the Wasm tests and the cut-through tests (the
``modules`` fixture in conftest.py)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib

MODULE = b"\x00asm\x01\x00\x00\x00" + bytes(range(256)) * 4
MODULE_SHA = hashlib.sha256(MODULE).hexdigest()
SIZE_LIMIT = 64 * 1024  # what the tests give the fetcher as the largest module


class ModuleServer:
    """A loopback HTTP server: the module, slowly, failing, oversized, chunked, redirected."""

    def __init__(self) -> None:
        self.hits: dict[str, int] = {}
        self.port = 0
        self._server: asyncio.Server | None = None
        self._release = asyncio.Event()  # lets /slow's handlers end at teardown

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        self._release.set()
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 5)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            path = head.split(b" ", 2)[1].decode()
            self.hits[path] = self.hits.get(path, 0) + 1
            if path.startswith("/module") or path.startswith("/other"):
                writer.write(_answer(200, MODULE))
            elif path == "/chunked":
                chunks = b"".join(
                    b"%x\r\n%s\r\n" % (len(MODULE[i : i + 100]), MODULE[i : i + 100])
                    for i in range(0, len(MODULE), 100)
                )
                writer.write(
                    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks + b"0\r\n\r\n"
                )
            elif path == "/redirect":
                writer.write(
                    b"HTTP/1.1 302 Found\r\nLocation: /module-r\r\nContent-Length: 0\r\n\r\n"
                )
            elif path == "/fail":
                writer.write(_answer(503, b"try later"))
            elif path == "/missing":
                writer.write(_answer(404, b"no"))
            elif path == "/big":
                writer.write(_answer(200, b"\x00" * (SIZE_LIMIT + 1)))
            elif path == "/big-unsized":
                writer.write(
                    b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + b"\0" * (SIZE_LIMIT + 1)
                )
            elif path == "/slow":
                await self._release.wait()
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


def _answer(status: int, body: bytes) -> bytes:
    return b"HTTP/1.1 %d X\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (
        status,
        len(body),
        body,
    )
