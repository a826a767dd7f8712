# cython: language_level=3, boundscheck=False, wraparound=False
"""The relay's per-message path, compiled: line for line ``_route_py.py`` (the reference).

``relay.Session`` subclasses :class:`RouteCore`; the engine calls its two sinks from
the read callback that completed a message.  Fields, methods and the callbacks made by
name are declared in ``_route.pxd``.
"""

import asyncio

from cpython.mem cimport PyMem_Calloc, PyMem_Free

from xdsfast._clock cimport monotonic  # time.perf_counter(), as the twin reads it
from xdsfast._errors import WireError
from xdsfast.typeurls import LISTENER


cdef class Latencies:
    """A histogram's counts, observed per forwarded response without a call into Python
    (the twin's bisect and three additions cost about a tenth of the relay's work per
    message); ``metrics.LatencyHistogram`` names and exposes it."""

    def __init__(self, bounds):
        cdef Py_ssize_t i
        self.bounds = tuple(bounds)
        self._n = len(self.bounds)
        PyMem_Free(self._bounds)
        PyMem_Free(self._counts)
        self._bounds = <double*>PyMem_Calloc(self._n + 1, sizeof(double))
        self._counts = <long long*>PyMem_Calloc(self._n + 1, sizeof(long long))
        if self._bounds == NULL or self._counts == NULL:
            raise MemoryError()
        for i in range(self._n):
            self._bounds[i] = self.bounds[i]
        self.count = 0
        self.sum = 0.0

    def __dealloc__(self):
        PyMem_Free(self._bounds)
        PyMem_Free(self._counts)

    @property
    def counts(self):
        """Observations per bucket (not cumulative), ``+Inf`` last."""
        return [self._counts[i] for i in range(self._n + 1)]

    cpdef void observe(self, double value) noexcept:
        cdef Py_ssize_t lo = 0, hi = self._n, mid
        while lo < hi:  # bisect_left: the first bound not below the value
            mid = (lo + hi) >> 1
            if self._bounds[mid] < value:
                lo = mid + 1
            else:
                hi = mid
        self._counts[lo] += 1
        self.count += 1
        self.sum += value


cdef class Tally:
    """A counter's number as a C field (``metrics.Count`` subclasses it), so the sinks
    count a message without a Python attribute get, add and set."""

    def __init__(self):
        self.value = 0


cdef class ByteTotals:
    """One type URL's bytes per direction as C fields (``metrics.TypeBytes``)."""

    def __init__(self):
        self.request = 0
        self.response = 0


cdef class TypeState:
    """One type on one stream, as ``/debug/xds`` shows it; kept per message."""

    def __init__(self, totals):
        self.totals = totals
        if isinstance(totals, ByteTotals):
            self._totals = totals
        self.last = None
        self.responses = 0
        self.bytes = 0
        self.pushed = 0.0
        self.ack = ""
        self.ack_nonce = ""
        self.error = None
        self.acked = None
        self.acked_data = None

    def nack(self, mode, data):
        raise NotImplementedError  # the relay's subclass decodes the error detail


cdef class RouteCore:
    """One session's sinks and the state they keep; ``relay.Session`` is the rest."""

    def __init__(self, metrics, downstream, mode, peek_request, peek_response):
        self.metrics = metrics
        self.downstream = downstream
        self.mode = mode
        self.upstream = None
        self.requests = asyncio.Queue()
        self.types = {}
        self._plain = {}
        self.initial_requests_sent = False
        self._sending = False
        self._peek_request = peek_request
        self._peek_response = peek_response
        self._requests_sent = metrics.xds_proxy_requests
        self._responses_received = metrics.xds_proxy_responses
        self._recv_max = metrics.pilot_xds_recv_max
        self._push_latency = metrics.push_latency
        if isinstance(self._push_latency, Latencies):
            self._latencies = self._push_latency
        if isinstance(self._requests_sent, Tally):
            self._requests_tally = self._requests_sent
        if isinstance(self._responses_received, Tally):
            self._responses_tally = self._responses_received

    def _state(self, type_url):
        raise NotImplementedError  # the relay's subclass makes its TypeState

    def release(self):
        """The session ended, however it ended: the sinks are taken back from the engine's
        streams and what they kept is dropped, so neither refers to the other any more (a
        cycle would hold the session, and all it holds, until a full collection)."""
        for stream in (self.upstream, self.downstream):
            if stream is not None:
                stream.set_sink(None)
        self.upstream = None
        self.downstream = None
        self.types = {}
        self._plain = {}

    def _request_sink(self, bytes data):
        """A request, in the engine's read callback: the common case without a task switch."""
        try:
            request = self._peek_request(data)
        except WireError:
            return False  # _from_envoy reports it
        if not self.initial_requests_sent and request.type_url == LISTENER:
            return False  # the first LDS request brings the agent's own: _from_envoy does it
        RouteCore._to_istiod_now(self, data)  # istiod first: bookkeeping is off its path
        RouteCore._note_request(self, data, request)
        return True

    def _response_sink(self, bytes data):
        """A response, in the engine's read callback: a type already forwarded as it is goes
        straight to Envoy when nothing would wait; anything else is _from_istiod's."""
        cdef double arrived = monotonic()
        try:
            response = self._peek_response(data)
        except WireError:
            return False  # _from_istiod reports it
        state = self._plain.get(response.type_url)
        if state is None or not self.downstream.try_send(data):
            return False
        if self._responses_tally is not None:
            self._responses_tally.value += 1
        else:
            self._responses_received.value += 1
        RouteCore._forwarded(self, state, response, len(data), arrived)
        return True

    cpdef _note_request(self, data, request):
        """What /debug/xds and the metrics keep of a request from Envoy."""
        cdef Py_ssize_t size = len(data)
        cdef TypeState state
        recv_max = self._recv_max
        if size > recv_max.value:
            recv_max.value = size
        type_url = request.type_url
        state = self.types.get(type_url) or self._state(type_url)
        if state._totals is not None:
            state._totals.request += size
        else:
            state.totals.request += size
        nonce = request.response_nonce
        if nonce:
            state.ack_nonce = nonce
            if request.has_error_detail:
                state.nack(self.mode, data)  # the subclass's (NACKs are rare)
            else:
                state.ack = "ACK"
                state.acked = request
                state.acked_data = data

    cpdef _to_istiod_now(self, data):
        """Write a request to istiod at once if nothing is queued or being sent before it and
        nothing would wait; else queue it for _to_istiod (never waits: see istio#39209)."""
        upstream = self.upstream
        if (
            upstream is not None
            and not self._sending
            and self.requests.empty()
            and upstream.try_send(data)
        ):
            if self._requests_tally is not None:
                self._requests_tally.value += 1
            else:
                self._requests_sent.value += 1
        else:
            self.requests.put_nowait(data)

    cpdef _forwarded(self, TypeState state, response, Py_ssize_t size, double arrived):
        """A response went to Envoy: what /debug/xds and the metrics keep of it."""
        cdef double written
        state.last = response
        state.responses += 1
        state.bytes += size
        if state._totals is not None:
            state._totals.response += size
        else:
            state.totals.response += size
        state.pushed = written = monotonic()
        if self._latencies is not None:
            Latencies.observe(self._latencies, written - arrived)
        else:
            self._push_latency.observe(written - arrived)
