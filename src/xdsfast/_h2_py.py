"""Pure-Python twin of ``_h2.pyx``: the same functions, the same results."""

from __future__ import annotations

from typing import Union

_SMALL = 4096
PREALLOC_MAX = 64 << 20

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


class Assembler:
    """Cuts one stream's gRPC messages out of its DATA payloads (see ``_h2.pyx``)."""

    __slots__ = ("_head", "_msg", "_need", "error", "error_length", "max_len")

    def __init__(self, max_len: int) -> None:
        self.max_len = max_len
        self.error = 0
        self.error_length = -1
        self._head = bytearray()  # prefix bytes seen of the current message
        self._msg: bytearray | None = None
        self._need = 0  # body bytes still to come

    @property
    def pending(self) -> bool:
        return bool(self._head)

    def _begin(self) -> bool:
        head = self._head
        if head[0] != 0:
            self.error = 1
            return False
        length = int.from_bytes(head[1:5], "big")
        if length > self.max_len:
            self.error, self.error_length = 2, length
            return False
        self._msg, self._need = bytearray(), length
        return True

    def feed(self, buf: Buffer, start: int, end: int) -> list[bytes] | None:
        if self.error:
            return None
        out: list[bytes] | None = None
        start, end = max(start, 0), min(end, len(buf))
        head = self._head
        while start < end:
            if len(head) < 5:
                if not head and end - start >= 5 and buf[start] == 0:
                    length = int.from_bytes(buf[start + 1 : start + 5], "big")
                    if length <= self.max_len and end - start - 5 >= length:
                        if out is None:
                            out = []
                        out.append(bytes(buf[start + 5 : start + 5 + length]))
                        start += 5 + length
                        continue
                take = min(5 - len(head), end - start)
                head += buf[start : start + take]
                start += take
                if len(head) < 5:
                    break
                if not self._begin():
                    head.clear()
                    break
            else:
                take = min(self._need, end - start)
                assert self._msg is not None
                self._msg += buf[start : start + take]
                self._need -= take
                start += take
            if len(head) == 5 and not self._need:
                if out is None:
                    out = []
                out.append(bytes(self._msg or b""))
                self._msg = None
                head.clear()
        return out
