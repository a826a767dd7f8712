"""An Envoy-side HTTP/2 client driven by hand (``HostileEnvoy``): ADS streams on one
connection, read or refused, ended by RST_STREAM, a dropped socket or a half-close; what it
received per stream, byte by byte, so a test sees a message arrive before its end."""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import Callable
from pathlib import Path

import hpack
from conftest import asyncio_timeout
from envoy.service.discovery.v3 import discovery_pb2

from xdsfast.typeurls import CLUSTER, LISTENER

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, WINDOW_UPDATE = 0, 1, 3, 4, 6, 8
END_STREAM = ACK = 1
END_HEADERS = 4
CANCEL = 8
WINDOW = 65_535  # the client's stream window: all a relay may write of a push it refuses
SOTW_PATH = "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources"
CDS_REQUEST = discovery_pb2.DiscoveryRequest(type_url=CLUSTER).SerializeToString()
LDS_REQUEST = discovery_pb2.DiscoveryRequest(type_url=LISTENER).SerializeToString()


def frame(ftype: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    return (
        len(payload).to_bytes(3, "big") + bytes((ftype, flags)) + sid.to_bytes(4, "big") + payload
    )


class HostileEnvoy:
    """An Envoy-side HTTP/2 client: ADS streams on one connection, each read (its window
    credited) or refused (never credited), and ended by RST_STREAM, a dropped socket or a
    half-close.  The connection window is always credited, so one refused stream does not
    stall the others."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.encoder = hpack.Encoder()
        self.decoder = hpack.Decoder()
        self.data: dict[int, bytearray] = {}  # DATA payload received per stream
        self.ended: dict[int, dict[str, str]] = {}  # trailers (or {"rst": code}) per stream
        self.refused: set[int] = set()  # streams whose window is not credited
        self.changed = asyncio.Event()
        self.next_id = 1
        self._reader = asyncio.ensure_future(self._read())

    @classmethod
    async def open(cls, path: str | Path) -> HostileEnvoy:
        reader, writer = await asyncio.open_unix_connection(str(path))
        writer.write(PREFACE + frame(SETTINGS, 0, 0, struct.pack(">HI", 4, WINDOW)))
        return cls(reader, writer)

    def send(self, data: bytes) -> None:
        with contextlib.suppress(ConnectionError):
            self.writer.write(data)

    def stream(self, request: bytes = CDS_REQUEST) -> int:
        """A new SotW stream carrying ``request``; its id."""
        sid, self.next_id = self.next_id, self.next_id + 2
        block = self.encoder.encode(
            [(":method", "POST"), (":scheme", "http"), (":path", SOTW_PATH),
             (":authority", "xds"), ("content-type", "application/grpc"), ("te", "trailers")]
        )  # fmt: skip
        self.data[sid] = bytearray()
        message = b"\0" + struct.pack(">I", len(request)) + request
        self.send(frame(HEADERS, END_HEADERS, sid, block) + frame(DATA, 0, sid, message))
        return sid

    def messages(self, sid: int) -> list[bytes]:
        """The complete gRPC messages received on ``sid``."""
        data, pos, out = self.data[sid], 0, []
        while pos + 5 <= len(data):
            end = pos + 5 + int.from_bytes(data[pos + 1 : pos + 5], "big")
            if end > len(data):
                break
            out.append(bytes(data[pos + 5 : end]))
            pos = end
        return out

    def rst(self, sid: int) -> None:
        self.send(frame(RST_STREAM, 0, sid, struct.pack(">I", CANCEL)))

    def half_close(self, sid: int) -> None:
        self.send(frame(DATA, END_STREAM, sid))

    def drop(self) -> None:
        self.writer.transport.abort()

    async def wait(self, condition: Callable[[], bool], timeout: float = 15.0) -> None:
        async with asyncio_timeout(timeout):
            while not condition():
                self.changed.clear()
                await self.changed.wait()

    async def _read(self) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                head = await self.reader.readexactly(9)
                length, ftype, flags = int.from_bytes(head[:3], "big"), head[3], head[4]
                sid = int.from_bytes(head[5:], "big") & 0x7FFFFFFF
                payload = await self.reader.readexactly(length)
                if ftype == SETTINGS and not flags & ACK:
                    self.send(frame(SETTINGS, ACK, 0))
                elif ftype == PING and not flags & ACK:
                    self.send(frame(PING, ACK, 0, payload))
                elif ftype == DATA and length:
                    credit = struct.pack(">I", length)
                    self.send(frame(WINDOW_UPDATE, 0, 0, credit))
                    if sid in self.data:
                        self.data[sid] += payload
                        if sid not in self.refused:
                            self.send(frame(WINDOW_UPDATE, 0, sid, credit))
                elif ftype == HEADERS:
                    fields = {str(k): str(v) for k, v in self.decoder.decode(payload)}
                    if flags & END_STREAM:
                        self.ended[sid] = fields
                elif ftype == RST_STREAM:
                    self.ended.setdefault(sid, {"rst": str(int.from_bytes(payload, "big"))})
                self.changed.set()
        self.changed.set()

    async def close(self) -> None:
        self.writer.close()
        self._reader.cancel()
        with contextlib.suppress(BaseException):
            await self._reader
