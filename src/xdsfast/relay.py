"""The relay: pairs each Envoy stream with one istiod stream and pumps frames both ways.

Per frame it does one peek, one lookup of "is this type consumed by the agent?",
one send.  Frames stay the bytes the engine delivered.

Envoy -> istiod goes through an unbounded queue, so reading from Envoy never
waits on istiod (the backpressure deadlock of istio#39209).  istiod -> Envoy is
a straight await: a slow Envoy slows reading from istiod (one response in
flight), memory does not grow.

Where the engine offers it, a sink per direction takes each message inside the
read callback that completed it, and writes it on at once when nothing is queued
before it and nothing would wait; anything else (the first request when its node
gets xdsfast's DNS metadata, the first LDS request, consumed or rewritten types, a full
window) takes the pumps' path above, in order.

Where the engine offers it too, a big response is not held whole: its first resource's
type, read as it arrives (``_Head``), says whether it goes to Envoy unchanged, and if so
it is written on as its bytes come, istiod's window credited only as Envoy's side takes
them (cut-through): memory is the windows, not the push.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

from xdsfast import intercept, log, route, wire
from xdsfast.engines import (
    OK,
    Code,
    Dialer,
    DialError,
    Downstream,
    Mode,
    SourceError,
    Status,
    StreamError,
    Through,
    Upstream,
)
from xdsfast.intercept import Interceptor, Rewriter
from xdsfast.metrics import Metrics
from xdsfast.typeurls import LISTENER, RESOURCE_WRAPPER

_log = log.scope("xdsproxy")

# Status details that mean a peer went away in an ordinary way (Istio's
# "expected" errors, in grpc-go's words and in gRPC C-core's).
_EXPECTED_UNAVAILABLE = (
    "client disconnected",
    "error reading from server: EOF",
    "transport is closing",
    "Socket closed",
    "GOAWAY",
    "goaway",
    "Connection reset by peer",
    "RST_STREAM with error code 0",
)


# How long a half-closing Envoy's queued requests may take to reach istiod.
_FLUSH_TIMEOUT = 2.0

# A big response whose first resource's type is not known within this many bytes is held
# whole, as are those without resources or of a type the agent consumes or rewrites.
HEAD_MAX = 64 << 10

# Lines a peer can make the relay repeat (one per stream or per dial) are written at most
# once per this many seconds, with a count (``log.Throttle``).
_REPEAT_INTERVAL = 1.0


def is_expected(status: Status) -> bool:
    """Istio's classification: graceful or expected endings count as ``cancelled``."""
    if status.code in (Code.OK, Code.CANCELLED, Code.DEADLINE_EXCEEDED):
        return True
    return status.code == Code.UNAVAILABLE and any(
        text in status.details for text in _EXPECTED_UNAVAILABLE
    )


def termination_type(status: Status) -> str:
    return "cancelled" if is_expected(status) else "error"


@dataclass(frozen=True)
class Ending:
    """Which side ended a session first, and how."""

    side: str  # "upstream", "downstream", "half-closed", "replaced" or "internal"
    status: Status


def _failed(side: str, error: StreamError) -> Ending:
    """A stream's failure as an ending.  An engine may keep the error and raise it again:
    its traceback (frames holding the session and the message in hand) is dropped, or the
    two would hold each other until a full collection."""
    error.__traceback__ = None
    return Ending(side, error.status)


class _Flavour:
    """What differs between state-of-the-world and delta: the peekers."""

    def __init__(self, mode: Mode) -> None:
        self.mode = mode
        if mode is Mode.SOTW:
            self.peek_request: Callable[[bytes], Any] = wire.peek_request
            self.peek_response: Callable[[bytes], Any] = wire.peek_response
        else:
            self.peek_request = wire.peek_delta_request
            self.peek_response = wire.peek_delta_response

    @staticmethod
    def version(peek: Any) -> str:
        return str(getattr(peek, "version_info", None) or getattr(peek, "system_version_info", ""))


_FLAVOURS = {mode: _Flavour(mode) for mode in Mode}


class _Head:
    """Judges one big response as it arrives (``engines.Head``): it may go to Envoy as it
    comes when its first resource is of a type forwarded unchanged; the scanner then reads
    the rest (``scan``, its own compiled ``feed``) for what the whole-message peek would
    say, and a malformed byte (WireError) stops it."""

    __slots__ = ("forwarded", "scan", "scanner", "type_url")

    def __init__(self, scanner: wire.ResponseScanner, forwarded: Callable[[str], bool]) -> None:
        self.scanner = scanner
        self.scan = scanner.feed
        self.forwarded = forwarded
        self.type_url = ""  # the first resource's type, once said yes

    def feed(self, chunk: bytes) -> bool | None:
        scanner = self.scanner
        try:
            scanner.feed(chunk)
        except (wire.WireError, ValueError):  # (ValueError: past its length, an engine bug)
            return False  # held whole: the peek reports it
        first = scanner.first_resource_type
        if first is None:
            return None if scanner.fed < HEAD_MAX else False
        if first and first != RESOURCE_WRAPPER and self.forwarded(first):
            self.type_url = first
            return True
        return False


class _TypeState(route.TypeState):
    """One type on one stream, as ``/debug/xds`` shows it (the fields are the core's)."""

    __slots__ = ()

    def nack(self, mode: Mode, data: bytes) -> None:
        """Record a NACK with its error_detail (decoding the request: NACKs are rare)."""
        from google.protobuf.message import DecodeError

        from xdsfast import xds_pb2

        self.ack = "NACK"
        message: Any = (
            xds_pb2.DiscoveryRequest if mode is Mode.SOTW else xds_pb2.DeltaDiscoveryRequest
        )
        try:
            detail = message.FromString(data).error_detail
            self.error = (int(detail.code), str(detail.message))
        except DecodeError:
            self.error = (0, "(error_detail could not be decoded)")

    def describe(self, flavour: _Flavour, epoch: float) -> dict[str, Any]:
        last, error = self.last, self.error
        return {
            "version": "" if last is None else flavour.version(last),
            "nonce": "" if last is None else last.nonce,
            "responses": self.responses,
            "bytes": self.bytes,
            "last_push": _rfc3339(epoch + self.pushed) if self.pushed else None,
            "ack": self.ack or None,
            "ack_nonce": self.ack_nonce,
            "error_detail": None if error is None else {"code": error[0], "message": error[1]},
        }


async def _abandon(dial: asyncio.Future[Upstream]) -> None:
    """Cancel a dial; close its stream if it was opened all the same."""
    dial.cancel()
    await asyncio.wait((dial,))
    if not dial.cancelled() and dial.exception() is None:
        await dial.result().close()


def _rfc3339(seconds: float) -> str:
    whole = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
    return f"{whole}.{int(seconds % 1 * 1000):03d}Z"


class Relay:
    """Serves Envoy streams; only one is active at a time, as in Istio's agent."""

    def __init__(
        self,
        dialer: Dialer,
        metrics: Metrics,
        *,
        interceptors: Iterable[Interceptor] = (),
        rewriters: Iterable[Rewriter] = (),
        cluster_id: str = "",
        xds_headers: Iterable[tuple[str, str]] = (),
    ) -> None:
        self.dialer = dialer
        self.metrics = metrics
        self.interceptors = {i.type_url: i for i in interceptors}
        self.rewriters = {r.type_url: r for r in rewriters}
        # The last health report per flavour: sent after every stream's first LDS request.
        self.health: dict[Mode, bytes] = {}
        self.metadata = (("clusterid", cluster_id), *((k.lower(), v) for k, v in xds_headers))
        self.active: Session | None = None
        self.draining = False
        self._ids = itertools.count(1)
        # One upstream dial at a time: a stream's dial waits for the one before it, which a
        # newer stream cancels (so a flood of Envoy streams cannot open a socket each).
        self.dialing = asyncio.Lock()
        self.say = log.Throttle(_log, _REPEAT_INTERVAL)
        # Appended to the first request of each stream when it carries a node (per flavour).
        self.node_patch: dict[Mode, bytes] = {}

    def set_node_metadata(self, metadata: Mapping[str, str]) -> None:
        """Set these keys in the node of each stream's first request from now on (xdsfast's
        DNS stands in for pilot-agent's, whose node metadata istiod reads)."""
        self.node_patch = (
            {mode: intercept.node_metadata_patch(mode, metadata) for mode in Mode}
            if metadata
            else {}
        )

    def passes(self, type_url: str) -> bool:
        """Responses of this type go to Envoy unchanged (not consumed, not rewritten)."""
        return (
            intercept.is_forwarded(type_url)
            and type_url not in self.interceptors
            and type_url not in self.rewriters
        )

    def drain(self) -> None:
        """Shutting down: end the active stream with OK (Envoy reconnects), take no new ones."""
        self.draining = True
        if self.active is not None:
            self.active.replace("xdsfast is shutting down")

    def report_health(self, error: str | None) -> None:
        """The workload's health changed: cache the report, and send it now if it may go."""
        self.health = {mode: intercept.health_request(mode, error) for mode in Mode}
        session = self.active
        if session is not None and session.initial_requests_sent:
            session.requests.put_nowait(self.health[session.mode])

    def debug_state(self) -> dict[str, Any]:
        """Per active stream and type: versions, nonces, ACK/NACK, counts (``/debug/xds``)."""
        return {"streams": [] if self.active is None else [self.active.debug_state()]}

    async def handle(self, downstream: Downstream, mode: Mode) -> Status:
        """Relay one Envoy stream until either side ends; the result ends Envoy's stream."""
        if self.draining:
            return Status(Code.UNAVAILABLE, "xdsfast is shutting down")
        session = Session(self, downstream, mode, next(self._ids))
        previous, self.active = self.active, session
        if previous is not None:
            self.say.warning(
                "new Envoy stream replaces the active one", id=session.id, replaced=previous.id
            )
            previous.replace("replaced by a newer one")
            previous = None  # not kept alive by this frame for as long as the new one runs
        try:
            return await session.run()
        finally:
            if self.active is session:
                self.active = None
            session.release()


class Session(route.RouteCore):
    """One Envoy stream paired with one istiod stream.

    The per-message path (both sinks, what they keep, ``_to_istiod_now``) is the core's:
    :class:`xdsfast.route.RouteCore`."""

    def __init__(self, relay: Relay, downstream: Downstream, mode: Mode, session_id: int) -> None:
        self.flavour = _FLAVOURS[mode]
        super().__init__(
            relay.metrics, downstream, mode, self.flavour.peek_request, self.flavour.peek_response
        )
        self.relay = relay
        self.id = session_id
        self.peer = downstream.peer
        self._replaced = asyncio.Event()
        self._replaced_why = ""
        self.started = time.time()
        # Until the first request has gone: what its node gets (None: the sink may take it).
        self._node_patch = relay.node_patch.get(mode)

    def _state(self, type_url: str) -> _TypeState:
        state = self.types[type_url] = _TypeState(self.metrics.xds_bytes.of(type_url))
        return state

    def debug_state(self) -> dict[str, Any]:
        epoch = time.time() - time.perf_counter()  # perf_counter() + epoch = Unix time
        return {
            "id": self.id,
            "mode": "sotw" if self.mode is Mode.SOTW else "delta",
            "peer": self.peer,
            "connected": _rfc3339(self.started),
            "types": {url: s.describe(self.flavour, epoch) for url, s in self.types.items()},
        }

    def replace(self, why: str) -> None:
        """End this session with OK, for ``why``."""
        self._replaced_why = why
        self._replaced.set()

    def release(self) -> None:
        """The session is over, however it ended: besides the core's (sinks, streams, what
        ``/debug/xds`` kept), the queued requests go, so that whatever may still refer to
        the session (a traceback, a log record) holds nothing big."""
        super().release()
        requests = self.requests
        while not requests.empty():
            requests.get_nowait()

    async def run(self) -> Status:
        say = self.relay.say
        fields = {"id": self.id, "peer": self.peer, "mode": self.mode.name}
        say.info("Envoy stream established", **fields)
        try:
            upstream = await self._dial()
        except DialError as exc:
            self.metrics.istiod_connection_failures.inc()
            say.error("cannot reach istiod: %s", str(exc), **fields)  # text: no traceback kept
            return Status(Code.UNAVAILABLE, f"xdsfast: {exc}")
        if upstream is None:
            return self._account(Ending("replaced", OK), fields)
        say.info("connected to istiod", **fields)
        self.upstream = upstream
        if not _log.isEnabledFor(logging.DEBUG):  # else every message is logged by the pumps
            if self._node_patch is None:  # else _from_envoy sets it after the first request
                self.downstream.set_sink(self._request_sink)
            upstream.set_sink(self._response_sink)
        upstream.set_through(self._open)
        tasks = [
            asyncio.ensure_future(self._from_envoy()),
            asyncio.ensure_future(self._to_istiod(upstream)),
            asyncio.ensure_future(self._from_istiod(upstream)),
            asyncio.ensure_future(self._until_replaced()),
        ]
        done: set[asyncio.Future[Ending]] = set()
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            ending = self._ending(next(iter(done)))
            if ending.side == "half-closed":
                ending = await self._after_half_close(upstream, tasks[2])
        except asyncio.CancelledError:  # Envoy went away: the engine cancels the handler
            self.metrics.envoy_connection_terminations.inc_label("cancelled")
            self.metrics.istiod_connection_terminations.inc_label("cancelled")  # as Istio's
            say.info("Envoy stream cancelled", **fields)
            raise
        finally:
            self.downstream.set_sink(None)
            upstream.set_sink(None)
            upstream.set_through(None)
            self.upstream = None
            for task in tasks:
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(*tasks, return_exceptions=True)
            # A cancelled pump keeps its frames (and what they hold: a response being
            # written) in its exception; this frame outlives the stream in a traceback when
            # Envoy cancels it, so it lets go of the pumps.
            tasks.clear()
            done.clear()
            await upstream.close()
        return self._account(ending, fields)

    def _open(self, length: int) -> _Head:
        """The judge of a big response (``length`` bytes) about to arrive (it refers to the
        relay, not to this session: the engine may keep it past the session's end)."""
        return _Head(wire.ResponseScanner(self.mode is Mode.DELTA, length), self.relay.passes)

    async def _dial(self) -> Upstream | None:
        """istiod's stream; None if a newer Envoy stream replaced this one first.

        One dial at a time for the whole relay, and a replaced session's dial is cancelled:
        a flood of Envoy streams against a silent istiod holds one upstream socket, not one
        each (Istio's agent, too, keeps only the newest stream)."""
        relay = self.relay
        async with relay.dialing:
            if self._replaced.is_set():
                return None
            dial = asyncio.ensure_future(relay.dialer.open(self.mode, relay.metadata))
            replaced = asyncio.ensure_future(self._replaced.wait())
            try:
                await asyncio.wait((dial, replaced), return_when=asyncio.FIRST_COMPLETED)
            except asyncio.CancelledError:
                await _abandon(dial)
                raise
            finally:
                replaced.cancel()
            if not dial.done():
                await _abandon(dial)
                return None
            return dial.result()  # raises DialError

    async def _after_half_close(
        self, upstream: Upstream, responses: asyncio.Future[Ending]
    ) -> Ending:
        """Envoy said it has nothing more to send: half-close upstream too, so istiod reads
        every request before the stream goes, and give istiod a moment to end it."""
        await upstream.half_close()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(responses), _FLUSH_TIMEOUT)
        return Ending("downstream", OK)

    def _ending(self, task: asyncio.Future[Ending]) -> Ending:
        """The ending a pump returned; a bug in a pump ends the pair, loudly."""
        error = task.exception()
        if error is None:
            return task.result()
        _log.error(
            "internal error, ending the stream", exc_info=error, extra=log.fields(id=self.id)
        )
        return Ending("internal", Status(Code.INTERNAL, f"xdsfast internal error: {error!r}"))

    def _account(self, ending: Ending, fields: dict[str, Any]) -> Status:
        """Count and log how the session ended; return the status for Envoy."""
        status = ending.status
        kind = termination_type(status)
        level = logging.INFO if kind == "cancelled" else logging.WARNING
        say = self.relay.say
        if ending.side == "upstream":
            self.metrics.istiod_connection_terminations.inc_label(kind)
            say.log(level, "istiod ended the stream: %s", status, **fields)
            return status
        if ending.side == "downstream":
            self.metrics.envoy_connection_terminations.inc_label(kind)
            # As Istio's agent: the istiod stream it cancels in turn ends "cancelled" too.
            self.metrics.istiod_connection_terminations.inc_label("cancelled")
            say.log(level, "Envoy ended the stream: %s", status, **fields)
            return status
        if ending.side == "replaced":
            say.info("stream closed: %s", self._replaced_why, **fields)
        return ending.status

    async def _until_replaced(self) -> Ending:
        await self._replaced.wait()
        return Ending("replaced", OK)

    async def _from_envoy(self) -> Ending:
        """Envoy -> istiod, for what the sink left; after the first LDS request, the agent's
        own requests too."""
        recv, offer = self.downstream.recv, self.downstream.offer_queued
        peek = self.flavour.peek_request
        debug = _log.isEnabledFor(logging.DEBUG)
        while True:
            offer()  # what queued behind the last request goes on through the sink if it can
            try:
                data = await recv()
            except StreamError as exc:
                return _failed("downstream", exc)
            if data is None:
                # Envoy half-closed: what it sent before still goes to istiod (bounded wait).
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.requests.join(), _FLUSH_TIMEOUT)
                return Ending("half-closed", OK)
            try:
                request = peek(data)
            except wire.WireError as exc:
                self.metrics.bad_messages.inc_label("request")
                self.relay.say.error("malformed request from Envoy: %s", str(exc), id=self.id)
                return Ending(
                    "downstream", Status(Code.INVALID_ARGUMENT, f"malformed request: {exc}")
                )
            if debug:
                _log.debug("request for %s", request.type_url, extra=log.fields(id=self.id))
            self._note_request(data, request)
            if self._node_patch is not None:
                self._first_request(data, request, debug)
            else:
                self._to_istiod_now(data)
            if not self.initial_requests_sent and request.type_url == LISTENER:
                self.initial_requests_sent = True
                for type_url in self.relay.interceptors:
                    self._to_istiod_now(intercept.subscribe(self.mode, type_url))
                cached_health = self.relay.health.get(self.mode)
                if cached_health is not None:
                    self._to_istiod_now(cached_health)

    def _first_request(self, data: bytes, request: Any, debug: bool) -> None:
        """The stream's first request: its node, if it has one, gets the node metadata
        (appended, see ``intercept.node_metadata_patch``); later ones may take the sink."""
        patch, self._node_patch = self._node_patch, None
        self._to_istiod_now(data + patch if request.has_node and patch else data)
        if not debug and self.upstream is not None:
            self.downstream.set_sink(self._request_sink)

    async def _to_istiod(self, upstream: Upstream) -> Ending:
        get = self.requests.get
        done = self.requests.task_done
        send = upstream.send
        sent = self.metrics.xds_proxy_requests
        while True:
            data = None  # (as in _from_istiod: not kept alive while waiting)
            data = await get()
            self._sending = True
            try:
                await send(data)
            except StreamError as exc:
                return _failed("upstream", exc)
            self._sending = False
            sent.value += 1
            done()

    async def _from_istiod(self, upstream: Upstream) -> Ending:
        recv, offer = upstream.recv, upstream.offer_queued
        send = self.downstream.send
        peek = self.flavour.peek_response
        interceptors = self.relay.interceptors
        rewriters = self.relay.rewriters
        received = self.metrics.xds_proxy_responses
        debug = _log.isEnabledFor(logging.DEBUG)
        types = self.types
        clock = time.perf_counter
        data: bytes | Through | None = None
        while True:
            # The last response must not stay alive while the next one is read: a 20 MB
            # push would cost twice its size (measured: peak RSS 2.0x -> 1.0x the message).
            data = None
            offer()  # what queued behind the last response goes on through the sink if it can
            try:
                data = await recv()
            except StreamError as exc:
                return _failed("upstream", exc)
            if data is None:
                return Ending("upstream", OK)
            received.value += 1
            if type(data) is not bytes:
                ending = await self._through(cast(Through, data), debug)
                if ending is not None:
                    return ending
                continue
            arrived = clock()
            try:
                response = peek(data)
            except wire.WireError as exc:
                return self._malformed(exc)
            type_url = response.type_url
            if debug:
                _log.debug("response for %s", type_url, extra=log.fields(id=self.id))
            interceptor = interceptors.get(type_url)
            if interceptor is not None:
                self._consume(interceptor, data, response)
                continue
            if not intercept.is_forwarded(type_url):
                self.metrics.dropped_responses.inc_label("type_not_forwarded")
                self.relay.say.error(
                    "dropped a response of a type Envoy is not sent: %s", type_url, id=self.id
                )
                continue
            state = types.get(type_url) or self._state(type_url)
            rewriter = rewriters.get(type_url)
            if rewriter is not None:
                rewritten = await self._rewrite(rewriter, data, response, state)
                if rewritten is None:
                    continue
                data = rewritten
            elif not debug:
                self._plain[type_url] = state  # the sink may forward this type from now on
            try:
                await send(data)
            except StreamError as exc:
                return _failed("downstream", exc)
            self._forwarded(state, response, len(data), arrived)

    async def _through(self, through: Through, debug: bool) -> Ending | None:
        """A big response relayed as it arrives: all but its last byte first, and the last
        once its end has been read and checked (well-formed, its type_url its first
        resource's), so Envoy never holds whole a response that fails either: the stream
        ends instead, and Envoy resyncs."""
        head = cast(_Head, through.head)
        type_url = head.type_url
        if debug:
            fields = log.fields(id=self.id)
            _log.debug("response for %s, relayed as it arrives", type_url, extra=fields)
        send = self.downstream.send_through
        try:
            await send(through, False)
        except SourceError as exc:
            if not through.failed:  # (refused on the way: finish() says why)
                return _failed("upstream", exc)
        except StreamError as exc:
            return _failed("downstream", exc)
        try:
            response = head.scanner.finish()
        except wire.WireError as exc:
            return self._malformed(exc)
        if response.type_url != type_url:
            self.metrics.dropped_responses.inc_label("type_mismatch")
            why = f"response type {response.type_url} is not its first resource's, {type_url}"
            self.relay.say.error("%s: ending the stream, Envoy resyncs", why, id=self.id)
            return Ending("upstream", Status(Code.INTERNAL, why))
        try:
            await send(through, True)
        except StreamError as exc:
            return _failed("downstream", exc)
        self.metrics.streamed_responses.inc()
        state = self.types.get(type_url) or self._state(type_url)
        if not debug:
            self._plain[type_url] = state  # the sink may forward this type from now on
        self._forwarded(state, response, through.length - 5, through.arrived)
        return None

    def _malformed(self, exc: wire.WireError) -> Ending:
        self.metrics.bad_messages.inc_label("response")
        self.relay.say.error("malformed response from istiod: %s", str(exc), id=self.id)
        return Ending("upstream", Status(Code.INTERNAL, f"malformed response: {exc}"))

    async def _rewrite(
        self, rewriter: Rewriter, data: bytes, response: Any, state: _TypeState
    ) -> bytes | None:
        """The rewritten response, or None when it was NACKed upstream instead.

        A NACK carries the version Envoy last ACKed for the type (SotW), as Istio's."""
        try:
            return await rewriter.rewrite(self.mode, data)
        except intercept.Rejected as exc:
            acked = "" if state.acked is None else getattr(state.acked, "version_info", "")
            names: Sequence[str] = ()
            if self.mode is Mode.SOTW and state.acked_data is not None:
                from xdsfast import xds_pb2  # a rejection is rare: protobuf loads then

                names = xds_pb2.DiscoveryRequest.FromString(state.acked_data).resource_names
            nack = intercept.acknowledge(
                self.mode, rewriter.type_url, acked, response.nonce, str(exc), names
            )
            self.requests.put_nowait(nack)
            self.metrics.dropped_responses.inc_label("rejected_by_agent")
            self.relay.say.error(
                "rejected (NACK) instead of forwarding: %s",
                str(exc),
                id=self.id,
                type=rewriter.type_url,
            )
            return None

    def _consume(self, interceptor: Interceptor, data: bytes, response: Any) -> None:
        version = self.flavour.version(response)
        reply, error = intercept.consume(interceptor, self.mode, data, version, response.nonce)
        fields = log.fields(id=self.id, type=interceptor.type_url, version=version)
        state = self.types.get(response.type_url) or self._state(response.type_url)
        state.last = response
        state.responses += 1
        state.bytes += len(data)
        state.totals.response += len(data)
        if reply is None:
            _log.info("empty response consumed, not acknowledged", extra=fields)
            return
        state.pushed = time.perf_counter()  # applied, and answered by the agent itself
        state.ack_nonce = response.nonce
        if error is None:
            state.ack = "ACK"
            self.metrics.consumed_responses.inc_label("applied")
            _log.info("applied and acknowledged", extra=fields)
        else:
            state.ack, state.error = "NACK", (intercept.INTERNAL, error)
            self.metrics.consumed_responses.inc_label("rejected")
            _log.error("rejected (NACK): %s", error, extra=fields)
        self.requests.put_nowait(reply)
