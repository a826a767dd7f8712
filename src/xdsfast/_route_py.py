"""Pure-Python twin of :mod:`xdsfast._route`: the relay's per-message path.

Where the engine offers it, each message is handed to a sink inside the read
callback that completed it: peek it, write it on to the other side at once when
nothing is queued before it and nothing would wait, and keep what ``/debug/xds``
and the metrics show.  That is all of the relay's work per message, so it is
compiled (``_route.pyx``, line for line the same); ``relay.Session`` subclasses
:class:`RouteCore` and does everything else.  The core calls back by name, for
rare cases only: ``_state`` (a type's first message) and ``TypeState.nack`` (every
callback: ``_route.pxd``).
"""

from __future__ import annotations

import asyncio
import time
from bisect import bisect_left
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from xdsfast._errors import WireError
from xdsfast.typeurls import LISTENER

if TYPE_CHECKING:  # metrics builds its histograms on Latencies: no import at run time
    from xdsfast.metrics import Metrics


class Latencies:
    """A histogram's counts, observed per forwarded response; ``metrics.LatencyHistogram``
    names and exposes it (compiled, observing costs no call into Python)."""

    __slots__ = ("bounds", "count", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one: above every bound (+Inf)
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.count += 1
        self.sum += value


class Tally:
    """A counter's number (``metrics.Count`` subclasses it); compiled, a C field, so the
    sinks count a message without a Python attribute get, add and set."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0


class ByteTotals:
    """One type URL's bytes per direction (``metrics.TypeBytes``); C fields when compiled."""

    __slots__ = ("request", "response")

    def __init__(self) -> None:
        self.request = 0
        self.response = 0


class TypeState:
    """One type on one stream, as ``/debug/xds`` shows it; kept per message."""

    __slots__ = (
        "ack",
        "ack_nonce",
        "acked",
        "acked_data",
        "bytes",
        "error",
        "last",
        "pushed",
        "responses",
        "totals",
    )

    def __init__(self, totals: ByteTotals) -> None:
        self.totals = totals  # the process-wide byte counters of this type
        self.last: Any = None  # the peek of the last response
        self.responses = 0
        self.bytes = 0
        self.pushed = 0.0  # perf_counter() when the last response was written to Envoy
        self.ack = ""  # "ACK" or "NACK": the answer to a response, last seen
        self.ack_nonce = ""
        self.error: tuple[int, str] | None = None  # the last NACK's (code, message)
        self.acked: Any = None  # the peek of Envoy's last ACK of this type
        self.acked_data: bytes | None = None  # and its bytes (a reference, not a copy)

    def nack(self, mode: Any, data: bytes) -> None:
        raise NotImplementedError  # the relay's subclass decodes the error detail


class RouteCore:
    """One session's sinks and the state they keep; ``relay.Session`` is the rest."""

    types: dict[str, Any]  # type URL -> the relay's TypeState, what /debug/xds shows
    _plain: dict[str, Any]  # the types the response sink may forward as they are
    requests: asyncio.Queue[bytes]  # requests waiting for _to_istiod, in order
    upstream: Any  # the engine's Upstream once dialed, else None
    downstream: Any  # the engine's Downstream (None once released)
    metrics: Metrics
    mode: Any  # SotW or delta (for TypeState.nack)
    initial_requests_sent: bool  # the agent's own requests followed Envoy's first LDS
    _sending: bool  # _to_istiod is writing a request (later ones queue behind it)

    def __init__(
        self,
        metrics: Metrics,
        downstream: Any,
        mode: Any,
        peek_request: Callable[[bytes], Any],
        peek_response: Callable[[bytes], Any],
    ) -> None:
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

    def _state(self, type_url: str) -> Any:
        raise NotImplementedError  # the relay's subclass makes its TypeState

    def release(self) -> None:
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

    def _request_sink(self, data: bytes) -> bool:
        """A request, in the engine's read callback: the common case without a task switch."""
        try:
            request = self._peek_request(data)
        except WireError:
            return False  # _from_envoy reports it
        if not self.initial_requests_sent and request.type_url == LISTENER:
            return False  # the first LDS request brings the agent's own: _from_envoy does it
        self._to_istiod_now(data)  # istiod first: the bookkeeping is not on the request's path
        self._note_request(data, request)
        return True

    def _response_sink(self, data: bytes) -> bool:
        """A response, in the engine's read callback: a type already forwarded as it is goes
        straight to Envoy when nothing would wait; anything else is _from_istiod's."""
        arrived = time.perf_counter()
        try:
            response = self._peek_response(data)
        except WireError:
            return False  # _from_istiod reports it
        state = self._plain.get(response.type_url)
        if state is None or not self.downstream.try_send(data):
            return False
        self.metrics.xds_proxy_responses.value += 1
        self._forwarded(state, response, len(data), arrived)
        return True

    def _note_request(self, data: bytes, request: Any) -> None:
        """What /debug/xds and the metrics keep of a request from Envoy."""
        size = len(data)
        recv_max = self.metrics.pilot_xds_recv_max
        if size > recv_max.value:
            recv_max.value = size
        state = self.types.get(request.type_url) or self._state(request.type_url)
        state.totals.request += size
        if request.response_nonce:
            state.ack_nonce = request.response_nonce
            if request.has_error_detail:
                state.nack(self.mode, data)
            else:
                state.ack = "ACK"
                state.acked, state.acked_data = request, data

    def _to_istiod_now(self, data: bytes) -> None:
        """Write a request to istiod at once if nothing is queued or being sent before it and
        nothing would wait; else queue it for _to_istiod (never waits: see istio#39209)."""
        upstream = self.upstream
        if (
            upstream is not None
            and not self._sending
            and self.requests.empty()
            and upstream.try_send(data)
        ):
            self.metrics.xds_proxy_requests.value += 1
        else:
            self.requests.put_nowait(data)

    def _forwarded(self, state: Any, response: Any, size: int, arrived: float) -> None:
        """A response went to Envoy: what /debug/xds and the metrics keep of it."""
        state.last = response
        state.responses += 1
        state.bytes += size
        state.totals.response += size
        state.pushed = written = time.perf_counter()
        self.metrics.push_latency.observe(written - arrived)
