from collections.abc import Callable
from typing import Any, Union

Buffer = Union[bytes, bytearray, memoryview]
Frame = tuple[int, int, int, int, int]

PREALLOC_MAX: int
PREALLOC_UNREAD: int
READ_SIZE: int
MESSAGE_COST: int
UNREAD_MAX: int
UNREAD_PROCESS_MAX: int
CONTROL_BURST: float
CONTROL_RATE: float
REPLY_BACKLOG: int

def unread_total() -> int: ...
def frame_header(length: int, ftype: int, flags: int, stream_id: int) -> bytes: ...
def scan_frames(buf: Buffer, pos: int, max_size: int) -> tuple[list[Frame], int, int]: ...
def data_frames(
    data: bytes, offset: int, count: int, stream_id: int, max_frame: int
) -> list[bytes | memoryview]: ...

class Assembler:
    max_len: int
    prealloc: int
    error: int
    error_length: int
    def __init__(self, max_len: int) -> None: ...
    @property
    def pending(self) -> bool: ...
    def feed(self, buf: Buffer, start: int, end: int) -> list[bytes] | None: ...

PREFACE: bytes

def frame_u32(ftype: int, stream_id: int, value: int) -> bytes: ...

class StreamCore:
    conn: ConnCore
    id: int
    assembler: Assembler
    messages: Any
    held: int
    credit: int
    recv_window: int
    send_window: int
    ended: bool
    closed: bool
    receiving: bool
    error: Any
    sink: Callable[[bytes], bool] | None
    sendable: bool
    reading: bool
    unread: int
    _waiter: Any
    def on_payload(self, buf: Buffer, start: int, end: int) -> None: ...
    def _release(self) -> None: ...
    def _wake(self) -> None: ...
    def try_send(self, data: bytes) -> bool: ...
    def try_write(self, data: bytes) -> bool: ...
    def offer_queued(self) -> None: ...
    def start_reading(self) -> None: ...

class ConnCore:
    transport: Any
    client: bool
    buf: bytearray
    data_left: int
    data_stream: Any
    data_feed: bool
    data_end_stream: bool
    preface_seen: bool
    settings_seen: bool
    closed: bool
    write_paused: bool
    streams: dict[int, Any]
    local_window: int
    peer_initial_window: int
    peer_max_frame: int
    send_window: int
    recv_window: int
    conn_credit: int
    recv_frame: int
    conn_window: int
    header_block: Any
    last_read: float
    coalesce: bool
    in_read: bool
    sent_data: bool
    unread: int
    unread_max: int
    budget: float
    budget_at: float
    control_burst: float
    control_rate: float
    replies_paused: int
    _window_waiters: list[Any]
    def get_buffer(self, sizehint: int) -> bytearray: ...
    def buffer_updated(self, nbytes: int) -> None: ...
    def data_received(self, data: Buffer) -> None: ...
    def _receive(self, data: Buffer) -> None: ...
    def data_start(self, flags: int, sid: int, length: int) -> None: ...
    def _data_done(self) -> None: ...
    def credit_stream(self, stream: StreamCore, amount: int) -> None: ...
    def release_stream(self, stream: StreamCore) -> None: ...
    def charge(self, what: str) -> None: ...
    def count_reply(self) -> None: ...
    def reply(self, data: bytes) -> None: ...
    def _flush_conn_credit(self) -> None: ...
    def write(self, data: bytes) -> None: ...
    def writelines(self, chunks: Any) -> None: ...
    def flush(self) -> None: ...
