"""The processes ``relay_bench.py`` runs: control plane, client and the naive relay.

Each runs as its own process on uvloop so that what the benchmark measures is the
relay's cost, not the peers' fight for one GIL:

* ``controlplane``: a raw-bytes ADS server.  It sends pre-serialized responses
  (the body is serialized once; version and nonce are appended as trailing
  fields, which protobuf's last-one-wins rule makes valid), so it never encodes
  or decodes on the hot path.  With ``--tls-dir`` it also serves TLS (h2 ALPN,
  as istiod's 15012) on a second port, with a throw-away CA and server
  certificate it writes there (``root-cert.pem`` is what clients trust).
* ``client``: an Envoy-like raw-bytes ADS client: an initial request with a
  node, then an ACK per response (nonce read with xdsfast's compiled peeker);
  plaintext, or TLS when the command names a root CA (the ``direct-tls`` row).
* ``naive``: the baseline relay, a grpc.aio proxy that decodes and re-encodes
  every message with xds-protos' classes, as a proto-codec proxy does; with
  ``--raw`` the same loops without the codec (the floor for a grpc.aio relay).

The orchestrator drives ``controlplane`` and ``client`` with one JSON object per
line on stdin and reads one JSON event per line on stdout.  Every peer exits
when its stdin closes, so none outlives a crashed orchestrator.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import uvloop
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2 as pb
from google.protobuf import struct_pb2
from grpc import aio

from xdsfast import wire

SERVICE = "envoy.service.discovery.v3.AggregatedDiscoveryService"
CDS = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
EDS = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
STORM, SMALL, BURST = "storm", "small", "burst"
BIG, BIG_ACKED = "big", "big-acked"  # big CDS pushes back to back; one at a time, each ACKed
TYPE_OF = {STORM: CDS, SMALL: EDS, BURST: EDS, BIG: CDS, BIG_ACKED: CDS}
BIG_CHUNK_CLUSTERS = 256  # a big push is these clusters' resources repeated to its size
# What istiod's certificate names (Istio's default ISTIOD_SAN) besides localhost/127.0.0.1.
TLS_SERVER_NAME = "istiod.istio-system.svc"
ROOT_CERT = "root-cert.pem"
STORM_VARIANTS = 8  # distinct pre-built storm pushes, sent round-robin (nonces differ in a row)
SMALL_VARIANTS = 256  # distinct EDS bodies; each send gets a fresh version and nonce

# No message-size limit anywhere: a 5 MB push must pass every hop.
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", -1),
    ("grpc.max_send_message_length", -1),
]
SERVER_OPTIONS = [*CHANNEL_OPTIONS, ("grpc.so_reuseport", 0)]


# ----- wire helpers ------------------------------------------------------------------


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(tag: int, value: bytes) -> bytes:
    """One length-delimited field; every tag used here fits in one byte."""
    return bytes((tag,)) + _varint(len(value)) + value


def _text(tag: int, value: str) -> bytes:
    return _field(tag, value.encode())


@dataclass(frozen=True)
class Flavour:
    """What differs between SotW and delta ADS for the peers (field tags, classes)."""

    delta: bool

    @property
    def method(self) -> str:
        name = "DeltaAggregatedResources" if self.delta else "StreamAggregatedResources"
        return f"/{SERVICE}/{name}"

    def initial_request(self, type_url: str) -> bytes:
        """Envoy's first request: node, type, wildcard (SotW) or subscribe-all (delta)."""
        node = sidecar_node()
        request: Any
        if self.delta:
            request = pb.DeltaDiscoveryRequest(
                node=node, type_url=type_url, resource_names_subscribe=["*"]
            )
        else:
            request = pb.DiscoveryRequest(node=node, type_url=type_url)
        data: bytes = request.SerializeToString()
        return data

    def ack(self, type_url: str, version: str, nonce: str) -> bytes:
        """An ACK in canonical field order (so a re-encoding relay passes it unchanged)."""
        if self.delta:  # type_url = 2, response_nonce = 6
            return _text(0x12, type_url) + _text(0x32, nonce)
        # version_info = 1, type_url = 4, response_nonce = 5
        return _text(0x0A, version) + _text(0x22, type_url) + _text(0x2A, nonce)

    def body(self, type_url: str, resources: Sequence[tuple[str, Any]]) -> bytes:
        """A response without version and nonce: :meth:`stamp` appends them."""
        response: Any
        if self.delta:
            response = pb.DeltaDiscoveryResponse(type_url=type_url)
            for name, message in resources:
                response.resources.add(name=name, version="1").resource.Pack(message)
        else:
            response = pb.DiscoveryResponse(type_url=type_url)
            for _, message in resources:
                response.resources.add().Pack(message)
        data: bytes = response.SerializeToString()
        return data

    @staticmethod
    def stamp(body: bytes, serial: int) -> bytes:
        """Append (system_)version_info (field 1) and nonce (field 5), both fixed length."""
        text = f"{serial:010d}".encode()
        return body + b"\x0a\x0a" + text + b"\x2a\x0a" + text

    def peek_response(self, data: bytes) -> tuple[str, str]:
        """(version, nonce) of a response, without decoding it."""
        if self.delta:
            d = wire.peek_delta_response(data)
            return d.system_version_info, d.nonce
        r = wire.peek_response(data)
        return r.version_info, r.nonce

    def peek_nonce(self, data: bytes) -> str:
        """The response_nonce of a request (an ACK)."""
        if self.delta:
            return wire.peek_delta_request(data).response_nonce
        return wire.peek_request(data).response_nonce


def big_push(chunk: bytes, repeats: int, serial: int, flavour: Flavour) -> bytes:
    """A CDS response: ``chunk`` (resources only) ``repeats`` times, then type_url,
    version and nonce, in istiod's order (resources first).

    Repeating a repeated field is still one valid response; ``b"".join`` of references
    makes the one allocation, so the control plane holds no second copy of the push.
    """
    tail = flavour.stamp(_text(0x22, CDS), serial)  # type_url is field 4 in both flavours
    return b"".join([chunk] * repeats + [tail])


def sidecar_node() -> base_pb2.Node:
    """A node shaped like an Istio sidecar's (id, cluster, a few metadata keys)."""
    metadata = struct_pb2.Struct()
    metadata.update(
        {
            "CLUSTER_ID": "Kubernetes",
            "NAMESPACE": "bench",
            "ISTIO_VERSION": "1.24.0",
            "INTERCEPTION_MODE": "REDIRECT",
            "LABELS": {"app": "bench", "version": "v1"},
        }
    )
    return base_pb2.Node(
        id="sidecar~10.0.0.7~bench-7f9c.bench~bench.svc.cluster.local",
        cluster="bench.bench",
        metadata=metadata,
    )


# ----- plumbing shared by the peers --------------------------------------------------


def emit(event: str, **fields: Any) -> None:
    """One JSON event line to the orchestrator."""
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


def stdin_commands(loop: asyncio.AbstractEventLoop) -> asyncio.Queue[dict[str, Any] | None]:
    """Commands from stdin, one JSON object per line; None once stdin closes.

    A thread does the blocking reads so the loop never waits on the pipe.
    """
    queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()

    def pump() -> None:
        for line in sys.stdin:
            if line.strip():
                loop.call_soon_threadsafe(queue.put_nowait, json.loads(line))
        loop.call_soon_threadsafe(queue.put_nowait, None)

    threading.Thread(target=pump, name="stdin", daemon=True).start()
    return queue


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values."""
    if not sorted_values:
        return float("nan")
    rank = max(0, min(len(sorted_values) - 1, math.ceil(q * len(sorted_values)) - 1))
    return sorted_values[rank]


def cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


# ----- TLS -----------------------------------------------------------------------------


def write_tls_files(directory: Path) -> tuple[bytes, bytes]:
    """A throw-away CA and a server certificate for istiod's name, localhost and 127.0.0.1.

    Writes the CA to ``directory/root-cert.pem`` (what xdsfast's XDS_ROOT_CA and the
    direct-tls client trust) and the key and certificate next to it (for the logs);
    returns (key, certificate chain) as PEM for the server.  ImportError without the
    ``cryptography`` package (the bench extra), which the TLS rows report.
    """
    from xdsfast.peers.pki import Authority  # lazily: only the TLS rows need cryptography

    authority = Authority("relay-bench root")
    server = authority.issue("istiod", dns=(TLS_SERVER_NAME, "localhost"), ips=("127.0.0.1",))
    directory.mkdir(parents=True, exist_ok=True)
    (directory / ROOT_CERT).write_bytes(authority.pem)
    server.write(directory, "server")
    return server.key, server.cert


# ----- control plane ------------------------------------------------------------------


@dataclass
class Plan:
    """The workload the next stream gets."""

    workload: str
    count: int
    flavour: Flavour
    size: int = 0  # the big pushes' size in bytes


class ControlPlane:
    """Raw-bytes ADS server that runs one planned workload per stream."""

    def __init__(self) -> None:
        self.plan: Plan | None = None
        self._storm: dict[bool, list[bytes]] = {}
        self._small: dict[bool, list[bytes]] = {}
        self._big_chunk: dict[bool, bytes] = {}
        self._cds_body: dict[bool, bytes] = {}

    def cds_body(self, flavour: Flavour) -> bytes:
        """The storm's CDS body (4000 Istio-like clusters, ~5 MB), built once per flavour."""
        if flavour.delta not in self._cds_body:
            from xdsfast.peers import mesh

            clusters = list(mesh.big_cds(4000).items())
            self._cds_body[flavour.delta] = flavour.body(CDS, clusters)
        return self._cds_body[flavour.delta]

    def big_chunk(self, flavour: Flavour) -> bytes:
        """The big pushes' repeated part: 256 Istio-like clusters, no type_url, built once."""
        if flavour.delta not in self._big_chunk:
            from xdsfast.peers import mesh

            clusters = list(mesh.big_cds(BIG_CHUNK_CLUSTERS).items())
            self._big_chunk[flavour.delta] = flavour.body("", clusters)
        return self._big_chunk[flavour.delta]

    def big_repeats(self, plan: Plan) -> int:
        """How many chunks make a push of about ``plan.size`` bytes."""
        return max(1, round(plan.size / len(self.big_chunk(plan.flavour))))

    def prepare(self, plan: Plan) -> dict[str, Any]:
        """Build (once per flavour) the payloads a plan needs, outside any timing."""
        flavour = plan.flavour
        if plan.workload == STORM:
            if flavour.delta not in self._storm:
                body = self.cds_body(flavour)
                self._storm[flavour.delta] = [flavour.stamp(body, i) for i in range(STORM_VARIANTS)]
            size = len(self._storm[flavour.delta][0])
        elif plan.workload in (BIG, BIG_ACKED):
            # Only a ~300 kB chunk is kept; each push is built at its send (big_push).
            chunk = self.big_chunk(flavour)
            size = len(chunk) * (self.big_repeats(plan) - 1) + len(big_push(chunk, 1, 0, flavour))
        else:  # SMALL and BURST: the same EDS bodies, each message stamped with its own nonce
            if flavour.delta not in self._small:
                from xdsfast.peers import mesh

                self._small[flavour.delta] = [
                    flavour.body(EDS, [(mesh.big_cluster_name(i), mesh.small_eds(i))])
                    for i in range(SMALL_VARIANTS)
                ]
            bodies = self._small[flavour.delta]
            size = sum(len(flavour.stamp(b, 0)) for b in bodies) // len(bodies)
        self.plan = plan
        return {"message_bytes": size}

    async def serve(self, request: Any, context: aio.ServicerContext[bytes, bytes]) -> None:
        """One ADS stream: wait for the initial request, run the plan, drain until the end."""
        plan, self.plan = self.plan, None
        first = await context.read()
        if first is aio.EOF:
            return
        if plan is None:
            emit("error", message="a stream arrived with no workload planned")
            return
        run = self._pushed_run if plan.workload in (STORM, BURST, BIG) else self._acked_run
        try:
            await run(plan, context)
        except asyncio.CancelledError:
            emit("error", message=f"{plan.workload} stream cancelled before the workload ended")
            raise
        while await context.read() is not aio.EOF:
            pass

    async def _pushed_run(self, plan: Plan, context: aio.ServicerContext[bytes, bytes]) -> None:
        """Push ``count`` responses back to back, as istiod pushes (no waiting for ACKs).

        The storm sends its pre-stamped pushes; big pushes are built one at a time, each
        at its send (in the timing, for every row alike: one push held at once); a burst
        stamps each small EDS body with a fresh version and nonce.  ACKs are drained
        concurrently.
        """
        n, flavour = plan.count, plan.flavour
        peek_nonce, stamp = flavour.peek_nonce, flavour.stamp
        bodies: Iterable[bytes]
        if plan.workload == STORM:
            pushes = self._storm[flavour.delta]
            bodies = [pushes[i % len(pushes)] for i in range(n)]
        elif plan.workload == BIG:
            chunk, repeats = self.big_chunk(flavour), self.big_repeats(plan)
            bodies = (big_push(chunk, repeats, i, flavour) for i in range(n))
        else:  # stamped before the clock starts: the control plane's cost is not the relay's
            small = self._small[flavour.delta]
            bodies = [stamp(small[i % len(small)], i) for i in range(n)]
        acked = 0

        async def drain_acks() -> None:
            nonlocal acked
            while acked < n:
                data = await context.read()
                if data is aio.EOF:
                    return
                assert isinstance(data, bytes)
                peek_nonce(data)
                acked += 1

        cpu0 = cpu_seconds()
        reader = asyncio.ensure_future(drain_acks())
        write = context.write
        t_start = time.monotonic()
        sent = 0
        for data in bodies:
            await write(data)
            sent += len(data)
            del data  # a big push is not held while the next one is built
        t_sent = time.monotonic()
        await reader
        if acked < n:
            emit("error", message=f"the stream ended after {acked} of {n} ACKs")
            return
        emit(
            "done",
            t_start=t_start,
            t_sent=t_sent,
            t_acked=time.monotonic(),
            bytes=sent,
            acks=acked,
            cpu=cpu_seconds() - cpu0,
        )

    async def _acked_run(self, plan: Plan, context: aio.ServicerContext[bytes, bytes]) -> None:
        """``count`` response/ACK round trips (small or big), each timed from send to ACK."""
        flavour = plan.flavour
        stamp, peek_nonce = flavour.stamp, flavour.peek_nonce
        bodies = self._small[flavour.delta] if plan.workload == SMALL else []
        chunk = self.big_chunk(flavour) if plan.workload == BIG_ACKED else b""
        repeats = self.big_repeats(plan) if chunk else 0

        def build(i: int) -> bytes:
            """The i-th response; a big push built at its send, so one is held at once."""
            if chunk:
                return big_push(chunk, repeats, i, flavour)
            return stamp(bodies[i % len(bodies)], i)

        read, write, clock = context.read, context.write, time.perf_counter
        rtts: list[float] = []
        mismatched = 0
        cpu0 = cpu_seconds()
        t_start = clock()
        for i in range(plan.count):
            data = build(i)
            t = clock()
            await write(data)
            del data
            ack = await read()
            rtts.append(clock() - t)
            if ack is aio.EOF:
                emit("error", message=f"client ended the stream after {i} updates")
                return
            assert isinstance(ack, bytes)
            if peek_nonce(ack) != f"{i:010d}":
                mismatched += 1
        elapsed = clock() - t_start
        cpu = cpu_seconds() - cpu0
        rtts.sort()
        emit(
            "done",
            elapsed=elapsed,
            count=plan.count,
            p50=percentile(rtts, 0.50),
            p90=percentile(rtts, 0.90),
            p99=percentile(rtts, 0.99),
            max=rtts[-1] if rtts else float("nan"),
            mismatched=mismatched,
            cpu=cpu,
        )


async def run_controlplane(host: str, tls_dir: str | None) -> None:
    cp = ControlPlane()
    handlers = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "StreamAggregatedResources": grpc.stream_stream_rpc_method_handler(cp.serve),
            "DeltaAggregatedResources": grpc.stream_stream_rpc_method_handler(cp.serve),
        },
    )
    server = aio.server(handlers=[handlers], options=SERVER_OPTIONS)
    port = server.add_insecure_port(f"{host}:0")
    tls: dict[str, Any] = {}
    if tls_dir:
        try:
            key, chain = write_tls_files(Path(tls_dir))
        except ImportError as exc:
            emit("error", message=f"TLS rows need the cryptography package ({exc})")
            return
        credentials = grpc.ssl_server_credentials([(key, chain)])  # gRPC offers ALPN h2
        tls_port = server.add_secure_port(f"{host}:0", credentials)
        tls = {"tls_port": tls_port, "root_ca": str(Path(tls_dir) / ROOT_CERT)}
        tls["server_name"] = TLS_SERVER_NAME
    await server.start()
    commands = stdin_commands(asyncio.get_running_loop())
    emit("ready", port=port, **tls)
    try:
        while (command := await commands.get()) is not None:
            flavour = Flavour(command["delta"])
            plan = Plan(command["workload"], int(command["count"]), flavour, command.get("size", 0))
            emit("planned", **cp.prepare(plan))
    finally:
        await server.stop(0)


# ----- client -------------------------------------------------------------------------


def client_channel(target: str, tls: dict[str, str] | None) -> aio.Channel:
    """Plaintext, or TLS trusting ``tls["root_ca"]`` and checking ``tls["server_name"]``."""
    if not tls:
        return aio.insecure_channel(target, options=CHANNEL_OPTIONS)
    credentials = grpc.ssl_channel_credentials(Path(tls["root_ca"]).read_bytes())
    options = [*CHANNEL_OPTIONS, ("grpc.ssl_target_name_override", tls["server_name"])]
    return aio.secure_channel(target, credentials, options=options)


async def client_run(
    target: str,
    workload: str,
    count: int,
    flavour: Flavour,
    commands: asyncio.Queue[dict[str, Any] | None],
    tls: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Open a stream like Envoy, read ``count`` responses and ACK each one.

    The stream stays open until the orchestrator says ``close`` (after the control
    plane has seen the last ACK): a relay may drop requests still queued when
    Envoy half-closes, as Istio's agent does, and Envoy never half-closes anyway.
    """
    type_url = TYPE_OF[workload]
    async with client_channel(target, tls) as channel:
        await asyncio.wait_for(channel.channel_ready(), 10)
        method = channel.stream_stream(
            flavour.method, request_serializer=None, response_deserializer=None
        )
        call = method()
        await call.write(flavour.initial_request(type_url))
        read, write, ack, peek = call.read, call.write, flavour.ack, flavour.peek_response
        received = 0
        cpu0 = cpu_seconds()
        t_first = 0.0
        for i in range(count):
            data = await read()
            if data is aio.EOF:
                code = await call.code()
                raise RuntimeError(f"stream ended after {i} responses: {code}")
            assert isinstance(data, bytes)
            if i == 0:
                t_first = time.monotonic()
            received += len(data)
            version, nonce = peek(data)
            del data  # a big push is not held while the next one arrives
            await write(ack(type_url, version, nonce))
        t_last = time.monotonic()
        cpu = cpu_seconds() - cpu0
        emit("received", t_first=t_first, t_last=t_last, bytes=received, count=count, cpu=cpu)
        command = await commands.get()
        if command is None:
            raise RuntimeError("stdin closed")
        await call.done_writing()
        code = await asyncio.wait_for(call.code(), 10)
    return {"code": code.name}


async def run_client() -> None:
    commands = stdin_commands(asyncio.get_running_loop())
    emit("ready")
    while (command := await commands.get()) is not None:
        try:
            result = await client_run(
                command["target"],
                command["workload"],
                int(command["count"]),
                Flavour(command["delta"]),
                commands,
                command.get("tls"),
            )
        except Exception as exc:  # report it: the orchestrator decides what to do
            emit("error", message=f"{type(exc).__name__}: {exc}")
        else:
            emit("done", **result)


# ----- the naive relay ----------------------------------------------------------------


class NaiveRelay:
    """A proto-codec proxy: every message is decoded and re-encoded on each hop.

    Like Istio's agent, each downstream stream gets its own upstream channel.
    With ``decode=False`` it is the "bare" relay: the same two loops on raw
    bytes, nothing else, i.e. the floor for any grpc.aio relay.
    """

    def __init__(self, upstream: str, *, decode: bool = True) -> None:
        self.upstream = upstream
        self.decode = decode

    def handler(self, request_type: Any, response_type: Any, method: str) -> grpc.RpcMethodHandler:
        def codec(kind: Any) -> tuple[Any, Any]:
            return (kind.FromString, kind.SerializeToString) if self.decode else (None, None)

        (decode_request, encode_request), (decode_response, encode_response) = (
            codec(request_type),
            codec(response_type),
        )
        decode = self.decode

        async def relay(request: Any, context: aio.ServicerContext[Any, Any]) -> None:
            async with aio.insecure_channel(self.upstream, options=CHANNEL_OPTIONS) as channel:
                call = channel.stream_stream(
                    method, request_serializer=encode_request, response_deserializer=decode_response
                )()

                async def to_upstream() -> None:
                    while (message := await context.read()) is not aio.EOF:
                        if decode:
                            _ = message.type_url  # a real proxy routes on the decoded fields
                        await call.write(message)
                    await call.done_writing()

                async def to_downstream() -> None:
                    while (message := await call.read()) is not aio.EOF:
                        if decode:
                            _ = message.type_url
                        await context.write(message)

                up = asyncio.ensure_future(to_upstream())
                try:
                    await to_downstream()
                finally:
                    up.cancel()
                    call.cancel()

        return grpc.stream_stream_rpc_method_handler(
            relay, request_deserializer=decode_request, response_serializer=encode_response
        )


async def run_naive(upstream: str, socket_path: str, decode: bool) -> None:
    relay = NaiveRelay(upstream, decode=decode)
    handlers = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "StreamAggregatedResources": relay.handler(
                pb.DiscoveryRequest,
                pb.DiscoveryResponse,
                f"/{SERVICE}/StreamAggregatedResources",
            ),
            "DeltaAggregatedResources": relay.handler(
                pb.DeltaDiscoveryRequest,
                pb.DeltaDiscoveryResponse,
                f"/{SERVICE}/DeltaAggregatedResources",
            ),
        },
    )
    server = aio.server(handlers=[handlers], options=SERVER_OPTIONS)
    server.add_insecure_port(f"unix:{socket_path}")
    await server.start()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    commands = stdin_commands(loop)
    closed = asyncio.ensure_future(commands.get())  # stdin closes: the orchestrator is gone
    emit("ready")
    try:
        await asyncio.wait(
            [closed, asyncio.ensure_future(stop.wait())], return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        await server.stop(0.5)


class _Pipe(asyncio.Protocol):
    """One side of the byte forwarder: what it reads goes to its peer's transport as is."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: _Pipe | None = None
        self.early: list[bytes] = []  # read before the peer connected
        self.dialing: asyncio.Task[None] | None = None  # (downstream side) its upstream

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is not None and peer.transport is not None:
            peer.transport.write(data)
        else:
            self.early.append(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()

    def pause_writing(self) -> None:  # the peer cannot keep up: stop reading its other side
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()


async def run_forwarder(upstream: str, socket_path: str) -> None:
    """The floor for any relay in Python on uvloop: bytes forwarded both ways, no HTTP/2
    awareness at all (the issue's "plain byte forwarder" row)."""
    loop = asyncio.get_running_loop()
    host, _, port = upstream.rpartition(":")

    def accept() -> _Pipe:
        down = _Pipe()

        async def dial() -> None:
            _, up = await loop.create_connection(_Pipe, host, int(port))
            up.peer, down.peer = down, up
            for side in (down, up):  # what either read while the other was not there yet
                for chunk in side.early:
                    side.data_received(chunk)
                side.early.clear()

        down.dialing = loop.create_task(dial())
        return down

    server = await loop.create_unix_server(accept, socket_path)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    commands = stdin_commands(loop)
    closed = asyncio.ensure_future(commands.get())
    emit("ready")
    try:
        await asyncio.wait(
            [closed, asyncio.ensure_future(stop.wait())], return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        server.close()


# ----- the stock pilot-agent (Istio's own relay) ---------------------------------------

BUILD_SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "build-istio-peers"
AGENT_XDS_SOCKET = Path("etc/istio/proxy/XDS")  # relative to its working directory
AGENT_CLUSTER_ID = "Kubernetes"


def istio_peers_dir(timeout: float = 2400.0) -> Path:
    """The directory of Istio's binaries from ``scripts/build-istio-peers`` (its last stdout
    line; cached, so instant once built).  RuntimeError, with the script's own last error
    line (e.g. "no Go toolchain"), when it cannot build them."""
    try:
        done = subprocess.run(
            ["bash", str(BUILD_SCRIPT)], stdin=subprocess.DEVNULL, capture_output=True,
            text=True, timeout=timeout, check=False,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RuntimeError(f"{BUILD_SCRIPT.name}: {exc}") from None
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        errors = [line for line in done.stderr.splitlines() if line.strip()]
        why = errors[-1] if errors else "no output"
        raise RuntimeError(f"{BUILD_SCRIPT.name} failed (exit {done.returncode}): {why}")
    return Path(lines[-1])


def pilot_agent_binary() -> Path:
    binary = istio_peers_dir() / "pilot-agent"
    if not os.access(binary, os.X_OK):
        raise RuntimeError(f"{BUILD_SCRIPT.name} built no {binary}")
    return binary


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (for the agent's status port)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def pilot_agent_env(
    workdir: Path,
    discovery_address: str,
    status_port: int,
    *,
    tls: dict[str, str] | None = None,
    dns_address: str | None = None,
    extra: dict[str, str] | None = None,
) -> dict[str, str]:
    """Prepare ``workdir`` and return the environment of a bare pilot-agent there.

    ``DISABLE_ENVOY``: the xDS proxy alone (plus DNS with ``dns_address``), downstream on
    ``workdir``/etc/istio/proxy/XDS (its paths are relative: run it with that cwd).  The
    throw-away key pair in ./etc/certs (FILE_MOUNTED_CERTS) serves nothing; without
    loadable files its secret cache logs a failure every few seconds.  Plaintext upstream
    (``controlPlaneAuthPolicy`` NONE) unless ``tls`` gives ``root_ca`` and ``server_name``:
    then it dials TLS trusting XDS_ROOT_CA and checking ISTIOD_SAN, with no client
    certificate (the key pair's paths are not in its metadata).  DNS off unless
    ``dns_address``: with it on, the agent asks for a NameTable after an LDS request."""
    certs = workdir / "etc" / "certs"
    key, chain = write_tls_files(certs)
    (certs / "cert-chain.pem").write_bytes(chain)
    key_path = certs / "key.pem"
    key_path.touch(mode=0o600)
    key_path.write_bytes(key)
    proxy_config = {
        "discoveryAddress": discovery_address,
        "controlPlaneAuthPolicy": "MUTUAL_TLS" if tls else "NONE",
        "statusPort": status_port,
    }
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(workdir),
        "DISABLE_ENVOY": "true",
        "FILE_MOUNTED_CERTS": "true",
        "CLOUD_PLATFORM": "none",
        "PROXY_CONFIG": json.dumps(proxy_config),
        "POD_NAME": "bench",
        "POD_NAMESPACE": "bench",
        "INSTANCE_IP": "127.0.0.1",
        "SERVICE_ACCOUNT": "default",
        "ISTIO_META_CLUSTER_ID": AGENT_CLUSTER_ID,
        "ISTIO_META_DNS_CAPTURE": "true" if dns_address else "false",
    }
    if dns_address:
        env["DNS_PROXY_ADDR"] = dns_address
    if tls:
        env["XDS_ROOT_CA"] = tls["root_ca"]
        env["ISTIOD_SAN"] = tls["server_name"]
    env.update(extra or {})
    return env


def wait_pilot_agent(
    workdir: Path, status_port: int, alive: Callable[[], bool], timeout: float = 30.0
) -> None:
    """Until the agent's XDS socket exists and its status port answers HTTP (any status:
    /healthz/ready is 503 until a client connects).  RuntimeError on exit or deadline."""
    import http.client

    deadline = time.monotonic() + timeout
    sock = workdir / AGENT_XDS_SOCKET
    while True:
        if not alive():
            raise RuntimeError("pilot-agent exited while starting")
        if sock.exists():
            conn = http.client.HTTPConnection("127.0.0.1", status_port, timeout=1.0)
            try:
                conn.request("GET", "/healthz/ready")
                conn.getresponse().read()
                return
            except OSError:
                pass
            finally:
                conn.close()
        if time.monotonic() > deadline:
            state = "present" if sock.exists() else "missing"
            raise RuntimeError(f"pilot-agent not up in {timeout:.0f}s (XDS socket {state})")
        time.sleep(0.02)


# ----- entry point --------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="role", required=True)
    cp = sub.add_parser("controlplane")
    cp.add_argument("--host", default="127.0.0.1")
    cp.add_argument("--tls-dir", help="also serve TLS, with a throw-away PKI written here")
    sub.add_parser("client")
    naive = sub.add_parser("naive")
    naive.add_argument("--upstream", required=True, help="control plane HOST:PORT")
    naive.add_argument("--socket", required=True, help="Unix socket to serve on")
    naive.add_argument("--raw", action="store_true", help="no codec: the bare relay")
    forwarder = sub.add_parser("forwarder")
    forwarder.add_argument("--upstream", required=True, help="control plane HOST:PORT")
    forwarder.add_argument("--socket", required=True, help="Unix socket to serve on")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the orchestrator alone handles Ctrl-C
    mains: dict[str, Callable[[], Any]] = {
        "controlplane": lambda: run_controlplane(args.host, args.tls_dir),
        "client": run_client,
        "naive": lambda: run_naive(args.upstream, args.socket, not args.raw),
        "forwarder": lambda: run_forwarder(args.upstream, args.socket),
    }
    uvloop.run(mains[args.role]())
    return 0


if __name__ == "__main__":
    sys.exit(main())
