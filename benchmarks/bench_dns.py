"""The DNS proxy: local-hit latency and rate over UDP on loopback, forwarding overhead,
table build time, and how long a big build holds up the event loop.

asv runs the ``time_``/``track_`` methods; ``python benchmarks/bench_dns.py`` prints
everything in one run:

* local hits: the DNS server runs alone in its own uvloop process (one thread, so one
  core), this process is the client and sends raw packets with a plain socket: one at
  a time for latency (p50/p99), then 32 in flight for queries/s; the server's CPU time
  per query comes from psutil.
* forwarding: a plain-socket upstream resolver in a third process; the same unknown
  names queried straight at it and through xdsfast, p50 of each and the difference.
* table build: ``table.build`` for NameTables of 1k and 20k Kubernetes services in 50
  namespaces (each gives 3 to 4 names and as many search-domain CNAMEs).
* loop stall: the longest an event-loop timer fired late while a 20k table was built in
  the worker thread (what the relay would feel).
* a 100k-host NameTable applied to a serving proxy, as the relay applies it (decode, ACK,
  build in the worker, swap): time to the first answer from it, the longest wait of a UDP
  query for an old name meanwhile (asked every 2 ms from another process), RSS growth.
* dnsperf (``-c 4 -q 200``, random A questions for table names) against the proxy and
  against dnsmasq serving the same names from a hosts file, one after the other, if
  Debian's ``dnsperf`` and ``dnsmasq`` are installed.

    python benchmarks/bench_dns.py [--count N] [--hosts N]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

import psutil
import uvloop
from prometheus_client import CollectorRegistry

from xdsfast import intercept, nds_pb2
from xdsfast.dns import table as table_module
from xdsfast.dns.forward import Forwarder
from xdsfast.dns.handler import Handler
from xdsfast.dns.metrics import DnsMetrics
from xdsfast.dns.names import NameRules
from xdsfast.dns.server import DnsServer
from xdsfast.dns.table import DnsTable
from xdsfast.dns.wire import encode_name

RULES = NameRules("ns-00", "", ("ns-00.svc.cluster.local", "svc.cluster.local", "cluster.local"))
LOCAL_HOSTS = 1000


def name_table(hosts: int) -> nds_pb2.NameTable:
    """``hosts`` Kubernetes services over 50 namespaces, one ClusterIP each."""
    table = nds_pb2.NameTable()
    for i in range(hosts):
        ns = f"ns-{i % 50:02d}"
        table.table[f"svc-{i:05d}.{ns}.svc.cluster.local"].CopyFrom(
            nds_pb2.NameTable.NameInfo(
                ips=[f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}"],
                registry="Kubernetes",
                shortname=f"svc-{i:05d}",
                namespace=ns,
            )
        )
    return table


def query(name: str, qid: int, qtype: int = 1) -> bytes:
    wire = encode_name(name)
    assert wire is not None
    return struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + wire + struct.pack("!HH", qtype, 1)


def local_queries(n: int = 256) -> list[bytes]:
    names = [f"svc-{i:05d}.ns-{i % 50:02d}.svc.cluster.local." for i in range(0, LOCAL_HOSTS, 7)]
    return [query(names[i % len(names)], i) for i in range(n)]


def unknown_queries(n: int = 256) -> list[bytes]:
    return [query(f"ext-{i}.example.com.", i) for i in range(n)]


# -- peer processes ---------------------------------------------------------------------------


def _serve_dns(upstream_port: int, hosts: int = LOCAL_HOSTS) -> None:
    """The DNS server, alone in this process: prints its port, serves until stdin closes."""

    async def run() -> None:
        table = DnsTable(RULES)
        table.update(name_table(hosts), "1")
        await table.wait_updates(1, timeout=120)
        metrics = DnsMetrics(CollectorRegistry())
        forwarder = Forwarder([("127.0.0.1", upstream_port)], metrics, timeout=2.0)
        server = DnsServer(Handler(table, metrics), forwarder)
        await server.start(["127.0.0.1"], 0)
        print(server.port, flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        await server.stop()
        table.close()

    uvloop.run(run())


def _serve_upstream() -> None:
    """A minimal resolver: every query gets one A record, straight from a plain socket."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    print(sock.getsockname()[1], flush=True)
    record = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 60, 4) + bytes([192, 0, 2, 1])
    while True:
        data, addr = sock.recvfrom(65535)
        if data == b"stop":
            return
        reply = data[:2] + b"\x81\x80" + data[4:6] + b"\x00\x01\x00\x00\x00\x00" + data[12:]
        sock.sendto(reply + record, addr)


def _spawn(*role: str) -> tuple[subprocess.Popen[str], int]:
    """This file run as a peer (``--serve-dns PORT`` or ``--serve-upstream``), and its port."""
    proc = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), *role],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.strip().isdigit():
        proc.kill()
        raise RuntimeError(f"peer {role} did not start")
    return proc, int(line)


@contextmanager
def peers() -> Iterator[tuple[int, int, psutil.Process]]:
    """(DNS server port, upstream port, the server's process)."""
    upstream, upstream_port = _spawn("--serve-upstream")
    server: subprocess.Popen[str] | None = None
    try:
        server, port = _spawn("--serve-dns", str(upstream_port))
        yield port, upstream_port, psutil.Process(server.pid)
    finally:
        if server is not None:
            assert server.stdin is not None
            server.stdin.close()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(b"stop", ("127.0.0.1", upstream_port))
        for proc in (server, upstream):
            if proc is None:
                continue
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# -- client measurements ------------------------------------------------------------------------


def _client(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.connect(("127.0.0.1", port))
    sock.settimeout(2.0)
    return sock


def latencies(port: int, queries: list[bytes], count: int) -> list[float]:
    """Seconds per query, one query in flight at a time."""
    out = []
    with _client(port) as sock:
        for q in queries[:200]:  # warm-up
            sock.send(q)
            sock.recv(65535)
        clock = time.perf_counter
        for i in range(count):
            q = queries[i % len(queries)]
            start = clock()
            sock.send(q)
            reply = sock.recv(65535)
            out.append(clock() - start)
            assert reply[:2] == q[:2]
    return out


def rate(port: int, queries: list[bytes], total: int, window: int = 32) -> tuple[float, int]:
    """(queries/s with ``window`` in flight, lost replies)."""
    with _client(port) as sock:
        sent = received = 0
        start = time.perf_counter()
        for _ in range(window):
            sock.send(queries[sent % len(queries)])
            sent += 1
        while received < total:
            try:
                sock.recv(65535)
            except TimeoutError:
                break
            received += 1
            if sent < total:
                sock.send(queries[sent % len(queries)])
                sent += 1
        elapsed = time.perf_counter() - start
    return received / elapsed, sent - received


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def loopback(count: int) -> dict[str, float]:
    """Every loopback number in one pass over fresh peer processes."""
    local, unknown = local_queries(), unknown_queries()
    with peers() as (port, upstream_port, server):
        hit = latencies(port, local, count)
        cpu_before = sum(server.cpu_times()[:2])
        qps, lost = rate(port, local, count * 5)
        cpu = sum(server.cpu_times()[:2]) - cpu_before
        direct = latencies(upstream_port, unknown, count // 2)
        forwarded = latencies(port, unknown, count // 2)
    return {
        "hit_p50_us": percentile(hit, 50) * 1e6,
        "hit_p99_us": percentile(hit, 99) * 1e6,
        "hit_qps": qps,
        "hit_lost": lost,
        "server_cpu_us_per_query": cpu / (count * 5) * 1e6,
        "direct_p50_us": percentile(direct, 50) * 1e6,
        "forwarded_p50_us": percentile(forwarded, 50) * 1e6,
        "forwarded_p99_us": percentile(forwarded, 99) * 1e6,
        "forward_overhead_p50_us": (percentile(forwarded, 50) - percentile(direct, 50)) * 1e6,
    }


def build_seconds(hosts: int, repeat: int = 3) -> tuple[float, int]:
    """(best build time, names) for a table of ``hosts`` services."""
    table = name_table(hosts)
    best, answers = float("inf"), 0
    for _ in range(repeat):
        start = time.perf_counter()
        built = table_module.build(table, RULES)
        best = min(best, time.perf_counter() - start)
        answers = built.names
    return best, answers


def loop_stall_during_build(hosts: int = 20000) -> tuple[float, float]:
    """(build seconds, the longest a 1 ms timer fired late meanwhile), on uvloop."""

    async def run() -> tuple[float, float]:
        table = DnsTable(RULES)
        name = name_table(hosts)
        loop = asyncio.get_running_loop()
        worst = 0.0
        done = asyncio.Event()

        async def ticker() -> None:
            nonlocal worst
            while not done.is_set():
                start = loop.time()
                await asyncio.sleep(0.001)
                worst = max(worst, loop.time() - start - 0.001)

        tick = asyncio.ensure_future(ticker())
        await asyncio.sleep(0.01)
        table.update(name, "1")
        await table.wait_updates(1, timeout=300)
        done.set()
        await tick
        table.close()
        return table.build_seconds, worst

    return uvloop.run(run())


_STALL_CLIENT = r"""
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.connect(("127.0.0.1", int(sys.argv[1])))
s.settimeout(5)
q = bytes.fromhex(sys.argv[2])
worst = 0.0
print("go", flush=True)
end = time.monotonic() + float(sys.argv[3])
while time.monotonic() < end:
    t = time.perf_counter(); s.send(q); s.recv(4096); worst = max(worst, time.perf_counter() - t)
    time.sleep(0.002)
print(worst, flush=True)
"""


def apply_big_table(hosts: int = 100_000) -> dict[str, float]:
    """A ``hosts`` NameTable applied through the NameTable interceptor to a serving proxy
    that has a tiny one: seconds to the first answer from it, the longest UDP wait of an
    old name meanwhile, RSS growth (MiB), build seconds, decode seconds (on the loop)."""
    big = name_table(hosts).SerializeToString()
    tiny = name_table(10).SerializeToString()
    proc = psutil.Process()

    async def run() -> dict[str, float]:
        table = DnsTable(RULES)
        interceptor = intercept.NameTableInterceptor(table)
        interceptor.apply(tiny, "0")
        await table.wait_updates(1, 60)
        metrics = DnsMetrics(CollectorRegistry())
        server = DnsServer(Handler(table, metrics), Forwarder([], metrics))
        await server.start(["127.0.0.1"], 0)
        old = query("svc-00001.ns-01.svc.cluster.local.", 7)
        last = hosts - 1
        new = query(f"svc-{last:05d}.ns-{last % 50:02d}.svc.cluster.local.", 8)
        client = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _STALL_CLIENT, str(server.port), old.hex(), "4",
            stdout=subprocess.PIPE,
        )  # fmt: skip
        assert client.stdout is not None
        await client.stdout.readline()
        await asyncio.sleep(0.3)
        rss = proc.memory_info().rss
        start = time.perf_counter()
        interceptor.apply(big, "1")
        decode = time.perf_counter() - start
        while server.handler.fast(new) is None:
            await asyncio.sleep(0.0005)
        first = time.perf_counter() - start
        await asyncio.sleep(0.3)
        grown = proc.memory_info().rss - rss
        worst = float((await client.stdout.readline()).decode())
        await client.wait()
        await server.stop()
        table.close()
        return {
            "apply_s": first,
            "stall_s": worst,
            "rss_growth_mib": grown / 2**20,
            "build_s": table.build_seconds,
            "decode_s": decode,
        }

    return uvloop.run(run())


def _dnsperf(port: int, names_file: str, seconds: int) -> float:
    out = subprocess.run(
        ["dnsperf", "-s", "127.0.0.1", "-p", str(port), "-d", names_file, "-c", "4",
         "-q", "200", "-l", str(seconds)],
        capture_output=True, text=True, timeout=seconds + 30, check=True,
    ).stdout  # fmt: skip
    for line in out.splitlines():
        if "Queries per second" in line:
            return float(line.split(":")[1])
    raise RuntimeError(f"no rate in dnsperf's output: {out[-300:]}")


def dnsperf_against_dnsmasq(hosts: int, seconds: int = 5) -> dict[str, float] | None:
    """Queries/s (and the proxy's CPU µs per query) for dnsperf against the proxy, then
    against dnsmasq with the same names in a hosts file; None without the tools."""
    dnsmasq = shutil.which("dnsmasq") or (
        "/usr/sbin/dnsmasq" if os.path.exists("/usr/sbin/dnsmasq") else None
    )
    if shutil.which("dnsperf") is None or dnsmasq is None:
        return None
    import random

    rng = random.Random(1)
    with tempfile.TemporaryDirectory() as tmp:
        names = os.path.join(tmp, "queries")
        with open(names, "w") as f:
            for _ in range(50_000):
                i = rng.randrange(hosts)
                f.write(f"svc-{i:05d}.ns-{i % 50:02d}.svc.cluster.local A\n")
        hosts_file = os.path.join(tmp, "hosts")
        with open(hosts_file, "w") as f:
            for i in range(hosts):
                f.write(f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255} "
                        f"svc-{i:05d}.ns-{i % 50:02d}.svc.cluster.local\n")  # fmt: skip
        result: dict[str, float] = {}
        upstream, upstream_port = _spawn("--serve-upstream")
        server, port = _spawn("--serve-dns", str(upstream_port), "--hosts", str(hosts))
        try:
            cpu = psutil.Process(server.pid)
            before = sum(cpu.cpu_times()[:2])
            result["xdsfast_qps"] = _dnsperf(port, names, seconds)
            used = sum(cpu.cpu_times()[:2]) - before
            result["xdsfast_cpu_us_per_query"] = used / (result["xdsfast_qps"] * seconds) * 1e6
        finally:
            assert server.stdin is not None
            server.stdin.close()
            server.wait(30)
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.sendto(b"stop", ("127.0.0.1", upstream_port))
            upstream.wait(10)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.bind(("127.0.0.1", 0))
            masq_port = probe.getsockname()[1]
        masq = subprocess.Popen(
            [dnsmasq, "-k", "--no-resolv", "--no-hosts", f"--addn-hosts={hosts_file}",
             "--listen-address=127.0.0.1", "--bind-interfaces", f"--port={masq_port}",
             "--user=root", "--pid-file=", "--log-facility=/dev/null"],
        )  # fmt: skip
        try:
            probe_query = query("svc-00001.ns-01.svc.cluster.local.", 1)
            with _client(masq_port) as sock:
                deadline = time.monotonic() + 60  # reads the hosts file first
                while True:
                    sock.send(probe_query)
                    try:
                        sock.recv(512)
                        break
                    except OSError:
                        if time.monotonic() > deadline:
                            raise
            cpu = psutil.Process(masq.pid)
            before = sum(cpu.cpu_times()[:2])
            result["dnsmasq_qps"] = _dnsperf(masq_port, names, seconds)
            used = sum(cpu.cpu_times()[:2]) - before
            result["dnsmasq_cpu_us_per_query"] = used / (result["dnsmasq_qps"] * seconds) * 1e6
        finally:
            masq.terminate()
            masq.wait(10)
    return result


# -- asv ------------------------------------------------------------------------------------------


class TableBuild:
    params: ClassVar = [1000, 20000]
    param_names: ClassVar = ["hosts"]
    timeout = 600

    def setup(self, hosts: int) -> None:
        self.table = name_table(hosts)

    def time_build(self, hosts: int) -> None:
        table_module.build(self.table, RULES)


class HandlerPaths:
    """One query through the handler, in process (no sockets)."""

    def setup(self) -> None:
        table = DnsTable(RULES)
        table.update(name_table(LOCAL_HOSTS), "1")  # no event loop: built right here
        self.handler = Handler(table, DnsMetrics(CollectorRegistry()))
        self.hit = local_queries(1)[0]
        self.unknown = unknown_queries(1)[0]

    def time_fast_path_hit(self) -> None:
        self.handler.fast(self.hit)

    def time_slow_path_unknown(self) -> None:
        self.handler.slow(self.unknown, False)


class Loopback:
    timeout = 300

    def setup_cache(self) -> dict[str, float]:
        return loopback(3000)

    def track_local_hit_p50_us(self, cache: dict[str, float]) -> float:
        return cache["hit_p50_us"]

    def track_local_hit_p99_us(self, cache: dict[str, float]) -> float:
        return cache["hit_p99_us"]

    def track_local_hit_qps(self, cache: dict[str, float]) -> float:
        return cache["hit_qps"]

    def track_forward_overhead_p50_us(self, cache: dict[str, float]) -> float:
        return cache["forward_overhead_p50_us"]

    track_local_hit_p50_us.unit = "us"  # type: ignore[attr-defined]
    track_local_hit_p99_us.unit = "us"  # type: ignore[attr-defined]
    track_local_hit_qps.unit = "queries/s"  # type: ignore[attr-defined]
    track_forward_overhead_p50_us.unit = "us"  # type: ignore[attr-defined]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=20000, help="latency samples (hits)")
    parser.add_argument("--hosts", type=int, default=100_000, help="big-table hosts")
    parser.add_argument("--serve-dns", type=int, metavar="UPSTREAM_PORT", help=argparse.SUPPRESS)
    parser.add_argument("--serve-upstream", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_dns:
        _serve_dns(args.serve_dns, args.hosts if "--hosts" in sys.argv else LOCAL_HOSTS)
        return
    if args.serve_upstream:
        _serve_upstream()
        return
    print(f"machine: {os.cpu_count()} CPUs, python {sys.version.split()[0]}")
    r: dict[str, Any] = loopback(args.count)
    print(f"\nlocal hit over UDP loopback ({args.count} queries one at a time, 1k-host table):")
    print(f"  p50 {r['hit_p50_us']:.1f} µs   p99 {r['hit_p99_us']:.1f} µs")
    print(
        f"  {r['hit_qps']:,.0f} queries/s with 32 in flight ({r['hit_lost']} lost); "
        f"server CPU {r['server_cpu_us_per_query']:.1f} µs/query "
        f"(= {1e6 / r['server_cpu_us_per_query']:,.0f} queries/s per core)"
    )
    print("\nforwarded (unknown names, plain-socket upstream in its own process):")
    print(
        f"  direct to upstream p50 {r['direct_p50_us']:.1f} µs; through xdsfast p50 "
        f"{r['forwarded_p50_us']:.1f} µs, p99 {r['forwarded_p99_us']:.1f} µs; "
        f"overhead p50 {r['forward_overhead_p50_us']:.1f} µs"
    )
    print("\ntable build (table.build, best of 3):")
    for hosts in (1000, 20000):
        seconds, answers = build_seconds(hosts)
        print(f"  {hosts:>6} hosts: {seconds * 1000:8.1f} ms  ({answers:,} names)")
    seconds, stall = loop_stall_during_build()
    print(
        f"\n20k build in the worker thread: {seconds * 1000:.0f} ms; longest event-loop "
        f"timer delay meanwhile {stall * 1000:.1f} ms"
    )
    big = apply_big_table(args.hosts)
    print(
        f"\n{args.hosts:,}-host NameTable applied to a serving proxy: first answer after "
        f"{big['apply_s'] * 1000:.0f} ms (decode on the loop {big['decode_s'] * 1000:.0f} ms, "
        f"build {big['build_s'] * 1000:.0f} ms); longest UDP wait for an old name "
        f"{big['stall_s'] * 1000:.1f} ms; RSS +{big['rss_growth_mib']:.0f} MiB"
    )
    perf = dnsperf_against_dnsmasq(args.hosts)
    if perf is None:
        print("\ndnsperf: not run (needs Debian's dnsperf and dnsmasq-base)")
    else:
        print(
            f"\ndnsperf -c 4 -q 200, {args.hosts:,} names: xdsfast {perf['xdsfast_qps']:,.0f} q/s "
            f"({perf['xdsfast_cpu_us_per_query']:.1f} µs CPU/query), dnsmasq "
            f"{perf['dnsmasq_qps']:,.0f} q/s ({perf['dnsmasq_cpu_us_per_query']:.1f} µs "
            f"CPU/query): {perf['xdsfast_qps'] / perf['dnsmasq_qps']:.2f}x"
        )


if __name__ == "__main__":
    main()
