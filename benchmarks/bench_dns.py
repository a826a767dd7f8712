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
* side by side under Debian's ``dnsperf`` (``-c 4 -q 200``, random A questions for table
  names), one server at a time, at NameTables of 1k, 10k and 100k hosts: ``xdsfast run
  --dns`` and the stock pilot-agent's DNS proxy (both full agents, fed the NameTable by a
  control plane stand-in after an LDS request, as istiod does), and ``dnsmasq`` serving
  the same names from a hosts file: q/s, average and p99 latency, lost queries, server CPU
  per query, RSS, and the time from the NameTable request to the first answer from it.
  Needs ``dnsperf`` (dnsmasq's row: ``dnsmasq-base``; the agent's: Go, for
  ``scripts/build-istio-peers``); rows without their tool are skipped with a message.

    python benchmarks/bench_dns.py [--count N] [--hosts N] [--only-dnsperf]
                                   [--dnsperf-hosts 1000,10000,100000] [--dnsperf-seconds S]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
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
from pathlib import Path
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


# -- side by side under dnsperf: xdsfast, the stock pilot-agent, dnsmasq -----------------------

SIDE_BY_SIDE = ("xdsfast", "istio-agent", "dnsmasq")
DNSPERF_LOAD = ("-c", "4", "-q", "200", "-t", "1")  # 4 sockets, 200 in flight, 1 s timeout
QUERY_LINES = 50_000


def _peers_module() -> Any:
    """``_relay_peers`` (the pilot-agent helpers shared with relay_bench), loaded by path:
    this file runs as a script and as ``benchmarks.bench_dns`` under asv."""
    import importlib.util

    module = sys.modules.get("_relay_peers")
    if module is None:
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_relay_peers.py")
        spec = importlib.util.spec_from_file_location("_relay_peers", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["_relay_peers"] = module
        spec.loader.exec_module(module)
    return module


def table_host(i: int) -> tuple[str, str]:
    """(FQDN, IP) of the ``i``-th service of :func:`name_table`."""
    return (
        f"svc-{i:05d}.ns-{i % 50:02d}.svc.cluster.local",
        f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}",
    )


def dnsperf_tools() -> tuple[str | None, str | None]:
    """(dnsperf, dnsmasq) paths; None for one not installed (Debian's dnsperf, dnsmasq-base)."""
    dnsmasq = shutil.which("dnsmasq") or (
        "/usr/sbin/dnsmasq" if os.path.exists("/usr/sbin/dnsmasq") else None
    )
    return shutil.which("dnsperf"), dnsmasq


def _free_dns_port() -> int:
    """A port free on 127.0.0.1 for both UDP and TCP (both agents serve both)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind(("127.0.0.1", 0))
            port: int = tcp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind(("127.0.0.1", port))
                except OSError:
                    continue
            return port


def parse_dnsperf(out: str) -> dict[str, float]:
    """dnsperf's statistics: q/s, sent, completed, lost, average latency (s); with ``-v``,
    also the p50/p99 of the per-query latencies it printed."""
    stats: dict[str, float] = {}
    keys = {
        "Queries sent:": "sent", "Queries completed:": "completed", "Queries lost:": "lost",
        "Queries per second:": "qps", "Average Latency (s):": "avg_s",
    }  # fmt: skip
    latencies: list[float] = []
    for line in out.splitlines():
        text = line.strip()
        if text.startswith("> "):  # -v: "> NOERROR name A 0.000123"
            parts = text.split()
            with contextlib.suppress(ValueError, IndexError):
                latencies.append(float(parts[-1]))
            continue
        for prefix, key in keys.items():
            if text.startswith(prefix):
                stats[key] = float(text[len(prefix) :].split()[0])
    if "qps" not in stats:
        raise RuntimeError(f"no statistics in dnsperf's output: {out[-300:]!r}")
    if latencies:
        stats["p50_s"] = percentile(latencies, 50)
        stats["p99_s"] = percentile(latencies, 99)
    return stats


async def _dnsperf(
    port: int, names_file: str, seconds: float, *, verbose: bool = False
) -> dict[str, float]:
    argv = ["dnsperf", "-s", "127.0.0.1", "-p", str(port), "-d", names_file, *DNSPERF_LOAD,
            "-l", str(seconds), *(["-v"] if verbose else [])]  # fmt: skip
    # subprocess in a thread, not the loop's spawn: uvloop's fork in this process (gRPC's
    # threads running) has been seen to crash the child before its exec (SIGSEGV).
    try:
        done = await asyncio.to_thread(
            subprocess.run, argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, timeout=seconds + 60, check=False,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"dnsperf ran over {seconds + 60:.0f}s") from None
    out: bytes = done.stdout
    if done.returncode != 0:
        raise RuntimeError(f"dnsperf exited {done.returncode}: {out.decode()[-300:]!r}")
    return parse_dnsperf(out.decode(errors="replace"))


def _answers(port: int, packet: bytes, timeout: float) -> bool:
    """Whether ``packet`` gets a NOERROR reply with at least one answer."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.sendto(packet, ("127.0.0.1", port))
            reply = sock.recv(4096)
        except OSError:
            return False
    return len(reply) >= 12 and reply[3] & 0x0F == 0 and struct.unpack("!H", reply[6:8])[0] > 0


def _wait_ready(status_port: int, deadline: float) -> None:
    """Until pilot-agent's /healthz/ready says 200 (with DNS on: a NameTable applied)."""
    import http.client

    while time.monotonic() < deadline:
        conn = http.client.HTTPConnection("127.0.0.1", status_port, timeout=1.0)
        try:
            conn.request("GET", "/healthz/ready")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        finally:
            conn.close()
        time.sleep(0.005)
    raise RuntimeError("pilot-agent not ready (no NameTable applied) before the deadline")


def _first_answer(port: int, packet: bytes, deadline: float, alive: Any) -> float:
    """Ask every millisecond or so; the monotonic time of the first answer."""
    while time.monotonic() < deadline:
        if _answers(port, packet, 0.05):
            return time.monotonic()
        if not alive():
            raise RuntimeError("the DNS server exited before answering")
        time.sleep(0.001)
    raise RuntimeError("no answer from the NameTable before the deadline")


class _Server:
    """One DNS server under test: its process, port, and how to stop it."""

    def __init__(self, name: str, proc: subprocess.Popen[bytes], port: int, log: str) -> None:
        self.name = name
        self.proc = proc
        self.port = port
        self.log = log
        self.ps = psutil.Process(proc.pid)
        self.xds = ""  # an agent's downstream xDS address (unix:PATH)
        self.status_port = 0  # pilot-agent's

    def alive(self) -> bool:
        return self.proc.poll() is None

    def cpu(self) -> float:
        t = self.ps.cpu_times()
        return float(t.user + t.system)

    def tail(self) -> str:
        with contextlib.suppress(OSError), open(self.log, errors="replace") as f:
            return "".join(f.readlines()[-15:])
        return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _popen(argv: list[str], log: str, env: dict[str, str] | None, cwd: str | None = None) -> Any:
    prefix = ["setpriv", "--pdeathsig", "KILL", "--"] if shutil.which("setpriv") else []
    with open(log, "wb") as out:
        return subprocess.Popen(
            [*prefix, *argv], stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=env,
            cwd=cwd, start_new_session=True,
        )  # fmt: skip


def _start_agent(name: str, tmp: str, discovery: str, resolv: str, private_resolv: bool) -> _Server:
    """``xdsfast run --dns`` or the stock pilot-agent with DNS, dialing ``discovery``; both
    forward what the table lacks to ``resolv`` (nothing listens there: fast failures)."""
    port = _free_dns_port()
    workdir = os.path.join(tmp, name)
    os.makedirs(workdir)
    log = os.path.join(workdir, "log")
    if name == "xdsfast":
        strip = ("ISTIO_", "ISTIOD_", "PROXY_CONFIG", "XDS_", "XDSFAST_", "GRPC_", "PROV_CERT")
        env = {k: v for k, v in os.environ.items() if not k.startswith(strip)}
        env.update(POD_NAMESPACE="bench", POD_NAME="bench", INSTANCE_IP="127.0.0.1")
        sock = os.path.join(workdir, "XDS")
        argv = [sys.executable, "-m", "xdsfast", "run", "--plaintext", "--discovery-address",
                discovery, "--xds-socket", sock, "--token-path", os.path.join(tmp, "no-token"),
                "--dns", "--dns-address", f"127.0.0.1:{port}", "--resolv-conf", resolv,
                "--status-address", "127.0.0.1:0", "--log-level", "warn"]  # fmt: skip
        server = _Server(name, _popen(argv, log, env), port, log)
        deadline = time.monotonic() + 60
        while not os.path.exists(sock):
            if not server.alive() or time.monotonic() > deadline:
                server.stop()
                raise RuntimeError(f"xdsfast run did not serve:\n{server.tail()}")
            time.sleep(0.01)
        server.xds = f"unix:{sock}"
        return server
    peers = _peers_module()
    binary = str(peers.pilot_agent_binary())
    status_port = peers.free_port()
    env = peers.pilot_agent_env(
        Path(workdir), discovery, status_port,
        dns_address=f"127.0.0.1:{port}",
    )  # fmt: skip
    argv = [binary, "proxy", "sidecar"]
    if private_resolv:  # its only upstream source is /etc/resolv.conf: a private copy
        script = 'mount --bind "$0" /etc/resolv.conf && exec "$@"'
        argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script,
                resolv, *argv]  # fmt: skip
    server = _Server(name, _popen(argv, log, env, cwd=workdir), port, log)
    try:
        peers.wait_pilot_agent(Path(workdir), status_port, server.alive, 60.0)
    except RuntimeError as exc:
        server.stop()
        raise RuntimeError(f"{exc}\n{server.tail()}") from None
    server.xds = f"unix:{Path(workdir) / peers.AGENT_XDS_SOCKET}"
    server.status_port = status_port
    return server


async def _measure(
    server: _Server, names: str, seconds: float, latency_seconds: float
) -> dict[str, float]:
    """dnsperf twice: q/s, average latency, lost and the server's CPU from a plain run;
    p50/p99 from a shorter ``-v`` run (printing every query slows dnsperf itself)."""
    rss_before = server.ps.memory_info().rss
    cpu0 = server.cpu()
    main = await _dnsperf(server.port, names, seconds)
    cpu = server.cpu() - cpu0
    latency = await _dnsperf(server.port, names, latency_seconds, verbose=True)
    return {
        "qps": main["qps"],
        "avg_us": main.get("avg_s", float("nan")) * 1e6,
        "p50_us": latency.get("p50_s", float("nan")) * 1e6,
        "p99_us": latency.get("p99_s", float("nan")) * 1e6,
        "sent": main.get("sent", 0.0),
        "lost": main.get("lost", 0.0),
        "cpu_us_per_query": cpu / max(1.0, main.get("completed", 0.0)) * 1e6,
        "rss_mib": rss_before / 2**20,
        "peak_rss_mib": (_vm_hwm(server.proc.pid) or 0) / 2**20,
    }


def _vm_hwm(pid: int) -> int | None:
    with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return None


async def _side_by_side(
    hosts: int, seconds: float, servers: tuple[str, ...], tmp: str
) -> dict[str, dict[str, float]]:
    import random

    from xdsfast.peers.adsclient import AdsClient
    from xdsfast.peers.controlplane import ControlPlane
    from xdsfast.typeurls import LISTENER, NAME_TABLE

    rng = random.Random(1)
    names = os.path.join(tmp, "queries")
    with open(names, "w") as f:
        for _ in range(QUERY_LINES):
            f.write(f"{table_host(rng.randrange(hosts))[0]} A\n")
    resolv = os.path.join(tmp, "resolv.conf")
    with open(resolv, "w") as f:  # upstream for names not in the table: nothing listens there
        f.write("nameserver 127.0.0.1\nsearch bench.svc.cluster.local svc.cluster.local\n")
    private_resolv = os.geteuid() == 0 and shutil.which("unshare") is not None
    probe = query(table_host(hosts - 1)[0] + ".", 4242)
    latency_seconds = max(1.0, seconds / 2)
    results: dict[str, dict[str, float]] = {}
    for name in servers:
        if name == "dnsmasq":
            dnsmasq = dnsperf_tools()[1]
            if dnsmasq is None:
                continue
            hosts_file = os.path.join(tmp, "hosts")
            with open(hosts_file, "w") as f:
                for i in range(hosts):
                    fqdn, ip = table_host(i)
                    f.write(f"{ip} {fqdn}\n")
            port = _free_dns_port()
            log = os.path.join(tmp, "dnsmasq.log")
            argv = [dnsmasq, "-k", "--no-resolv", "--no-hosts", f"--addn-hosts={hosts_file}",
                    "--listen-address=127.0.0.1", "--bind-interfaces", f"--port={port}",
                    "--user=root", "--pid-file=", "--log-facility=/dev/null"]  # fmt: skip
            started = time.monotonic()
            server = _Server(name, _popen(argv, log, None), port, log)
            try:
                first = await asyncio.to_thread(
                    _first_answer, port, probe, time.monotonic() + 120, server.alive
                )
                result = await _measure(server, names, seconds, latency_seconds)
                result["first_answer_ms"] = (first - started) * 1e3
                results[name] = result
            finally:
                server.stop()
            continue
        cp = ControlPlane("127.0.0.1:0")
        await cp.start()
        agent: _Server | None = None
        client: AdsClient | None = None
        try:
            cp.set_name_table(name_table(hosts))
            agent = _start_agent(name, tmp, cp.address, resolv, private_resolv)
            client = AdsClient(agent.xds)
            await client.open()
            await client.request(LISTENER)  # Envoy's first LDS request: the agent asks for NDS
            asked = await cp.wait_for_request(lambda r: r.type_url == NAME_TABLE, 60)
            if agent.status_port and not private_resolv:
                # Its upstream is the machine's resolver: ask nothing before the table is in
                # (first answer then an upper bound).
                await asyncio.to_thread(_wait_ready, agent.status_port, time.monotonic() + 300)
            first = await asyncio.to_thread(
                _first_answer, agent.port, probe, time.monotonic() + 300, agent.alive
            )
            result = await _measure(agent, names, seconds, latency_seconds)
            result["first_answer_ms"] = (first - asked.at) * 1e3
            results[name] = result
        finally:
            if client is not None:
                await client.close()
            if agent is not None:
                agent.stop()
            await cp.stop()
    return results


def dnsperf_side_by_side(
    hosts: int, seconds: float = 5, servers: tuple[str, ...] = SIDE_BY_SIDE
) -> dict[str, dict[str, float]]:
    """dnsperf (random A questions for table names) against each of ``servers``, one after
    the other, all serving the same ``hosts`` names: xdsfast and the stock pilot-agent
    (``xdsfast run --dns`` and ``pilot-agent`` with DNS on, each fed the NameTable by a
    control plane stand-in after an LDS request, as istiod does), and dnsmasq (the names
    in a hosts file).  Per server: q/s, average latency, p50/p99 (a ``-v`` run), lost
    queries, server CPU per query, RSS and peak RSS, and the time from the NameTable
    request reaching the control plane (dnsmasq: from its start) to the first answer from
    the table.  dnsperf itself is required; dnsmasq is skipped when not installed."""
    if dnsperf_tools()[0] is None:
        raise RuntimeError("dnsperf is not installed (Debian's dnsperf package)")
    with tempfile.TemporaryDirectory(prefix="bench-dns-") as tmp:
        return uvloop.run(_side_by_side(hosts, seconds, servers, tmp))


def side_by_side_table(hosts: int, results: dict[str, dict[str, float]]) -> str:
    lines = [
        f"{'server':<13}{'q/s':>9}{'avg us':>8}{'p50 us':>8}{'p99 us':>8}{'lost':>7}"
        f"{'CPU us/q':>9}{'RSS MiB':>9}{'peak':>6}{'first answer ms':>17}"
    ]
    for name, r in results.items():
        lines.append(
            f"{name:<13}{r['qps']:>9,.0f}{r['avg_us']:>8.0f}{r['p50_us']:>8.0f}"
            f"{r['p99_us']:>8.0f}{r['lost']:>7.0f}{r['cpu_us_per_query']:>9.1f}"
            f"{r['rss_mib']:>9.1f}{r['peak_rss_mib']:>6.0f}{r['first_answer_ms']:>17.1f}"
        )
    return f"{hosts:,} hosts:\n" + "\n".join(lines)


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
    parser.add_argument(
        "--dnsperf-hosts",
        type=lambda text: [int(n) for n in text.split(",") if n],
        default=[1000, 10_000, 100_000],
        metavar="N,N,...",
        help="table sizes of the dnsperf side by side (default 1000,10000,100000)",
    )
    parser.add_argument(
        "--dnsperf-seconds", type=float, default=5.0, help="dnsperf's run per server (default 5)"
    )
    parser.add_argument(
        "--only-dnsperf",
        action="store_true",
        help="run only the dnsperf side by side (xdsfast, pilot-agent, dnsmasq)",
    )
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
    if args.only_dnsperf:
        side_by_side(args.dnsperf_hosts, args.dnsperf_seconds)
        return
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
    side_by_side(args.dnsperf_hosts, args.dnsperf_seconds)


def side_by_side(sizes: list[int], seconds: float) -> None:
    dnsperf, dnsmasq = dnsperf_tools()
    # gRPC's C core logs a line at each fork (dnsperf, the servers) while its threads run.
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    if dnsperf is None:
        print("\ndnsperf side by side: not run (needs Debian's dnsperf; dnsmasq-base for dnsmasq)")
        return
    servers = SIDE_BY_SIDE if dnsmasq else tuple(n for n in SIDE_BY_SIDE if n != "dnsmasq")
    try:
        _peers_module().pilot_agent_binary()
    except RuntimeError as exc:
        print(f"\nistio-agent row skipped: {exc}")
        servers = tuple(n for n in servers if n != "istio-agent")
    print(
        f"\ndnsperf {' '.join(DNSPERF_LOAD)} -l {seconds:g} (random A questions for table "
        f"names, {QUERY_LINES:,} lines), each server alone; p50/p99 from a -v run of "
        f"{max(1.0, seconds / 2):g}s; RSS before the load, peak = VmHWM after it; first "
        "answer: from the NameTable request reaching the control plane (dnsmasq: from its "
        "start) to the first answer from the table"
        + ("" if dnsmasq else "; dnsmasq not installed (dnsmasq-base): its row skipped")
    )
    for hosts in sizes:
        try:
            results = dnsperf_side_by_side(hosts, seconds, servers)
        except RuntimeError as exc:
            print(f"bench_dns: error: {hosts} hosts: {exc}", file=sys.stderr)
            raise SystemExit(1) from None
        print(side_by_side_table(hosts, results))
        x = results.get("xdsfast")
        for other in ("istio-agent", "dnsmasq"):
            if x and other in results:
                o = results[other]
                print(
                    f"  xdsfast vs {other}: q/s {x['qps'] / o['qps']:.2f}x, CPU per query "
                    f"{x['cpu_us_per_query'] / o['cpu_us_per_query']:.2f}x, RSS "
                    f"{x['rss_mib'] / o['rss_mib']:.2f}x"
                )


if __name__ == "__main__":
    main()
