"""The relay's memory for one ~20 MB push: it should track the largest in-flight message.

The issue: "the relay's peak RSS tracks the largest in-flight message, not the push
rate".  Two views, both for each engine:

* ``RelayPeakMemory.peakmem_push_20mb``: asv's ``peakmem_`` is the benchmark process's
  own peak RSS (ru_maxrss, setup included; asv starts a fresh process per parameter),
  so everything runs in-process on one uvloop loop: a tiny control plane (xdsfast's
  fast HTTP/2 server, raw bytes) holding the one ~20 MB CDS response, the relay (an
  ``Agent`` built from a ``Config``, as ``xdsfast run`` does) and an Envoy-like client
  (the fast dialer) that reads it, drops it at once and ACKs.  ``direct`` is the same
  without the relay: the client and the control plane's own share (the payload held
  once, the client's one received copy, the imports).  ``grpcio``/``fast`` minus
  ``direct`` is the relay's cost, including the engine's imports (grpcio's are large).
* ``RelayBigPushRss.track_*``: the relay as its own process (``relay_bench``'s
  ``--big`` workload, peers in other processes): its peak RSS during one ~20 MB push
  over its RSS just before (the kernel's VmHWM), in MiB and per message byte.

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
            if data is None:
                raise RuntimeError("the stream ended before the push")
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


class RelayPeakMemory:
    """Peak RSS of one process: control plane + relay + client, one ~20 MB push."""

    params: ClassVar = ENGINES
    param_names: ClassVar = ["relay"]
    timeout = 120

    def setup(self, relay: str) -> None:
        self.payload = big_response()
        import xdsfast.agent  # noqa: F401  # every parameter pays the same imports

    def peakmem_push_20mb(self, relay: str) -> None:
        received = run_push(self.payload, relay)
        assert received == len(self.payload), (received, len(self.payload))


class RelayBigPushRss:
    """The relay process's peak RSS over its RSS before one ~20 MB push (relay_bench --big)."""

    params: ClassVar = ["grpcio", "fast"]
    param_names: ClassVar = ["engine"]
    timeout = 300
    ROWS: ClassVar = {"grpcio": "xdsfast", "fast": "xdsfast-fast"}

    def setup_cache(self) -> dict[str, dict[str, Any]]:
        from . import relay_bench

        settings = relay_bench.Settings(
            storm=0, small=0, big=1, delta=False, rounds=1, arrangements=tuple(self.ROWS.values())
        )
        results = relay_bench.run_bench(settings)
        return relay_bench.summarize(results, settings.arrangements)

    def track_big_push_peak_rss_over_before(self, cache: dict[str, Any], engine: str) -> float:
        return float(cache[self.ROWS[engine]]["big"]["peak_over_before"] / MIB)

    def track_big_push_peak_rss_per_message(self, cache: dict[str, Any], engine: str) -> float:
        big = cache[self.ROWS[engine]]["big"]
        return float(big["peak_over_before"] / big["message_bytes"])

    track_big_push_peak_rss_over_before.unit = "MiB"  # type: ignore[attr-defined]
    track_big_push_peak_rss_per_message.unit = "x message"  # type: ignore[attr-defined]


def _child(relay: str) -> None:
    """One parameter in this (fresh) process: print the peak RSS in MiB."""
    bench = RelayPeakMemory()
    bench.setup(relay)
    setup_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    bench.peakmem_push_20mb(relay)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{relay} {setup_peak:.1f} {peak:.1f}")


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        _child(sys.argv[2])
        return 0
    peaks: dict[str, float] = {}
    print(f"one ~{SIZE / 1e6:.0f} MB CDS push, everything in one process (peak RSS, MiB)")
    print(f"{'relay':<8}{'after setup':>13}{'peak':>8}{'over direct':>13}")
    for relay in ENGINES:
        out = subprocess.run(
            [sys.executable, __file__, "--child", relay],
            capture_output=True, text=True, check=False, timeout=300,
        )  # fmt: skip
        if out.returncode != 0:
            print(f"{relay}: failed\n{out.stderr.strip()}", file=sys.stderr)
            return 1
        _, setup_peak, peak = out.stdout.split()
        peaks[relay] = float(peak)
        over = f"{peaks[relay] - peaks['direct']:+.1f}" if relay != "direct" else "-"
        print(f"{relay:<8}{float(setup_peak):>13.1f}{float(peak):>8.1f}{over:>13}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
