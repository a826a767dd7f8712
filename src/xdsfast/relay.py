"""The relay: pairs each Envoy stream with one istiod stream and pumps frames both ways.

Per frame it does one peek, one lookup of "is this type consumed by the agent?",
one send.  Frames stay the bytes the engine delivered.

Envoy -> istiod goes through an unbounded queue, so reading from Envoy never
waits on istiod (the backpressure deadlock of istio#39209).  istiod -> Envoy is
a straight await: a slow Envoy slows reading from istiod (one response in
flight), memory does not grow.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from xdsfast import intercept, log, wire
from xdsfast.engines import (
    OK,
    Code,
    Dialer,
    DialError,
    Downstream,
    Mode,
    Status,
    StreamError,
    Upstream,
)
from xdsfast.intercept import Interceptor
from xdsfast.metrics import Metrics

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

    side: str  # "upstream", "downstream", "replaced" or "internal"
    status: Status


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


class Relay:
    """Serves Envoy streams; only one is active at a time, as in Istio's agent."""

    def __init__(
        self,
        dialer: Dialer,
        metrics: Metrics,
        *,
        interceptors: Iterable[Interceptor] = (),
        cluster_id: str = "",
        xds_headers: Iterable[tuple[str, str]] = (),
    ) -> None:
        self.dialer = dialer
        self.metrics = metrics
        self.interceptors = {i.type_url: i for i in interceptors}
        self.metadata = (("clusterid", cluster_id), *((k.lower(), v) for k, v in xds_headers))
        self.active: Session | None = None
        self.draining = False
        self._ids = itertools.count(1)

    def drain(self) -> None:
        """Shutting down: end the active stream with OK (Envoy reconnects), take no new ones."""
        self.draining = True
        if self.active is not None:
            self.active.replace("xdsfast is shutting down")

    async def handle(self, downstream: Downstream, mode: Mode) -> Status:
        """Relay one Envoy stream until either side ends; the result ends Envoy's stream."""
        if self.draining:
            return Status(Code.UNAVAILABLE, "xdsfast is shutting down")
        session = Session(self, downstream, mode, next(self._ids))
        previous, self.active = self.active, session
        if previous is not None:
            _log.warning(
                "new Envoy stream replaces the active one",
                extra=log.fields(id=session.id, replaced=previous.id),
            )
            previous.replace("replaced by a newer one")
        try:
            return await session.run()
        finally:
            if self.active is session:
                self.active = None


class Session:
    """One Envoy stream paired with one istiod stream."""

    def __init__(self, relay: Relay, downstream: Downstream, mode: Mode, session_id: int) -> None:
        self.relay = relay
        self.metrics = relay.metrics
        self.downstream = downstream
        self.flavour = _FLAVOURS[mode]
        self.mode = mode
        self.id = session_id
        self.requests: asyncio.Queue[bytes] = asyncio.Queue()
        self.initial_requests_sent = False
        self._replaced = asyncio.Event()
        self._replaced_why = ""

    def replace(self, why: str) -> None:
        """End this session with OK, for ``why``."""
        self._replaced_why = why
        self._replaced.set()

    async def run(self) -> Status:
        fields = log.fields(id=self.id, peer=self.downstream.peer, mode=self.mode.name)
        _log.info("Envoy stream established", extra=fields)
        try:
            upstream = await self.relay.dialer.open(self.mode, self.relay.metadata)
        except DialError as exc:
            self.metrics.istiod_connection_failures.inc()
            _log.error("cannot reach istiod: %s", exc, extra=fields)
            return Status(Code.UNAVAILABLE, f"xdsfast: {exc}")
        _log.info("connected to istiod", extra=fields)
        tasks = [
            asyncio.ensure_future(self._from_envoy()),
            asyncio.ensure_future(self._to_istiod(upstream)),
            asyncio.ensure_future(self._from_istiod(upstream)),
            asyncio.ensure_future(self._until_replaced()),
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            ending = self._ending(next(iter(done)))
        except asyncio.CancelledError:  # Envoy went away: the engine cancels the handler
            self.metrics.envoy_connection_terminations.inc_label("cancelled")
            _log.info("Envoy stream cancelled", extra=fields)
            raise
        finally:
            for task in tasks:
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(*tasks, return_exceptions=True)
            await upstream.close()
        return self._account(ending, fields)

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
        if ending.side == "upstream":
            self.metrics.istiod_connection_terminations.inc_label(kind)
            _log.log(level, "istiod ended the stream: %s", status, extra=fields)
            return status
        if ending.side == "downstream":
            self.metrics.envoy_connection_terminations.inc_label(kind)
            _log.log(level, "Envoy ended the stream: %s", status, extra=fields)
            return status
        if ending.side == "replaced":
            _log.info("stream closed: %s", self._replaced_why, extra=fields)
        return ending.status

    async def _until_replaced(self) -> Ending:
        await self._replaced.wait()
        return Ending("replaced", OK)

    async def _from_envoy(self) -> Ending:
        """Envoy -> queue; after the first LDS request, the agent's own requests."""
        recv = self.downstream.recv
        peek = self.flavour.peek_request
        queue = self.requests
        recv_max = self.metrics.pilot_xds_recv_max
        debug = _log.isEnabledFor(logging.DEBUG)
        while True:
            try:
                data = await recv()
            except StreamError as exc:
                return Ending("downstream", exc.status)
            if data is None:
                return Ending("downstream", OK)
            if len(data) > recv_max.value:
                recv_max.value = len(data)
            try:
                request = peek(data)
            except wire.WireError as exc:
                self.metrics.bad_messages.inc_label("request")
                _log.error("malformed request from Envoy: %s", exc, extra=log.fields(id=self.id))
                return Ending(
                    "downstream", Status(Code.INVALID_ARGUMENT, f"malformed request: {exc}")
                )
            if debug:
                _log.debug("request for %s", request.type_url, extra=log.fields(id=self.id))
            queue.put_nowait(data)
            if not self.initial_requests_sent and request.type_url == intercept.LISTENER:
                self.initial_requests_sent = True
                for type_url in self.relay.interceptors:
                    queue.put_nowait(intercept.subscribe(self.mode, type_url))

    async def _to_istiod(self, upstream: Upstream) -> Ending:
        get = self.requests.get
        send = upstream.send
        sent = self.metrics.xds_proxy_requests
        while True:
            data = await get()
            try:
                await send(data)
            except StreamError as exc:
                return Ending("upstream", exc.status)
            sent.value += 1

    async def _from_istiod(self, upstream: Upstream) -> Ending:
        recv = upstream.recv
        send = self.downstream.send
        peek = self.flavour.peek_response
        interceptors = self.relay.interceptors
        received = self.metrics.xds_proxy_responses
        forwarded: dict[str, bool] = {}  # type_url -> allowed, so the check runs once per type
        debug = _log.isEnabledFor(logging.DEBUG)
        while True:
            try:
                data = await recv()
            except StreamError as exc:
                return Ending("upstream", exc.status)
            if data is None:
                return Ending("upstream", OK)
            received.value += 1
            try:
                response = peek(data)
            except wire.WireError as exc:
                self.metrics.bad_messages.inc_label("response")
                _log.error("malformed response from istiod: %s", exc, extra=log.fields(id=self.id))
                return Ending("upstream", Status(Code.INTERNAL, f"malformed response: {exc}"))
            type_url = response.type_url
            if debug:
                _log.debug("response for %s", type_url, extra=log.fields(id=self.id))
            interceptor = interceptors.get(type_url)
            if interceptor is not None:
                self._consume(interceptor, data, response)
                continue
            allowed = forwarded.get(type_url)
            if allowed is None:
                allowed = forwarded[type_url] = intercept.is_forwarded(type_url)
            if not allowed:
                self.metrics.dropped_responses.inc_label("type_not_forwarded")
                _log.error(
                    "dropped a response of a type Envoy is not sent: %s",
                    type_url,
                    extra=log.fields(id=self.id),
                )
                continue
            try:
                await send(data)
            except StreamError as exc:
                return Ending("downstream", exc.status)

    def _consume(self, interceptor: Interceptor, data: bytes, response: Any) -> None:
        version = self.flavour.version(response)
        reply, error = intercept.consume(interceptor, self.mode, data, version, response.nonce)
        fields = log.fields(id=self.id, type=interceptor.type_url, version=version)
        if reply is None:
            _log.info("empty response consumed, not acknowledged", extra=fields)
            return
        if error is None:
            self.metrics.consumed_responses.inc_label("applied")
            _log.info("applied and acknowledged", extra=fields)
        else:
            self.metrics.consumed_responses.inc_label("rejected")
            _log.error("rejected (NACK): %s", error, extra=fields)
        self.requests.put_nowait(reply)
