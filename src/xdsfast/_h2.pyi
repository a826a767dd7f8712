from typing import Union

Buffer = Union[bytes, bytearray, memoryview]
Frame = tuple[int, int, int, int, int]

PREALLOC_MAX: int

def frame_header(length: int, ftype: int, flags: int, stream_id: int) -> bytes: ...
def scan_frames(buf: Buffer, pos: int, max_size: int) -> tuple[list[Frame], int, int]: ...
def data_frames(
    data: bytes, offset: int, count: int, stream_id: int, max_frame: int
) -> list[bytes | memoryview]: ...

class Assembler:
    max_len: int
    error: int
    error_length: int
    def __init__(self, max_len: int) -> None: ...
    @property
    def pending(self) -> bool: ...
    def feed(self, buf: Buffer, start: int, end: int) -> list[bytes] | None: ...
