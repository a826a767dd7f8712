# Declarations of the fast engine's compiled core, _h2.pyx (twin: _h2_py.py).
#
# The per-read path lives in two classes, StreamCore and ConnCore, which the engine
# subclasses in Python (protocol.py: Stream, Connection) with all that is not per read.
# Each core sets up its own state in its constructor: StreamCore(conn, stream_id,
# max_recv), ConnCore(client), the protocol's initial values (RFC 9113) included; the
# engine then raises what it advertises (its windows, its largest frame).
#
# Callbacks: the core calls these by name on its Python subclass, which must define them
# (the twin's stubs raise NotImplementedError):
#   StreamCore -> bad_message(error, length)     a message it cannot take (1: compressed,
#                                                2: longer than max_len)
#                 sink_failed(exc)               the relay's sink raised; it is dropped
#                 pump_through(through, more) -> bool  (on a Through's writer: the other
#                                                side's stream) bytes came: write what fits
#                                                now; False: wake it (done, or must wait)
#   ConnCore   -> on_frame(view, ftype, flags, sid, start, end)
#                                                every frame but plain DATA and WINDOW_UPDATE
#                 on_end_stream(stream)          END_STREAM on DATA
#                 abort(code, why)               a connection error: GOAWAY, close
#                 engine_error(exc)              a bug in the read path (never escapes)
#                 stream_failed(stream, code, why)   a stream error: RST_STREAM
#                 check_not_idle(sid, what)      a frame for a stream never opened?
#                 unread_over(stream, per_connection)  the unread budget is spent
#                 _wake_window()                 a WINDOW_UPDATE opened a window
#
# Operations have one name each, callable from Python and from C.  Those the engine calls
# are cpdef; inside the core they are called as ``ConnCore.write(conn, data)``: a direct C
# call that skips cpdef's look-up for a Python override (the engine overrides none).
# A few take a C pointer and so cannot be cpdef: each is the C half of a Python method
# (Assembler._feed of feed, StreamCore._payload of on_payload, ConnCore._receive_buf of
# _receive, ConnCore._on_read of data_received/buffer_updated).

from libc.stdint cimport uint8_t, uint32_t


cdef class StreamCore


cdef class Through:
    cdef public StreamCore stream  # the source, credited as bytes are taken (then None)
    cdef readonly Py_ssize_t length  # the whole message with its 5-byte prefix
    cdef readonly object head  # the relay's judge: it said yes on the head
    cdef object _scan  # head.scan: reads every later byte (raising: the rest is refused)
    cdef object chunks  # deque of bytes received, not taken
    cdef Py_ssize_t offset  # bytes of chunks[0] already taken
    cdef readonly Py_ssize_t received, taken
    cdef public bint failed  # the judge refused it on the way
    cdef public double arrived  # perf_counter() when its last byte came
    cdef public object writer  # the other side's stream while it waits for bytes, or None
    cdef public Py_ssize_t until  # ...and how far it writes
    cdef public bint fed  # it got bytes in this read (listed in its connection's _fed)

    cdef int _push(self, const uint8_t* p, Py_ssize_t n) except -1


cdef class Assembler:
    cdef readonly Py_ssize_t max_len
    cdef public Py_ssize_t prealloc  # allocated at a prefix at most (then doubled as needed)
    cdef public int error  # 1: compressed, 2: too long (then nothing more is fed)
    cdef public Py_ssize_t error_length  # the too-long message's declared length
    cdef uint8_t head[5]
    cdef Py_ssize_t head_len  # prefix bytes seen of the current message
    cdef object msg  # the bytes being filled (``msg_cap`` allocated), or None
    cdef Py_ssize_t msg_len, msg_pos, msg_cap
    cdef public object opener  # cut-through: opener(length) -> a judge, or None
    cdef public Py_ssize_t through_min  # ... for messages of this many bytes or more
    cdef object _judge  # the judge of the head being seen, or None
    cdef bytearray _judged  # the prefix and head it has seen
    cdef public Through _through  # the cut-through message being received, or None

    cdef int _begin(self, const uint8_t* h) except -1
    cdef int _grow(self, Py_ssize_t need) except -1
    cdef list _feed(self, const uint8_t* p, Py_ssize_t start, Py_ssize_t end,
                    StreamCore stream)
    cdef Through _judge_more(self, const uint8_t* p, Py_ssize_t n, StreamCore stream)


cdef class ConnCore


cdef class StreamCore:
    cdef public ConnCore conn
    cdef public uint32_t id
    cdef public Assembler assembler
    cdef public object messages  # deque of complete messages not yet taken by recv()
    cdef public Py_ssize_t held  # received bytes not yet credited back to the peer
    cdef public Py_ssize_t credit  # bytes consumed, to credit in a batch
    cdef public Py_ssize_t recv_window, send_window
    cdef public bint ended  # the peer ended its side (END_STREAM)
    cdef public bint closed  # we are done with it (trailers sent / reset / failed)
    cdef public bint receiving  # recv() waits, with nothing queued
    cdef public object error  # recv() raises it once messages run out
    cdef public object sink  # takes messages while recv() waits
    cdef public bint sendable  # the relay may send now (headers out, not half-closed)
    cdef public bint reading  # the relay has started taking its messages
    cdef public Py_ssize_t unread  # what its messages cost while it was not read (bytes)
    cdef public Py_ssize_t pinned  # held bytes of cut-through messages not yet taken
    cdef public object _waiter  # the future recv() or finished() waits on, or None

    cdef int _payload(self, const uint8_t* p, Py_ssize_t start, Py_ssize_t end) except -1
    cdef bint _count_unread(self, list messages) except -1
    cdef void _forget_unread(self) noexcept
    cdef list _offer(self, list messages)
    cdef bint _take(self, message) except -1
    cpdef int start_reading(self) except -1
    cpdef int _credit_held(self) except -1
    cpdef int _wake_receiver(self) except -1
    cpdef bint try_write(self, bytes data) except -1


cdef class ConnCore:
    cdef public object transport
    cdef public bint client
    cdef public bytearray buf  # the start of a frame cut by the end of a read
    cdef public Py_ssize_t data_left  # payload bytes of the DATA frame being received
    cdef public StreamCore data_stream  # its stream (None: unknown or reset)
    cdef public bint data_feed  # its payload goes to the stream (else: dropped)
    cdef public bint data_end_stream  # it carries END_STREAM
    cdef public bint preface_seen, settings_seen, closed, write_paused
    cdef public dict streams
    cdef public Py_ssize_t local_window  # the stream window we advertise
    cdef public Py_ssize_t peer_initial_window, peer_max_frame
    cdef public Py_ssize_t send_window, recv_window  # connection level, each way
    cdef public Py_ssize_t conn_credit  # connection-level bytes consumed, to credit
    cdef public Py_ssize_t recv_frame  # the largest frame we accept
    cdef public Py_ssize_t conn_window  # the connection window we keep open
    cdef public object header_block  # HEADERS awaiting CONTINUATION, or None
    cdef public double last_read  # time.monotonic() of the last read
    cdef public list _window_waiters
    cdef bytearray _rbuf  # what get_buffer() lends the transport, allocated at first use
    cdef public bint coalesce  # hold writes made in a read callback, write them joined after
    cdef list _pending  # the writes held (see _batch_depth)
    cdef public bint in_read  # inside this connection's read callback
    cdef public bint sent_data  # DATA or HEADERS written since the peer's last PING
    cdef public Py_ssize_t unread  # what streams the relay does not read hold (bytes)
    cdef public Py_ssize_t unread_max  # ... at most (UNREAD_MAX)
    cdef public double budget, budget_at  # control frames the peer may send, as of when
    cdef public double control_burst, control_rate  # the budget's size and refill per second
    cdef public Py_ssize_t replies_paused  # replies written since the transport paused
    cdef public list _fed  # Throughs that got bytes in this read: pumped once, at its end

    cdef int _on_read(self, object data, const uint8_t* p, Py_ssize_t size) except -1
    cdef int _read(self, object data, const uint8_t* p, Py_ssize_t size) except -1
    cdef int _pump_fed(self, bint more) except -1
    cdef int _receive_preface(self, data) except -1
    cdef int _receive(self, data) except -1
    cdef int _receive_buf(self, object data, const uint8_t* p, Py_ssize_t size) except -1
    cdef Py_ssize_t _fill_pending(self, const uint8_t* p, Py_ssize_t pos,
                                  Py_ssize_t size) except -1
    cdef int _frame(self, object data, const uint8_t* p, int ftype, int flags, uint32_t sid,
                    Py_ssize_t start, Py_ssize_t end) except -1
    cpdef int start_data(self, int flags, uint32_t sid, Py_ssize_t length) except -1
    cpdef int end_data(self) except -1
    cpdef int credit_stream(self, StreamCore stream, Py_ssize_t amount) except -1
    cdef int _maybe_credit_conn(self) except -1
    cdef int _credit_conn(self) except -1
    cpdef int charge(self, str what) except -1
    cpdef int count_reply(self) except -1
    cpdef int reply(self, data) except -1
    cpdef int write(self, data) except -1
    cpdef int writelines(self, list chunks) except -1
    cpdef int flush(self) except -1
    cdef int _out(self, data, bint many) except -1


cpdef bytes frame_u32(int ftype, uint32_t stream_id, uint32_t value)
