"""The relay's per-message path (``RouteCore``), compiled and twin, given the same messages:
the same sink answers, the same writes and queued requests, the same /debug/xds state and
metrics.  The relay suites run whichever one is active end to end; this pins the two to
each other, including the cases the end-to-end runs reach rarely (a full window, a NACK,
a malformed message, the agent's first LDS request)."""

from __future__ import annotations

from bisect import bisect_left
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from twins import KINDS, Cores, both

from xdsfast import _route_py, route, wire, xds_pb2
from xdsfast.engines import Mode
from xdsfast.metrics import PUSH_LATENCY_BUCKETS, Metrics
from xdsfast.typeurls import LISTENER

EDS = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
CDS = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
TYPES = (EDS, CDS, LISTENER)


class Side:
    """An engine side: ``try_send`` answers ``ok`` and keeps what it took."""

    def __init__(self) -> None:
        self.ok = True
        self.sent: list[bytes] = []
        self.peer = "test"

    def try_send(self, data: bytes) -> bool:
        if self.ok:
            self.sent.append(data)
        return self.ok


def session(cores: Cores, mode: Mode) -> Any:
    """A RouteCore subclass as the relay makes one, on fake sides and real metrics."""
    core = cores.core

    class State(cores.route.TypeState):  # type: ignore[name-defined,misc]
        def nack(self, mode: Mode, data: bytes) -> None:
            self.ack, self.error = "NACK", (len(data), mode.name)

    class Session(cores.route.RouteCore):  # type: ignore[name-defined,misc]
        def __init__(self) -> None:
            sotw = mode is Mode.SOTW
            super().__init__(
                Metrics(),
                Side(),
                mode,
                core.peek_request if sotw else core.peek_delta_request,
                core.peek_response if sotw else core.peek_delta_response,
            )

        def _state(self, type_url: str) -> Any:
            state = self.types[type_url] = State(self.metrics.xds_bytes.of(type_url))
            return state

    return Session()


def response(mode: Mode, type_url: str, n: int) -> bytes:
    if mode is Mode.SOTW:
        msg: Any = xds_pb2.DiscoveryResponse(type_url=type_url, version_info=f"v{n}", nonce=f"n{n}")
    else:
        msg = xds_pb2.DeltaDiscoveryResponse(
            type_url=type_url, system_version_info=f"v{n}", nonce=f"n{n}"
        )
    return bytes(msg.SerializeToString())


def request(mode: Mode, type_url: str, nonce: str, error: bool) -> bytes:
    cls: Any = xds_pb2.DiscoveryRequest if mode is Mode.SOTW else xds_pb2.DeltaDiscoveryRequest
    msg = cls(type_url=type_url, response_nonce=nonce)
    if mode is Mode.SOTW:
        msg.version_info = nonce.replace("n", "v")
    if error:
        msg.error_detail.code = 3
        msg.error_detail.message = "rejected"
    return bytes(msg.SerializeToString())


def kept(t: Any) -> tuple[Any, ...]:
    """What one type's state holds, in plain values."""
    last = None if t.last is None else t.last.nonce
    acked = None if t.acked is None else t.acked.response_nonce
    counts = (t.responses, t.bytes, t.totals.request, t.totals.response)
    return (*counts, t.ack, t.ack_nonce, t.error, t.pushed > 0, last, acked, t.acked_data)


def snapshot(s: Any) -> dict[str, Any]:
    """Everything the core keeps or does, in plain values."""
    m = s.metrics
    queued = []
    while not s.requests.empty():
        queued.append(s.requests.get_nowait())
    for data in queued:
        s.requests.put_nowait(data)
    sent, received = m.xds_proxy_requests.value, m.xds_proxy_responses.value
    return {
        "types": {url: kept(t) for url, t in s.types.items()},
        "down": list(s.downstream.sent),
        "queued": queued,
        "metrics": (sent, received, m.pilot_xds_recv_max.value, m.push_latency.count),
    }


@pytest.fixture(params=list(Mode), ids=lambda mode: mode.name)
def routed(request: pytest.FixtureRequest, twins: Cores) -> tuple[Any, Mode]:
    """A session on each core, in each mode."""
    mode: Mode = request.param
    return session(twins, mode), mode


def test_response_sink_forwards_only_plain_types_when_the_write_would_not_wait(
    routed: tuple[Any, Mode],
) -> None:
    s, mode = routed
    eds = response(mode, EDS, 1)
    assert s._response_sink(eds) is False  # not plain yet: _from_istiod's
    s._plain[EDS] = s._state(EDS)
    assert s._response_sink(eds) is True
    s.downstream.ok = False  # a full window: _from_istiod waits for it, in order
    assert s._response_sink(response(mode, EDS, 2)) is False
    assert s._response_sink(b"\x0a\xff") is False  # malformed: _from_istiod reports it
    state = s.types[EDS]
    assert s.downstream.sent == [eds]
    assert (state.responses, state.bytes, state.last.nonce) == (1, len(eds), "n1")
    assert state.totals.response == len(eds) and state.pushed > 0
    assert (s.metrics.xds_proxy_responses.value, s.metrics.push_latency.count) == (1, 1)


def test_request_sink_sends_at_once_or_queues_behind_what_waits(
    routed: tuple[Any, Mode],
) -> None:
    s, mode = routed
    lds = request(mode, LISTENER, "", False)
    assert s._request_sink(lds) is False  # the first LDS request: _from_envoy adds the agent's
    s.initial_requests_sent = True
    ack = request(mode, EDS, "n1", False)
    assert s._request_sink(ack) is True  # no upstream yet: queued
    assert s.requests.get_nowait() == ack
    s.upstream = Side()
    assert s._request_sink(ack) is True
    assert s.upstream.sent == [ack] and s.metrics.xds_proxy_requests.value == 1
    s._sending = True  # _to_istiod is writing one: later ones queue behind it
    nack = request(mode, EDS, "n2", True)
    assert s._request_sink(nack) is True
    assert s.upstream.sent == [ack] and s.requests.get_nowait() == nack
    state = s.types[EDS]
    assert (state.ack, state.ack_nonce, state.error) == ("NACK", "n2", (len(nack), mode.name))
    assert state.acked.response_nonce == "n1" and state.acked_data is ack
    assert state.totals.request == 2 * len(ack) + len(nack)
    assert s.metrics.pilot_xds_recv_max.value == len(nack)
    assert s._request_sink(b"\x12") is False  # malformed: _from_envoy reports it


EVENTS = st.lists(
    st.one_of(
        st.tuples(st.just("response"), st.integers(0, 2), st.booleans()),
        st.tuples(st.just("request"), st.integers(0, 2), st.integers(0, 3), st.booleans()),
        st.tuples(st.just("plain"), st.integers(0, 2)),
        st.tuples(st.just("up_ok"), st.booleans()),
        st.tuples(st.just("sending"), st.booleans()),
        st.tuples(st.just("connect"), st.booleans()),
        st.tuples(st.just("initial"), st.booleans()),
        st.tuples(st.just("drain"), st.booleans()),
        st.tuples(st.just("garbage"), st.binary(max_size=12)),
    ),
    max_size=40,
)


def play(cores: Cores, mode: Mode, events: list[Any]) -> list[Any]:
    s = session(cores, mode)
    upstream = Side()
    answers: list[Any] = []
    for n, event in enumerate(events):
        kind = event[0]
        if kind == "response":
            s.downstream.ok = event[2]
            answers.append(s._response_sink(response(mode, TYPES[event[1]], n)))
        elif kind == "request":
            nonce = f"n{event[2]}" if event[2] else ""
            answers.append(s._request_sink(request(mode, TYPES[event[1]], nonce, event[3])))
        elif kind == "plain":
            url = TYPES[event[1]]
            s._plain[url] = s.types.get(url) or s._state(url)
        elif kind == "up_ok":
            upstream.ok = event[1]
        elif kind == "sending":
            s._sending = event[1]
        elif kind == "connect":
            s.upstream = upstream if event[1] else None
        elif kind == "initial":
            s.initial_requests_sent = event[1]
        elif kind == "drain":
            while not s.requests.empty():
                s.requests.get_nowait()
        else:
            answers.append((s._request_sink(event[1]), s._response_sink(event[1])))
    snap = snapshot(s)
    snap["up"] = upstream.sent
    return [answers, snap]


@settings(max_examples=300, deadline=None)
@given(events=EVENTS, delta=st.booleans())
# The paths a short random list reaches least: a request while one is being sent, a NACK,
# a response whose write would wait, the agent's first LDS request.
@example([("connect", True), ("sending", True), ("request", 0, 1, False)], False)
@example([("connect", True), ("initial", True), ("request", 1, 2, True)], True)
@example([("plain", 0), ("response", 0, False), ("response", 0, True)], False)
@example([("connect", True), ("request", 2, 0, False), ("initial", True)], True)
def test_twins_agree_on_any_sequence_of_messages(events: list[Any], delta: bool) -> None:
    mode = Mode.DELTA if delta else Mode.SOTW
    twin, compiled = (play(cores, mode, events) for cores in both())
    assert twin == compiled


@settings(max_examples=200, deadline=None)
@given(values=st.lists(st.floats() | st.sampled_from(PUSH_LATENCY_BUCKETS), max_size=40))
def test_latency_counts_agree_on_any_values(values: list[float]) -> None:
    """The push-latency histogram's counting, compiled and twin: the same bucket for every
    value (a value on a bound counts in that bound's bucket, as bisect_left puts it)."""
    seen = []
    for kind in KINDS:
        latencies = Cores(kind).route.Latencies(tuple(PUSH_LATENCY_BUCKETS))
        for value in values:
            latencies.observe(value)
        seen.append((latencies.counts, latencies.count, repr(latencies.sum)))
    expected = [0] * (len(PUSH_LATENCY_BUCKETS) + 1)
    for value in values:
        expected[bisect_left(PUSH_LATENCY_BUCKETS, value)] += 1
    assert all(counts == expected and count == len(values) for counts, count, _ in seen)
    assert all(entry == seen[0] for entry in seen)


def test_the_active_route_core_follows_the_peeker() -> None:
    """One switch (XDSFAST_NO_EXTENSIONS) picks the twins everywhere, so they are
    reported as one: ``wire.IMPLEMENTATION``."""
    assert route.IMPLEMENTATION == wire.IMPLEMENTATION
    if route.IMPLEMENTATION == "cython":
        assert route.RouteCore.__module__ == route.Latencies.__module__ == "xdsfast._route"
    else:
        assert route.RouteCore is _route_py.RouteCore
        assert route.Latencies is _route_py.Latencies
