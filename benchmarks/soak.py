"""Soak: ``xdsfast run`` (a real process) relays continuous pushes and answers DNS for N minutes.

In this process: the istiod stand-in (pushing EDS, CDS and NameTable updates), an Envoy-like
ADS client that ACKs everything and reconnects now and then (alternating SotW and delta),
and DNS clients (UDP, and TCP on short-lived connections) asking for the NameTable's names.
The relay's RSS and CPU are sampled throughout; the table ends with the RSS growth after
warm-up, which must stay under ``--max-growth`` percent (exit status 1 otherwise).

    python benchmarks/soak.py --minutes 10
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import shutil
import signal
import struct
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from dnslib import DNSRecord

from xdsfast import nds_pb2
from xdsfast.peers import mesh
from xdsfast.peers.adsclient import AdsClient, StreamClosed
from xdsfast.peers.controlplane import ControlPlane
from xdsfast.typeurls import CLUSTER, ENDPOINT, LISTENER, NAME_TABLE

CLK_TCK = os.sysconf("SC_CLK_TCK")
N_CLUSTERS = 50
N_HOSTS = 200


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


def name_table(generation: int) -> nds_pb2.NameTable:
    table = nds_pb2.NameTable()
    for i in range(N_HOSTS):
        info = table.table[f"svc{i}.default.svc.cluster.local"]
        info.ips.append(f"10.{generation % 200}.{i // 250}.{i % 250 + 1}")
        info.registry = "Kubernetes"
        info.shortname = f"svc{i}"
        info.namespace = "default"
    return table


@dataclass
class Counters:
    pushes: int = 0
    responses: int = 0
    reconnects: int = 0
    dns_ok: int = 0
    dns_failed: int = 0
    errors: list[str] = field(default_factory=list)


@dataclass
class Sample:
    at: float
    rss: int
    cpu: float  # percent of one core over the interval
    pushes: int
    responses: int
    dns: int


async def pusher(cp: ControlPlane, rate: float, stop: asyncio.Event, n: Counters) -> None:
    tick = 0
    while not stop.is_set():
        tick += 1
        cluster = mesh.CLUSTER_NAME if tick % 2 else f"c{tick % N_CLUSTERS}"
        cp.set_resources(
            ENDPOINT,
            {
                cluster: mesh.endpoints(8000 + tick % 1000, cluster=cluster),
                mesh.CLUSTER_NAME: mesh.endpoints(8080),
            },
        )
        if tick % 10 == 0:
            clusters = {f"c{i}": mesh.eds_cluster(f"c{i}") for i in range(N_CLUSTERS)}
            clusters[mesh.CLUSTER_NAME] = mesh.eds_cluster()
            clusters[f"extra{tick % 7}"] = mesh.eds_cluster(f"extra{tick % 7}")
            cp.set_resources(CLUSTER, clusters)
        if tick % 100 == 0:
            cp.set_name_table(name_table(tick // 100))
        n.pushes += 1
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), 1 / rate)


async def ads_client(
    socket_path: str, reconnect_every: float, stop: asyncio.Event, n: Counters
) -> None:
    delta = False
    while not stop.is_set():
        client = AdsClient(f"unix:{socket_path}", delta=delta)
        await client.open()
        until = time.monotonic() + reconnect_every
        try:
            await client.request(CLUSTER)
            await client.request(ENDPOINT, [mesh.CLUSTER_NAME, *(f"c{i}" for i in range(50))])
            await client.request(LISTENER)
            while not stop.is_set() and time.monotonic() < until:
                try:
                    response = await client.recv(timeout=1.0)
                except TimeoutError:
                    continue
                n.responses += 1
                await client.ack(response)
        except StreamClosed as exc:
            n.errors.append(f"ADS stream closed: {exc}")
        finally:
            await client.close()
        n.reconnects += 1
        delta = not delta


def _query(i: int) -> tuple[bytes, int]:
    qid = i & 0xFFFF
    name = f"svc{i % N_HOSTS}.default.svc.cluster.local"
    record = DNSRecord.question(name, "A" if i % 3 else "AAAA")
    record.header.id = qid
    return bytes(record.pack()), qid


def _answered(reply: bytes, qid: int) -> bool:
    """NOERROR for our id; A queries get an address (the table has no AAAA: none there)."""
    parsed = DNSRecord.parse(reply)
    if parsed.header.id != qid or parsed.header.rcode != 0:
        return False
    return bool(parsed.rr) == (int(parsed.q.qtype) == 1)


async def dns_udp(port: int, rate: float, stop: asyncio.Event, n: Counters) -> None:
    loop = asyncio.get_running_loop()
    replies: asyncio.Queue[bytes] = asyncio.Queue()

    class Client(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: object) -> None:
            replies.put_nowait(data)

    transport, _ = await loop.create_datagram_endpoint(Client, remote_addr=("127.0.0.1", port))
    i = 0
    try:
        while not stop.is_set():
            i += 1
            query, qid = _query(i)
            transport.sendto(query)
            try:
                reply = await asyncio.wait_for(replies.get(), 2.0)
                ok = _answered(reply, qid)
                n.dns_ok += ok
                n.dns_failed += not ok
            except asyncio.TimeoutError:
                n.dns_failed += 1
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), 1 / rate)
    finally:
        transport.close()


async def dns_tcp(port: int, rate: float, stop: asyncio.Event, n: Counters) -> None:
    i = 0
    while not stop.is_set():
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError as exc:
            n.errors.append(f"DNS TCP connect: {exc}")
            n.dns_failed += 1
            await asyncio.sleep(1)
            continue
        try:
            for _ in range(20):  # a few queries per connection, then a new one
                i += 1
                query, qid = _query(i)
                writer.write(struct.pack("!H", len(query)) + query)
                size = struct.unpack("!H", await asyncio.wait_for(reader.readexactly(2), 2))[0]
                reply = await asyncio.wait_for(reader.readexactly(size), 2)
                ok = _answered(reply, qid)
                n.dns_ok += ok
                n.dns_failed += not ok
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), 1 / rate)
                if stop.is_set():
                    break
        except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError) as exc:
            n.errors.append(f"DNS TCP: {exc!r}")
            n.dns_failed += 1
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


_background: list[asyncio.Future[None]] = []


async def start_relay(
    workdir: Path, cp: ControlPlane, engine: str | None
) -> tuple[asyncio.subprocess.Process, int]:
    env = dict(os.environ)
    if engine:
        env["XDSFAST_ENGINE"] = engine
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "xdsfast",
        "run",
        "--plaintext",
        "--discovery-address",
        cp.address,
        "--xds-socket",
        str(workdir / "XDS"),
        "--dns",
        "--dns-address",
        "127.0.0.1:0",
        "--status-address",
        "127.0.0.1:0",
        cwd=workdir,
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None
    # The DNS port is in the "DNS proxy serving" line; the rest of the log is drained.
    text = b""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        line = await asyncio.wait_for(proc.stderr.readline(), 20)
        if not line:
            break
        text += line
        if b"xDS proxy serving" in line:
            break
    match = re.search(rb"DNS proxy serving.*?listen=\"?127\.0\.0\.1:(\d+)", text)
    if match is None:
        proc.kill()
        raise RuntimeError(f"xdsfast did not start:\n{text.decode(errors='replace')}")

    async def drain() -> None:
        assert proc.stderr is not None
        while await proc.stderr.readline():
            pass

    _background.append(asyncio.ensure_future(drain()))
    return proc, int(match.group(1))


async def soak(args: argparse.Namespace) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="xfsoak", dir="/tmp"))
    cp = ControlPlane("127.0.0.1:0")
    await cp.start()
    cp.set_mesh(mesh.sample_mesh(listener_port=15001, backend_port=8080, name_table=False))
    cp.set_name_table(name_table(0))
    proc, dns_port = await start_relay(workdir, cp, args.engine)
    stop = asyncio.Event()
    n = Counters()
    tasks = [
        asyncio.ensure_future(pusher(cp, args.push_rate, stop, n)),
        asyncio.ensure_future(ads_client(str(workdir / "XDS"), args.reconnect_every, stop, n)),
    ]
    # DNS answers once the first NameTable is applied (ACKed by xdsfast itself).
    await cp.wait_for_request(lambda r: r.type_url == NAME_TABLE and r.is_ack, timeout=20)
    tasks += [
        asyncio.ensure_future(dns_udp(dns_port, args.dns_rate, stop, n)),
        asyncio.ensure_future(dns_tcp(dns_port, args.dns_rate / 4, stop, n)),
    ]
    duration = args.minutes * 60
    interval = args.interval or max(5.0, duration / 30)
    samples: list[Sample] = []
    started = time.monotonic()
    last_cpu, last_at = cpu_seconds(proc.pid), started
    try:
        while (now := time.monotonic()) - started < duration:
            await asyncio.sleep(min(interval, duration - (now - started)))
            if proc.returncode is not None:
                print(f"xdsfast exited with {proc.returncode}", file=sys.stderr)
                return 2
            at, cpu = time.monotonic(), cpu_seconds(proc.pid)
            samples.append(
                Sample(
                    at - started,
                    rss(proc.pid),
                    100 * (cpu - last_cpu) / (at - last_at),
                    n.pushes,
                    n.responses,
                    n.dns_ok,
                )
            )
            last_cpu, last_at = cpu, at
            s = samples[-1]
            print(
                f"{s.at:7.0f}s  rss {s.rss / 2**20:7.1f} MiB  cpu {s.cpu:5.1f} %  "
                f"pushes {s.pushes:8d}  responses {s.responses:8d}  dns {s.dns:8d}",
                flush=True,
            )
    finally:
        stop.set()
        for task in tasks:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, 15)
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(proc.wait(), 15)
        await cp.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return report(samples, n, args)


def report(samples: list[Sample], n: Counters, args: argparse.Namespace) -> int:
    if len(samples) < 4:
        print("too few samples", file=sys.stderr)
        return 2
    warm = max(1, int(len(samples) * args.warmup))
    after = samples[warm - 1 :]
    base = after[0].rss
    final = sorted(s.rss for s in samples[-3:])[1]  # median of the last three
    peak = max(s.rss for s in after)
    growth = 100 * (final - base) / base
    cpus = sorted(s.cpu for s in samples)
    print()
    print("| t (s) | RSS (MiB) | CPU (% of a core) | pushes | responses relayed | DNS answers |")
    print("|---:|---:|---:|---:|---:|---:|")
    for s in samples:
        print(
            f"| {s.at:.0f} | {s.rss / 2**20:.1f} | {s.cpu:.1f} | {s.pushes} | {s.responses} "
            f"| {s.dns} |"
        )
    print()
    print(f"warm-up: the first {warm} samples ({samples[warm - 1].at:.0f} s)")
    print(
        f"RSS after warm-up {base / 2**20:.1f} MiB -> end {final / 2**20:.1f} MiB "
        f"(peak {peak / 2**20:.1f} MiB): growth {growth:+.2f} %"
    )
    print(f"CPU median {cpus[len(cpus) // 2]:.1f} %, max {cpus[-1]:.1f} %")
    print(
        f"pushes {n.pushes}, responses relayed and ACKed {n.responses}, reconnects "
        f"{n.reconnects}, DNS answers {n.dns_ok}, DNS failures {n.dns_failed}"
    )
    for error in n.errors[:10]:
        print("error:", error)
    ok = growth < args.max_growth and n.dns_failed == 0 and not n.errors
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--interval", type=float, default=0.0, help="seconds between samples")
    parser.add_argument("--push-rate", type=float, default=100.0, help="EDS pushes per second")
    parser.add_argument("--dns-rate", type=float, default=200.0, help="UDP queries per second")
    parser.add_argument("--reconnect-every", type=float, default=30.0, help="seconds")
    parser.add_argument("--warmup", type=float, default=0.2, help="fraction of the run")
    parser.add_argument("--max-growth", type=float, default=5.0, help="percent")
    parser.add_argument("--engine", choices=("fast", "grpcio"), default=None)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return asyncio.run(soak(args))


if __name__ == "__main__":
    sys.exit(main())
