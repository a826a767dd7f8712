# The relay's per-message core (_route.pyx): its classes' C fields and methods.
#
# Callbacks the core makes by name, on Python objects (the twin makes the same ones):
#   RouteCore subclass (relay.Session):  _state(type_url) -> TypeState, a type's first message
#   TypeState subclass (relay._TypeState): nack(mode, data), a request with an error_detail
#   the engine's streams:                 try_send(data) -> bool, set_sink(None)
#   the requests queue (asyncio.Queue):   empty(), put_nowait(data)
#   the peekers given to the constructor: peek_request(data), peek_response(data)
#   metrics that are not the core's own types (Tally, Latencies, ByteTotals): .value,
#     .observe(seconds), .request, .response
#
# The sinks call _note_request, _to_istiod_now, _forwarded and Latencies.observe as
# RouteCore.<name>(self, ...): a direct C call, no lookup of a Python override.

cdef class Latencies:
    cdef readonly tuple bounds
    cdef readonly long long count
    cdef readonly double sum
    cdef double* _bounds
    cdef long long* _counts  # one per bound, then one above them all (+Inf)
    cdef Py_ssize_t _n

    cpdef void observe(self, double value) noexcept


cdef class Tally:
    cdef public long long value


cdef class ByteTotals:
    cdef public long long request, response


cdef class TypeState:
    cdef readonly object totals  # the process-wide byte counters of this type
    cdef ByteTotals _totals  # the same when compiled (added to in C), else None
    cdef public object last  # the peek of the last response
    cdef public Py_ssize_t responses
    cdef public Py_ssize_t bytes
    cdef public double pushed  # perf_counter() when the last response was written to Envoy
    cdef public str ack  # "ACK" or "NACK": the answer to a response, last seen
    cdef public str ack_nonce
    cdef public object error  # the last NACK's (code, message)
    cdef public object acked  # the peek of Envoy's last ACK of this type
    cdef public object acked_data  # and its bytes (a reference, not a copy)


cdef class RouteCore:
    cdef public dict types  # type URL -> the relay's TypeState, what /debug/xds shows
    cdef public dict _plain  # the types the response sink may forward as they are
    cdef readonly object requests  # asyncio.Queue: requests waiting for _to_istiod, in order
    cdef public object upstream  # the engine's Upstream once dialed, else None
    cdef public object downstream  # the engine's Downstream (None once released)
    cdef public object metrics
    cdef readonly object mode  # the subclass's SotW or delta (for TypeState.nack)
    cdef public bint initial_requests_sent  # the agent's own followed Envoy's first LDS
    cdef public bint _sending  # _to_istiod is writing a request (later ones queue behind)
    cdef object _peek_request, _peek_response
    cdef object _requests_sent, _responses_received, _recv_max, _push_latency
    cdef Latencies _latencies  # _push_latency when it is compiled (observed in C), else None
    cdef Tally _requests_tally, _responses_tally  # the same for the counters (added in C)

    cpdef _note_request(self, data, request)
    cpdef _to_istiod_now(self, data)
    cpdef _forwarded(self, TypeState state, response, Py_ssize_t size, double arrived)
