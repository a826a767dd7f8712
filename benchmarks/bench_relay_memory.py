"""The relay's memory for one big push: a relay that holds each push whole grows with it;
the fast engine, which writes a big response to Envoy as it arrives (cut-through),
should not.  Two views, both for each engine:

* ``RelayPeakMemory.peakmem_push_20mb`` and ``RelayPeakMemoryHuge.peakmem_push_200mb``:
  asv's ``peakmem_`` is the benchmark process's own peak RSS (ru_maxrss, setup
  included; asv starts a fresh process per parameter), so everything runs in-process
  on one uvloop loop: a tiny control plane (xdsfast's fast HTTP/2 server, raw bytes)
  holding the one ~20 MB (~200 MB) CDS response, the relay (an ``Agent`` built from a
  ``Config``, as ``xdsfast run`` does) and an Envoy-like client (the fast dialer) that
  reads it, drops it at once and ACKs.  ``direct`` is the same without the relay: the
  client and the control plane's own share (the payload held once, the client's one
  received copy, the imports).  ``grpcio``/``fast`` minus ``direct`` is the relay's
  cost, including the engine's imports (grpcio's are large).
* ``RelayBigPushRss.track_*``: the relay as its own process (``relay_bench --big 1``,
  peers in other processes): its peak RSS during one 40 MB and one 200 MB push over
  its idle RSS just before (the kernel's VmHWM), in MiB and per message byte.

Run just these: ``asv run --python=same --quick -b bench_relay_memory``; or
``python benchmarks/bench_relay_memory.py`` for the in-process numbers side by side
(each in a fresh process, as asv does).
"""

from __future__ import annotations

import contextlib
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, ClassVar

CDS = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
SIZE = 20_000_000
HUGE_SIZE = 200_000_000  # relay_bench's HUGE_PUSH_BYTES
DISTINCT_CLUSTERS = 256  # repeated to SIZE: cheap to build, one allocation
ENGINES = ["direct", "grpcio", "fast"]
MIB = 1024 * 1024


def big_response(size: int = SIZE) -> bytes:
    """A SotW CDS response of about ``size`` bytes, built without holding a second copy.

    256 Istio-like clusters serialized once and repeated (resources is a repeated field,
    so the repetition is one valid response), then version and nonce.  ``b"".join`` of
    a list of references makes the one ``size``-byte allocation.
    """
    from envoy.service.discovery.v3 import discovery_pb2 as pb

    from xdsfast.peers import mesh

    response = pb.DiscoveryResponse()
    for cluster in mesh.big_cds(DISTINCT_CLUSTERS).values():
        response.resources.add().Pack(cluster)
    chunk = response.SerializeToString()
    tail = pb.DiscoveryResponse(type_url=CDS, version_info="v1", nonce="n1").SerializeToString()
    return b"".join([chunk] * max(1, round(size / len(chunk))) + [tail])


def _initial_request() -> bytes:
    from envoy.config.core.v3 import base_pb2
    from envoy.service.discovery.v3 import discovery_pb2 as pb

    node = base_pb2.Node(id="sidecar~10.0.0.7~bench.bench~bench.svc.cluster.local")
    return bytes(pb.DiscoveryRequest(node=node, type_url=CDS).SerializeToString())


def _ack(data: bytes) -> bytes:
    from envoy.service.discovery.v3 import discovery_pb2 as pb

    from xdsfast import wire

    peek = wire.peek_response(data)
    request = pb.DiscoveryRequest(
        version_info=peek.version_info, type_url=CDS, response_nonce=peek.nonce
    )
    return bytes(request.SerializeToString())


async def push_once(payload: bytes, relay: str, workdir: Path) -> int:
    """One stream: the control plane sends ``payload``; the client reads it (through the
    relay unless ``relay == "direct"``) and ACKs.  Returns the size the client read."""
    from xdsfast.agent import Agent
    from xdsfast.config import Config
    from xdsfast.engines import OK, DialSettings, Downstream, Mode, Status, StreamError
    from xdsfast.engines.fast import FastDialer, FastServer

    async def serve(down: Downstream, mode: Mode) -> Status:
        with contextlib.suppress(StreamError):
            if await down.recv() is None:  # Envoy's first request
                return OK
            await down.send(payload)  # the one copy the control plane holds
            while await down.recv() is not None:  # the ACK, then the half-close
                pass
        return OK

    control_plane = FastServer(serve)
    await control_plane.start(None, "127.0.0.1:0")
    agent: Agent | None = None
    try:
        target = f"127.0.0.1:{control_plane.tcp_port}"
        if relay != "direct":
            socket = workdir / "XDS"
            config = Config(
                discovery_address=target,
                plaintext=True,
                xds_socket=str(socket),
                status_address="127.0.0.1:0",
                engine=relay,
                token_path=str(workdir / "no-token"),
                wasm_cache_dir=str(workdir / "wasm"),
            )
            agent = Agent(config)
            await agent.start()
            target = f"unix:{socket}"
        client = await FastDialer(DialSettings(target)).open(Mode.SOTW, ())
        try:
            await client.send(_initial_request())
            data = await client.recv()
            if not isinstance(data, bytes):  # a client never asks for cut-through
                raise RuntimeError(f"the stream ended before the push ({data!r})")
            size = len(data)
            ack = _ack(data)
            del data  # Envoy would decode it; here it is dropped at once
            await client.send(ack)
            await client.half_close()
            with contextlib.suppress(StreamError):
                while await client.recv() is not None:
                    pass
        finally:
            await client.close()
    finally:
        if agent is not None:
            await agent.stop(grace=1.0)
        await control_plane.stop(grace=1.0)
    return size


def run_push(payload: bytes, relay: str) -> int:
    import uvloop

    workdir = Path(tempfile.mkdtemp(prefix="xfmem", dir="/tmp"))  # short: a Unix socket
    try:
        return uvloop.run(push_once(payload, relay, workdir))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


class _OnePush:
    """One push of ``size`` bytes in one process (no benchmark of its own)."""

    params: ClassVar = ENGINES
    param_names: ClassVar = ["relay"]
    size = SIZE

    def setup(self, relay: str) -> None:
        self.payload = big_response(self.size)
        import xdsfast.agent  # noqa: F401  # every parameter pays the same imports

    def push(self, relay: str) -> None:
        received = run_push(self.payload, relay)
        assert received == len(self.payload), (received, len(self.payload))


class RelayPeakMemory(_OnePush):
    """Peak RSS of one process: control plane + relay + client, one ~20 MB push."""

    timeout = 120

    def peakmem_push_20mb(self, relay: str) -> None:
        self.push(relay)


class RelayPeakMemoryHuge(_OnePush):
    """The same with one ~200 MB push: the control plane's payload and the client's copy
    make 400 MB of ``direct``; a relay that holds the push whole adds 200 MB or more,
    one that writes it on as it arrives (fast) a few MB."""

    timeout = 300
    size = HUGE_SIZE

    def peakmem_push_200mb(self, relay: str) -> None:
        self.push(relay)


class RelayBigPushRss:
    """The relay process's peak RSS over idle during one big push (relay_bench --big 1):
    one 40 MB and one 200 MB, each after a VmHWM reset."""

    params: ClassVar = (["grpcio", "fast"], ["40MB", "200MB"])
    param_names: ClassVar = ["engine", "push"]
    timeout = 600
    ROWS: ClassVar = {"grpcio": "xdsfast", "fast": "xdsfast-fast"}
    WORKLOAD: ClassVar = {"40MB": "peak_big", "200MB": "peak_huge"}

    def setup_cache(self) -> dict[str, dict[str, Any]]:
        from . import relay_bench

        settings = relay_bench.Settings(
            storm=0, small=0, burst=0, big=1, delta=False, rounds=1,
            arrangements=tuple(self.ROWS.values()),
        )  # fmt: skip
        results = relay_bench.run_bench(settings)
        return relay_bench.summarize(results, settings.arrangements)

    def _push(self, cache: dict[str, Any], engine: str, push: str) -> dict[str, Any]:
        agg: dict[str, Any] = cache[self.ROWS[engine]][self.WORKLOAD[push]]
        return agg

    def track_peak_rss_over_idle(self, cache: dict[str, Any], engine: str, push: str) -> float:
        return float(self._push(cache, engine, push)["peak_over_before"] / MIB)

    def track_peak_rss_per_message(self, cache: dict[str, Any], engine: str, push: str) -> float:
        agg = self._push(cache, engine, push)
        return float(agg["peak_over_before"] / agg["message_bytes"])

    track_peak_rss_over_idle.unit = "MiB"  # type: ignore[attr-defined]
    track_peak_rss_per_message.unit = "x message"  # type: ignore[attr-defined]


def _child(relay: str, size: int) -> None:
    """One parameter in this (fresh) process, as asv runs it: print the peak RSS in MiB."""
    bench = RelayPeakMemoryHuge() if size == HUGE_SIZE else RelayPeakMemory()
    bench.setup(relay)
    setup_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    bench.push(relay)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{relay} {setup_peak:.1f} {peak:.1f}")


def main() -> int:
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        _child(sys.argv[2], int(sys.argv[3]))
        return 0
    for size in (SIZE, HUGE_SIZE):
        peaks: dict[str, float] = {}
        print(f"one ~{size / 1e6:.0f} MB CDS push, everything in one process (peak RSS, MiB)")
        print(f"{'relay':<8}{'after setup':>13}{'peak':>8}{'over direct':>13}")
        for relay in ENGINES:
            out = subprocess.run(
                [sys.executable, __file__, "--child", relay, str(size)],
                capture_output=True, text=True, check=False, timeout=600,
            )  # fmt: skip
            if out.returncode != 0:
                print(f"{relay}: failed\n{out.stderr.strip()}", file=sys.stderr)
                return 1
            _, setup_peak, peak = out.stdout.split()
            peaks[relay] = float(peak)
            over = f"{peaks[relay] - peaks['direct']:+.1f}" if relay != "direct" else "-"
            print(f"{relay:<8}{float(setup_peak):>13.1f}{float(peak):>8.1f}{over:>13}")
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
