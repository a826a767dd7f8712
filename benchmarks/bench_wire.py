"""The wire peeker: compiled vs twin vs a full protobuf decode.

asv runs the ``time_`` methods; ``python benchmarks/bench_wire.py`` prints the
same comparison side by side in one run (ratios are what to read on a noisy
shared machine).
"""

from __future__ import annotations

import importlib
import timeit
from collections.abc import Callable
from typing import Any, ClassVar

from envoy.service.discovery.v3 import discovery_pb2 as pb

from xdsfast.peers import mesh

CDS = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
EDS = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"


def payloads() -> dict[str, bytes]:
    """A ~5 MB CDS push of 4000 Istio-like clusters and a ~230-byte EDS update."""
    clusters = mesh.big_cds(4000)
    big = pb.DiscoveryResponse(version_info="2026-11-27T04:00:00Z/1", type_url=CDS, nonce="n1")
    for cluster in clusters.values():
        big.resources.add().Pack(cluster)
    small = pb.DiscoveryResponse(version_info="2026-11-27T04:00:00Z/2", type_url=EDS, nonce="n2")
    small.resources.add().Pack(mesh.small_eds(7))
    return {"cds_5mb": big.SerializeToString(), "eds_small": small.SerializeToString()}


def peeker(impl: str) -> Callable[[bytes], Any]:
    if impl == "protobuf":
        return lambda data: pb.DiscoveryResponse.FromString(data).type_url
    module = importlib.import_module("xdsfast._core" if impl == "cython" else "xdsfast._core_py")
    fn: Callable[[bytes], Any] = module.peek_response
    return fn


class PeekResponse:
    params: ClassVar = (["cython", "python", "protobuf"], ["cds_5mb", "eds_small"])
    param_names: ClassVar = ["impl", "payload"]

    def setup_cache(self) -> dict[str, bytes]:
        return payloads()

    def setup(self, cache: dict[str, bytes], impl: str, payload: str) -> None:
        self.data = cache[payload]
        self.peek = peeker(impl)

    def time_peek_response(self, cache: dict[str, bytes], impl: str, payload: str) -> None:
        self.peek(self.data)

    def track_payload_bytes(self, cache: dict[str, bytes], impl: str, payload: str) -> int:
        return len(cache[payload])

    track_payload_bytes.unit = "bytes"  # type: ignore[attr-defined]


def _per_call(fn: Callable[[bytes], Any], data: bytes) -> float:
    """Best of 7 runs, seconds per call."""
    number = max(1, int(0.05 / max(timeit.timeit(lambda: fn(data), number=1), 1e-7)))
    return min(timeit.repeat(lambda: fn(data), number=number, repeat=7)) / number


def main() -> None:
    data = payloads()
    columns = " ".join(f"{impl:>10}" for impl in ("cython", "python", "protobuf"))
    print(f"{'payload':<10} {'bytes':>9} {'resources':>9}  {columns}")
    for name, raw in data.items():
        count = peeker("cython")(raw).resource_count
        times = {impl: _per_call(peeker(impl), raw) for impl in ("cython", "python", "protobuf")}
        cells = " ".join(f"{times[i] * 1e6:>8.2f}µs" for i in ("cython", "python", "protobuf"))
        print(f"{name:<10} {len(raw):>9} {count:>9}  {cells}")
        print(
            f"{'':<31} protobuf/cython = {times['protobuf'] / times['cython']:.0f}x, "
            f"python/cython = {times['python'] / times['cython']:.0f}x"
        )


# -- the streaming peeker: a push fed as HTTP/2 DATA frames deliver it ----------------------

CHUNK = 16384  # HTTP/2's default largest frame payload


def stream_peeker(impl: str) -> Callable[[bytes], Any]:
    """Peek a response fed in CHUNK-byte memoryview slices, as the relay would."""
    module = importlib.import_module("xdsfast._core" if impl == "cython" else "xdsfast._core_py")
    scanner_class = module.ResponseScanner

    def peek(data: bytes) -> Any:
        view = memoryview(data)
        scanner = scanner_class(False, len(data))
        for start in range(0, len(data), CHUNK):
            scanner.feed(view[start : start + CHUNK])
        return scanner.finish()

    return peek


class StreamPeekResponse:
    """The 5 MB CDS push: streamed in 16 KiB chunks vs ``peek_response`` on the whole."""

    params: ClassVar = (["cython", "python"], ["whole", "stream_16k"])
    param_names: ClassVar = ["impl", "mode"]

    def setup_cache(self) -> bytes:
        return payloads()["cds_5mb"]

    def setup(self, cache: bytes, impl: str, mode: str) -> None:
        self.data = cache
        self.peek = peeker(impl) if mode == "whole" else stream_peeker(impl)

    def time_peek_cds_5mb(self, cache: bytes, impl: str, mode: str) -> None:
        self.peek(self.data)


def main_stream() -> None:
    """The streaming peek of the 5 MB push next to the whole-message peek."""
    raw = payloads()["cds_5mb"]
    print(f"\ncds_5mb fed in {CHUNK}-byte chunks ({-(-len(raw) // CHUNK)} feeds):")
    for impl in ("cython", "python"):
        whole = _per_call(peeker(impl), raw)
        stream = _per_call(stream_peeker(impl), raw)
        assert repr(stream_peeker(impl)(raw)) == repr(peeker(impl)(raw))
        print(
            f"{impl:<7} whole {whole * 1e6:>9.2f}µs  streamed {stream * 1e6:>9.2f}µs  "
            f"streamed/whole = {stream / whole:.2f}x  ({len(raw) / stream / 1e9:.1f} GB/s)"
        )


if __name__ == "__main__":
    main()
    main_stream()
