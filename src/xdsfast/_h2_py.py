"""Pure-Python twin of ``_h2.pyx``: the same functions, the same results."""

from __future__ import annotations

from typing import Union

_SMALL = 4096

Buffer = Union[bytes, bytearray, memoryview]
Frame = tuple[int, int, int, int, int]


def frame_header(length: int, ftype: int, flags: int, stream_id: int) -> bytes:
    """The 9-byte frame header."""
    return bytes(
        (
            (length >> 16) & 0xFF,
            (length >> 8) & 0xFF,
            length & 0xFF,
            ftype & 0xFF,
            flags & 0xFF,
            (stream_id >> 24) & 0x7F,
            (stream_id >> 16) & 0xFF,
            (stream_id >> 8) & 0xFF,
            stream_id & 0xFF,
        )
    )


def scan_frames(buf: Buffer, pos: int, max_size: int) -> tuple[list[Frame], int, int]:
    """The complete frames in ``buf[pos:]`` (see ``_h2.pyx``)."""
    frames: list[Frame] = []
    end = len(buf)
    pos = max(pos, 0)
    while end - pos >= 9:
        length = (buf[pos] << 16) | (buf[pos + 1] << 8) | buf[pos + 2]
        if length > max_size:
            return frames, pos, length
        if end - pos - 9 < length:
            break
        sid = int.from_bytes(buf[pos + 5 : pos + 9], "big") & 0x7FFFFFFF
        frames.append((buf[pos + 3], buf[pos + 4], sid, pos + 9, pos + 9 + length))
        pos += 9 + length
    return frames, pos, -1


def take_messages(buf: Buffer, max_len: int) -> tuple[list[bytes], int, int, int]:
    """The complete gRPC messages at the start of ``buf`` (see ``_h2.pyx``)."""
    messages: list[bytes] = []
    end = len(buf)
    pos = 0
    while end - pos >= 5:
        if buf[pos] != 0:
            return messages, pos, 1, -1
        length = int.from_bytes(buf[pos + 1 : pos + 5], "big")
        if length > max_len:
            return messages, pos, 2, length
        if end - pos - 5 < length:
            return messages, pos, 0, length
        messages.append(bytes(buf[pos + 5 : pos + 5 + length]))
        pos += 5 + length
    return messages, pos, 0, -1


def data_frames(
    data: bytes, offset: int, count: int, stream_id: int, max_frame: int
) -> list[bytes | memoryview]:
    """DATA frames for ``count`` bytes of ``prefix(data) + data`` from ``offset`` on."""
    size = len(data)
    prefix = b"\x00" + size.to_bytes(4, "big")
    count = min(count, size + 5 - offset)
    chunks: list[bytes | memoryview] = []
    view: memoryview | None = None
    while count > 0:
        n = min(count, max_frame)
        head = min(5 - offset if offset < 5 else 0, n)
        start = offset + head - 5
        stop = offset + n - 5
        header = frame_header(n, 0, 0, stream_id) + prefix[offset : offset + head]
        if stop - start <= _SMALL:
            chunks.append(header + data[start:stop] if stop > start else header)
        else:
            chunks.append(header)
            if start == 0 and stop == size:
                chunks.append(data)
            else:
                if view is None:
                    view = memoryview(data)
                chunks.append(view[start:stop])
        offset += n
        count -= n
    return chunks
