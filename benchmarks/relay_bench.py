"""Side-by-side relay benchmark: direct vs ``xdsfast run`` vs a naive proto-codec relay.

One invocation drives the same ADS workloads through each arrangement and prints
ratios against direct, which are what to read on a noisy shared machine:

* ``direct``      client -> control plane
* ``xdsfast``     client -> ``xdsfast run`` (Unix socket; plaintext TCP upstream) -> control plane
* ``xdsfast-fast`` the same with ``--engine fast`` (the HTTP/2 engine on uvloop)
* ``xdsfast-py``  the same with ``XDSFAST_NO_EXTENSIONS=1`` (pure-Python peeker)
* ``naive``       client -> a grpc.aio relay that decodes and re-encodes every message
* ``bare``        (opt-in, ``--only``) the naive relay's loops on raw bytes: the floor for
                  any grpc.aio relay, to tell the relay's own overhead from gRPC's
* ``forwarder``   (opt-in) bytes copied between the two sockets by asyncio Protocols on
                  uvloop, no HTTP/2 awareness: the floor for any relay in Python
* ``socat``       (opt-in) Debian's socat copying bytes between the two sockets, in C
                  (one forked process per connection): the floor for any relay process
                  on the machine, whatever its language
* ``istio-agent`` (opt-in) the stock ``pilot-agent`` (Go, built from the pinned Istio by
                  ``scripts/build-istio-peers``) as a bare xDS proxy: ``DISABLE_ENVOY``,
                  DNS off, plaintext upstream, downstream on its ./etc/istio/proxy/XDS
                  socket: the relay xdsfast replaces.  The client's first request
                  carries a sidecar-shaped node, which the agent forwards as is

Opt-in (``--only``) TLS rows: the control plane also serves TLS (h2 ALPN) with a
throw-away CA and server certificate made at run time, as istiod's port 15012:

* ``xdsfast-fast-tls`` / ``xdsfast-tls``  ``xdsfast run`` (fast / grpcio engine) dialing
                  the control plane over TLS (XDS_ROOT_CA, ISTIOD_SAN; no client cert)
* ``istio-agent-tls`` the stock pilot-agent dialing the control plane over TLS
                  (XDS_ROOT_CA, ISTIOD_SAN; no client certificate)
* ``direct-tls``  client -> control plane over TLS: the baseline of the relay TLS rows
                  when it runs (same number of TLS hops); without it they are
                  compared with plaintext ``direct``.  ``direct-tls`` itself is
                  compared with ``direct`` (the cost of TLS alone)

Workloads (SotW, or delta with ``--delta``):

* push storm: N x ~5 MB CDS responses (4000 Istio-like clusters) sent back to back,
  each read and ACKed by the client; timed from the control plane's first write
  to the client's last read (CLOCK_MONOTONIC is shared by all processes).
* small updates: N EDS responses of ~400 B, each ACKed before the next is sent;
  the control plane times every response -> ACK round trip.  "Added latency"
  is the relay's p50 minus its baseline's p50 (round by round, then the median):
  that round trip crosses the relay twice (response down, ACK up), the issue's
  "added latency, request -> response, p50 <= 50 us" target.
* pushed updates (burst): N of the same EDS responses pushed back to back, as istiod
  pushes (it does not wait for ACKs unless its flow control is on), each read and ACKed;
  timed from the control plane's first write to its last ACK.  Reads and writes then
  carry several messages each, as in a busy mesh, so this is the throughput and CPU
  figure of a relay under load; the small updates above are its latency figure.
* big pushes (opt-in, ``--big N``), three workloads:

  - ``big``: N x 40 MB CDS responses pushed back to back, as istiod pushes (it does
    not wait for ACKs), each read and ACKed; timed as the storm is: the big-push
    throughput, as a ratio to direct round by round.
  - ``peak_big`` and ``peak_huge``: one 40 MB and one 200 MB CDS response, each ACKed,
    each after a VmHWM reset: the relay's peak RSS over idle (its RSS just before the
    push, at rest).  A relay that holds each push whole grows with the push; one that
    forwards it as it arrives (cut-through) should not.

  A big push is built at its send from a ~300 kB chunk of resources repeated, so the
  control plane never holds a second copy.  The sizes are ``BIG_PUSH_BYTES`` and
  ``HUGE_PUSH_BYTES``.  The ``streamed`` column is the relay's own count of responses
  it wrote to the client as they arrived (``xdsfast_xds_streamed_responses_total``,
  read from its /stats/prometheus; xdsfast rows only).

With an ``istio-agent`` row in the run, a last table holds every other relay row against
it (``istio-agent-tls`` for the relay TLS rows when it ran): throughput round by round,
relay CPU per message, peak and idle RSS, as ratios (the issue's targets: throughput
>= 1.0x, CPU <= 0.5x, RSS <= 1.0x).

Control plane, client and relays are separate uvloop processes (``_relay_peers.py``),
so the relay's cost is what the ratios show.  Relay CPU comes from psutil; peak RSS
from the kernel's VmHWM (reset before each workload).  Each round restarts the
relays and interleaves the arrangements, so ratios are taken round by round.

    python benchmarks/relay_bench.py [--quick] [--delta] [--rounds N] [--only a,b,...]
                                     [--storm N] [--small N] [--burst N] [--big N]
                                     [--json out.json] [--png chart.png]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import os
import platform
import queue
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any

PEERS = Path(__file__).with_name("_relay_peers.py")
ARRANGEMENTS = (
    "direct", "xdsfast", "xdsfast-fast", "xdsfast-py", "naive", "bare", "forwarder",
    "direct-tls", "xdsfast-tls", "xdsfast-fast-tls", "socat", "istio-agent", "istio-agent-tls",
)  # fmt: skip
ISTIO_AGENT = "istio-agent"  # the row the issue's targets are against
DEFAULT_ARRANGEMENTS = ARRANGEMENTS[:5]
WORKLOADS = ("storm", "small", "burst", "big", "peak_big", "peak_huge")
BIG_WORKLOADS = WORKLOADS[3:]  # what --big runs
# The control plane's workload for each (the big pushes for peak RSS go one at a time).
PEER_WORKLOAD = {"peak_big": "big-acked", "peak_huge": "big-acked"}
PUSHED = ("storm", "burst", "big")  # back to back; the others wait for each ACK
BIG_PUSH_BYTES = 40_000_000  # --big N: N pushes of this size, and one for peak RSS
HUGE_PUSH_BYTES = 200_000_000  # --big: one push of this size for peak RSS
STREAMED_METRIC = "xdsfast_xds_streamed_responses_total"
TLS_SUFFIX = "-tls"
READY_TIMEOUT = 30.0
MATPLOTLIB_HINT = "pip install matplotlib, or the project's bench extra"
XDSFAST_READY = "xDS proxy serving"
# Environment that would change what `xdsfast run` does (DNS proxy, headers, core, TLS).
_STRIP_ENV = (
    "ISTIO_", "ISTIOD_", "PROXY_CONFIG", "XDS_", "XDSFAST_", "GRPC_", "PROV_CERT",
    "FILE_MOUNTED_CERTS", "PILOT_CERT_PROVIDER",
)  # fmt: skip


class BenchError(RuntimeError):
    """A peer or relay failed; the message carries its log tail."""


# ----- child processes -------------------------------------------------------------------


class Child:
    """A subprocess whose event stream (stdout or stderr) is read line by line by a thread.

    Lines are teed to a log file in the run's temp dir and queued, so the
    orchestrator waits on conditions with deadlines, never on sleeps.  Children
    get their own session (Ctrl-C reaches only the orchestrator, which cleans up)
    and, where ``setpriv`` exists, SIGKILL if the orchestrator dies.
    """

    def __init__(
        self,
        name: str,
        argv: list[str],
        log_dir: Path,
        *,
        env: dict[str, str] | None = None,
        events_from: str = "stdout",
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.logs = [log_dir / f"{name}.stdout", log_dir / f"{name}.stderr"]
        self.lines: queue.Queue[str | None] = queue.Queue()
        prefix = ["setpriv", "--pdeathsig", "KILL", "--"] if shutil.which("setpriv") else []
        from_stderr = events_from == "stderr"
        self._other = open(self.logs[0 if from_stderr else 1], "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [*prefix, *argv],
            stdin=subprocess.PIPE,
            stdout=self._other if from_stderr else subprocess.PIPE,
            stderr=subprocess.PIPE if from_stderr else self._other,
            env=env,
            cwd=cwd,
            start_new_session=True,
            text=True,
            bufsize=1,
        )
        stream = self.proc.stderr if from_stderr else self.proc.stdout
        assert stream is not None
        tee = self.logs[1 if from_stderr else 0]
        self._reader = threading.Thread(
            target=self._read, args=(stream, tee), name=f"{name}-reader", daemon=True
        )
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self, stream: IO[str], tee: Path) -> None:
        with open(tee, "w") as log:
            for line in stream:
                log.write(line)
                log.flush()
                self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def tail(self, lines: int = 15) -> str:
        out = []
        for path in self.logs:
            with contextlib.suppress(OSError):
                text = path.read_text(errors="replace").splitlines()[-lines:]
                if text:
                    out.append(f"--- {path.name}\n" + "\n".join(text))
        return "\n".join(out)

    def _fail(self, why: str) -> BenchError:
        return BenchError(f"{self.name}: {why}\n{self.tail()}")

    def wait_line(self, match: Callable[[str], bool], timeout: float, what: str) -> str:
        """The first line that matches, or BenchError on exit or deadline."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._fail(f"timed out after {timeout:.0f}s waiting for {what}")
            try:
                line = self.lines.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                code = self.proc.wait()
                raise self._fail(f"exited with code {code} while waiting for {what}")
            if match(line):
                return line

    def expect(self, event: str, timeout: float) -> dict[str, Any]:
        """The next JSON event named ``event``; an ``error`` event raises."""
        found: dict[str, Any] = {}

        def match(line: str) -> bool:
            try:
                obj = json.loads(line)
            except ValueError:
                return False
            if obj.get("event") == "error":
                raise self._fail(f"reported: {obj.get('message')}")
            if obj.get("event") == event:
                found.update(obj)
                return True
            return False

        self.wait_line(match, timeout, f"event {event!r}")
        return found

    def send(self, command: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()

    def stop(self, timeout: float = 10.0) -> int | None:
        """Close stdin and SIGTERM; SIGKILL after ``timeout``.  Returns the exit code."""
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                assert self.proc.stdin is not None
                self.proc.stdin.close()
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        with contextlib.suppress(OSError):
            assert self.proc.stdin is not None
            self.proc.stdin.close()
        self._reader.join(timeout=2)
        self._other.close()
        return self.proc.returncode


class Children:
    """Every child started, stopped in reverse order on exit, error or Ctrl-C."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self._children: list[Child] = []

    def start(self, name: str, argv: list[str], **kwargs: Any) -> Child:
        child = Child(name, argv, self.log_dir, **kwargs)
        self._children.append(child)
        return child

    def stop(self, child: Child) -> None:
        child.stop()
        self._children.remove(child)

    def __enter__(self) -> Children:
        return self

    def __exit__(self, *exc: object) -> None:
        while self._children:
            self._children.pop().stop()


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_STRIP_ENV)}
    env.update(extra)
    return env


# ----- measurements -----------------------------------------------------------------------


def _proc_status(pid: int, key: str) -> int | None:
    """A ``kB`` value from /proc/PID/status, in bytes."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return None


class PeakRss:
    """Peak RSS of a process over a block.

    The kernel's own high-water mark (VmHWM, reset by writing 5 to clear_refs)
    is exact; a 10 ms psutil sampler backs it up where the reset is refused.
    """

    def __init__(self, pid: int, interval: float = 0.01) -> None:
        import psutil

        self.pid = pid
        self.interval = interval
        self._process = psutil.Process(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="rss-sampler", daemon=True)
        self.sampled = 0
        self.peak = 0
        self.exact = False

    def _sample(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(Exception):
                self.sampled = max(self.sampled, self._process.memory_info().rss)
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRss:
        try:
            Path(f"/proc/{self.pid}/clear_refs").write_text("5")
            self.exact = True
        except OSError:
            self.exact = False
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        hwm = _proc_status(self.pid, "VmHWM") if self.exact else None
        self.peak = max(self.sampled, hwm or 0)


def cpu_seconds(pid: int) -> float:
    """The process's CPU, with that of children it has reaped (socat's per connection)."""
    import psutil

    t = psutil.Process(pid).cpu_times()
    return float(t.user + t.system + t.children_user + t.children_system)


def wait_children_reaped(pid: int, timeout: float = 10.0) -> None:
    """Until ``pid`` has no child left (their CPU is then in its own times)."""
    import psutil

    deadline = time.monotonic() + timeout
    while psutil.Process(pid).children() and time.monotonic() < deadline:
        time.sleep(0.01)


def rss(pid: int) -> int:
    import psutil

    return int(psutil.Process(pid).memory_info().rss)


def baseline(name: str, names: Collection[str]) -> str:
    """What a row is compared with: ``direct``; a relay TLS row ``direct-tls`` if it ran."""
    if name.endswith(TLS_SUFFIX) and name != "direct-tls" and "direct-tls" in names:
        return "direct-tls"
    return "direct"


# ----- the run -------------------------------------------------------------------------------


@dataclass
class Settings:
    """What one invocation runs (message counts of 0 skip a workload)."""

    storm: int
    small: int
    delta: bool
    rounds: int
    arrangements: tuple[str, ...]
    relay_env: dict[str, str] = field(default_factory=dict)
    big: int = 0  # big pushes back to back; with any, one big and one huge for peak RSS
    burst: int = 0  # small EDS updates pushed back to back (0 in runs saved before it)
    big_bytes: int = BIG_PUSH_BYTES
    huge_bytes: int = HUGE_PUSH_BYTES

    @property
    def tls(self) -> bool:
        return any(name.endswith(TLS_SUFFIX) for name in self.arrangements)


@dataclass
class Relay:
    """A running arrangement: where the client connects and the relay process, if any."""

    name: str
    target: str
    child: Child | None = None
    idle_rss: int | None = None
    core: str | None = None
    tls: dict[str, str] | None = None  # the client's TLS settings (direct-tls only)
    status: str | None = None  # xdsfast's status server, HOST:PORT (its metrics)


@dataclass
class Results:
    """Per arrangement, one dict per round for each workload."""

    storm: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    small: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    burst: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    big: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    peak_big: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    peak_huge: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    idle_rss: dict[str, list[int]] = field(default_factory=dict)
    cores: dict[str, str] = field(default_factory=dict)


class Bench:
    """The control plane and client (started once) and the arrangements run against them."""

    def __init__(self, settings: Settings, children: Children, tmp: Path) -> None:
        self.s = settings
        self.children = children
        self.tmp = tmp
        tls_dir = ["--tls-dir", str(tmp / "pki")] if settings.tls else []
        self.cp = children.start(
            "controlplane", [sys.executable, str(PEERS), "controlplane", *tls_dir], env=clean_env()
        )
        self.client = children.start(
            "client", [sys.executable, str(PEERS), "client"], env=clean_env()
        )
        ready = self.cp.expect("ready", READY_TIMEOUT)
        self.port = int(ready["port"])
        self.client.expect("ready", READY_TIMEOUT)
        self.upstream = f"127.0.0.1:{self.port}"
        # TLS (when a -tls row runs): the address, the CA file and the name to check.
        self.tls_upstream = f"127.0.0.1:{ready['tls_port']}" if "tls_port" in ready else None
        self.tls: dict[str, str] = {k: ready[k] for k in ("root_ca", "server_name") if k in ready}
        self.agent_runs = 0  # each pilot-agent start gets its own working dir

    def start(self, name: str) -> Relay:
        """Start one arrangement's relay and wait until it serves."""
        if name == "direct":
            return Relay(name, self.upstream)
        tls = name.endswith(TLS_SUFFIX)
        if tls and self.tls_upstream is None:
            raise BenchError(f"{name}: the control plane serves no TLS port")
        if name == "direct-tls":
            return Relay(name, str(self.tls_upstream), tls=self.tls)
        if name.startswith(ISTIO_AGENT):
            return self.start_istio_agent(name, tls)
        sock = self.tmp / name / "XDS"
        sock.parent.mkdir(exist_ok=True)
        status: list[str] = []  # xdsfast's status server, from its log
        if name == "socat":
            if shutil.which("socat") is None:
                raise BenchError("socat: not installed (Debian's socat package)")
            child = self.children.start(
                name,
                ["socat", "-d", "-d", "-b", str(256 << 10),
                 f"UNIX-LISTEN:{sock},fork", f"TCP:{self.upstream},nodelay"],
                env=clean_env(),
                events_from="stderr",
            )  # fmt: skip
            child.wait_line(lambda line: "listening on" in line, READY_TIMEOUT, "listening")
            return Relay(name, f"unix:{sock}", child, None, "bytes, no HTTP/2 (C)")
        if name in ("naive", "bare", "forwarder"):
            role = "forwarder" if name == "forwarder" else "naive"
            child = self.children.start(
                name,
                [
                    sys.executable,
                    str(PEERS),
                    role,
                    "--upstream",
                    self.upstream,
                    "--socket",
                    str(sock),
                    *(["--raw"] if name == "bare" else []),
                ],
                env=clean_env(**self.s.relay_env),
            )
            child.expect("ready", READY_TIMEOUT)
            core = {"bare": "raw bytes", "forwarder": "bytes, no HTTP/2"}.get(
                name, "protobuf " + protobuf_impl()
            )
        else:
            env = clean_env(**self.s.relay_env)
            # Each row names its engine; the others keep the default unless --relay-env says.
            if name in ("xdsfast-fast", "xdsfast-fast-tls"):
                env["XDSFAST_ENGINE"] = "fast"
            elif "XDSFAST_ENGINE" not in self.s.relay_env:
                env["XDSFAST_ENGINE"] = "grpcio"
            if tls:  # as a pod: istiod's root CA and the name its certificate carries
                env["XDS_ROOT_CA"] = self.tls["root_ca"]
                env["ISTIOD_SAN"] = self.tls["server_name"]
                upstream = ["--discovery-address", str(self.tls_upstream)]
            else:
                upstream = ["--plaintext", "--discovery-address", self.upstream]
            if name == "xdsfast-py":
                env["XDSFAST_NO_EXTENSIONS"] = "1"
            core = xdsfast_core(env)
            wanted = "python" if name == "xdsfast-py" else "cython"
            if core != wanted:  # the row's label would lie
                print(f"warning: {name} runs the {core} core, not {wanted}", file=sys.stderr)
            child = self.children.start(
                name,
                [
                    sys.executable, "-m", "xdsfast", "run", *upstream,
                    "--xds-socket", str(sock), "--token-path", str(self.tmp / "no-token"),
                    "--no-dns", "--status-address", "127.0.0.1:0", "--log-level", "info",
                ],
                env=env,
                events_from="stderr",
            )  # fmt: skip

            def ready(line: str) -> bool:
                if "status server listening" in line:  # the line before: its address
                    status.extend(f[7:] for f in line.split() if f.startswith("status="))
                return XDSFAST_READY in line

            child.wait_line(ready, READY_TIMEOUT, XDSFAST_READY)
        relay = Relay(name, f"unix:{sock}", child, rss(child.pid), core)
        relay.status = status[0] if status else None  # xdsfast's metrics
        return relay

    def start_istio_agent(self, name: str, tls: bool) -> Relay:
        """The stock pilot-agent in a fresh working dir (its paths are relative to it)."""
        peers = peers_module()
        try:
            binary = peers.pilot_agent_binary()
        except RuntimeError as exc:
            raise BenchError(f"{name}: {exc}") from None
        self.agent_runs += 1
        workdir = self.tmp / f"{name}-{self.agent_runs}"
        workdir.mkdir()
        status_port = peers.free_port()
        upstream = str(self.tls_upstream) if tls else self.upstream
        env = peers.pilot_agent_env(
            workdir, upstream, status_port, tls=self.tls if tls else None,
            extra=self.s.relay_env,
        )  # fmt: skip
        child = self.children.start(name, [str(binary), "proxy", "sidecar"], env=env, cwd=workdir)
        try:
            peers.wait_pilot_agent(
                workdir, status_port, lambda: child.proc.poll() is None, READY_TIMEOUT
            )
        except RuntimeError as exc:
            raise child._fail(str(exc)) from None
        sock = workdir / peers.AGENT_XDS_SOCKET
        return Relay(name, f"unix:{sock}", child, rss(child.pid), "stock pilot-agent (Go)")

    def run(self, relay: Relay, workload: str, count: int) -> dict[str, Any]:
        """One workload through one arrangement: peer results plus the relay's costs."""
        delta = self.s.delta
        peer_workload = PEER_WORKLOAD.get(workload, workload)
        size = 0  # the big pushes' size, for the control plane
        if workload in BIG_WORKLOADS:
            size = self.s.huge_bytes if workload == "peak_huge" else self.s.big_bytes
        plan = {"workload": peer_workload, "count": count, "delta": delta, "size": size}
        self.cp.send(plan)
        planned = self.cp.expect("planned", 120)
        timeout = 60 + count * max(0.02, planned["message_bytes"] / 5e6)  # >= 5 MB/s
        # xdsfast's count of responses cut through (big pushes only: a scrape is not free).
        scrape = relay.status if workload in BIG_WORKLOADS else None
        streamed0 = streamed(scrape) if scrape else None
        pid = relay.child.pid if relay.child else None
        rss_before = rss(pid) if pid else None
        cpu0 = cpu_seconds(pid) if pid else 0.0
        # socat's work (and memory) is in the process it forks per connection: CPU only.
        peak = PeakRss(pid) if pid and relay.name != "socat" else None
        command = {
            "op": "run",
            "target": relay.target,
            "workload": peer_workload,
            "count": count,
            "delta": delta,
        }
        if relay.tls:
            command["tls"] = relay.tls
        with peak or contextlib.nullcontext():
            self.client.send(command)
            cl = self.client.expect("received", timeout)
            cp = self.cp.expect("done", timeout)
        self.client.send({"op": "close"})
        self.client.expect("done", 30)
        if pid and relay.name == "socat":
            wait_children_reaped(pid)  # the connection's process, with its CPU
        out: dict[str, Any] = {"count": count, "message_bytes": planned["message_bytes"]}
        out["cp_cpu"], out["client_cpu"] = cp["cpu"], cl["cpu"]
        if pid:
            out["relay_cpu"] = cpu_seconds(pid) - cpu0
        if pid and peak:
            out["peak_rss"], out["peak_rss_exact"] = peak.peak, peak.exact
            out["rss_before"], out["rss_after"] = rss_before, rss(pid)
        if scrape and streamed0 is not None:
            after = streamed(scrape)
            if after is not None:
                out["streamed"] = after - streamed0
        if workload in PUSHED:
            # CLOCK_MONOTONIC is system-wide on Linux.  A storm (big pushes too) ends at the
            # client's last read; a burst at the control plane's last ACK (its ACKs are half
            # the traffic).
            end = cp["t_acked"] if workload == "burst" else cl["t_last"]
            wall = end - cp["t_start"]
            out.update(
                wall=wall, bytes=cl["bytes"], rate=count / wall, mbps=cl["bytes"] / wall / 1e6
            )
        else:
            if cp["mismatched"]:
                raise BenchError(f"{cp['mismatched']} ACKs carried the wrong nonce")
            out.update(
                wall=cp["elapsed"], rate=count / cp["elapsed"], p50=cp["p50"], p99=cp["p99"],
                p90=cp["p90"], max=cp["max"],
            )  # fmt: skip
        return out

    def arrangement(self, name: str, results: Results) -> None:
        relay = self.start(name)
        try:
            if relay.idle_rss is not None:
                results.idle_rss.setdefault(name, []).append(relay.idle_rss)
            if relay.core:
                results.cores[name] = relay.core
            # Warm-up, not measured: first-use costs (imports, arenas, code paths).  No big
            # warm-up: the big pushes' peak RSS is measured from where the others left it,
            # the 40 MB one first, then the 200 MB one, then the big-push throughput.
            if self.s.storm:
                self.run(relay, "storm", 2)
            self.run(relay, "small", 200)
            peaks = 1 if self.s.big else 0
            workloads = (
                ("storm", self.s.storm), ("small", self.s.small), ("burst", self.s.burst),
                ("peak_big", peaks), ("peak_huge", peaks), ("big", self.s.big),
            )  # fmt: skip
            for workload, count in workloads:
                if count:
                    result = self.run(relay, workload, count)
                    getattr(results, workload).setdefault(name, []).append(result)
                    progress(name, workload, result)
        finally:
            if relay.child:
                self.children.stop(relay.child)


def streamed(status: str) -> int | None:
    """xdsfast's count of responses cut through, from its /stats/prometheus at ``status``
    (HOST:PORT); None where it has no such counter (a build before cut-through) or does
    not answer (the column then says so; the figures do not depend on it)."""
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://{status}/stats/prometheus", timeout=10) as reply:
            text = reply.read().decode()
    except OSError as exc:
        print(f"warning: {status}/stats/prometheus: {exc}", file=sys.stderr)
        return None
    values = [
        float(line.rpartition(" ")[2])
        for line in text.splitlines()
        if line.startswith((STREAMED_METRIC + " ", STREAMED_METRIC + "{"))
    ]
    return int(sum(values)) if values else None


def peers_module() -> Any:
    """``_relay_peers`` (the pilot-agent helpers), loaded by path: this file runs both as a
    script and as ``benchmarks.relay_bench`` under asv."""
    module = sys.modules.get("_relay_peers")
    if module is None:
        spec = importlib.util.spec_from_file_location("_relay_peers", PEERS)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["_relay_peers"] = module
        spec.loader.exec_module(module)
    return module


def progress(name: str, workload: str, r: dict[str, Any]) -> None:
    """One line per measurement on stderr, so a long run shows signs of life."""
    cpu = f", relay cpu {r['relay_cpu']:.2f}s" if "relay_cpu" in r else ""
    print(
        f"  {name:<16} {workload:<6} {r['count']:>6} msgs in {r['wall']:6.2f}s "
        f"({r['rate']:8.1f}/s{cpu})",
        file=sys.stderr,
        flush=True,
    )


def xdsfast_core(env: dict[str, str]) -> str:
    """What ``xdsfast version`` says about its core under ``env`` (cython or python)."""
    out = subprocess.run(
        [sys.executable, "-m", "xdsfast", "version"],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    if out.returncode != 0:
        raise BenchError(f"xdsfast version failed ({out.returncode}): {out.stderr.strip()}")
    first = out.stdout.strip().partition("\n")[0]  # then one line a compiled module
    return first[first.find("core:") + 5 :].strip(" )") if "core:" in first else first


def protobuf_impl() -> str:
    from google.protobuf.internal import api_implementation

    return str(api_implementation.Type())


# ----- report ----------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    from importlib.metadata import version

    model = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "grpcio": version("grpcio"),
        "protobuf": f"{version('protobuf')} ({protobuf_impl()})",
        "uvloop": version("uvloop"),
        "loadavg": os.getloadavg(),
    }


def _median(values: list[float]) -> float:
    return float(statistics.median(values))


def summarize(results: Results, names: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """Medians over rounds; peak RSS is the max.

    The ratio against the row's baseline (``direct``, or ``direct-tls`` for the relay
    TLS rows when it ran: :func:`baseline`) is taken round by round (rounds interleave
    the arrangements, so slow drift on a shared machine cancels) and its range kept;
    so is the added p50 latency of the small updates (relay p50 - baseline p50).
    """
    summary: dict[str, dict[str, Any]] = {}
    for name in names:
        base_name = baseline(name, names)
        row: dict[str, Any] = {"core": results.cores.get(name), "baseline": base_name}
        for workload in WORKLOADS:
            runs: list[dict[str, Any]] = getattr(results, workload).get(name, [])
            if not runs:
                continue
            numeric = [
                k for k, v in runs[0].items() if isinstance(v, (int, float)) and type(v) is not bool
            ]
            agg: dict[str, Any] = {k: _median([r[k] for r in runs]) for k in numeric}
            agg["count"], agg["message_bytes"] = runs[0]["count"], runs[0]["message_bytes"]
            if "peak_rss" in runs[0]:
                agg["peak_rss"] = max(r["peak_rss"] for r in runs)
                agg["peak_over_before"] = max(r["peak_rss"] - r["rss_before"] for r in runs)
            base: list[dict[str, Any]] = getattr(results, workload).get(base_name, [])
            if len(base) == len(runs) and base_name != name:
                ratios = [r["rate"] / b["rate"] for r, b in zip(runs, base, strict=True)]
                agg["ratio"], agg["ratio_min"], agg["ratio_max"] = (
                    _median(ratios), min(ratios), max(ratios),
                )  # fmt: skip
                if workload == "small":
                    added = [r["p50"] - b["p50"] for r, b in zip(runs, base, strict=True)]
                    agg["added_p50"] = _median(added)
            elif base_name == name:
                agg["ratio"] = agg["ratio_min"] = agg["ratio_max"] = 1.0
            row[workload] = agg
        if name in results.idle_rss:
            row["idle_rss"] = _median([float(v) for v in results.idle_rss[name]])
        summary[name] = row
    for name in names:
        against = agent_row(name, names)
        if against is not None:
            summary[name]["vs_agent"] = versus(results, summary, name, against)
    return summary


def agent_row(name: str, names: Collection[str]) -> str | None:
    """The stock pilot-agent row a relay row is held against (the issue's targets):
    ``istio-agent-tls`` for a relay TLS row if it ran, else ``istio-agent``; None for
    the baselines, the agent rows themselves, or a run without the agent."""
    if name.startswith(("direct", ISTIO_AGENT)):
        return None
    tls_agent = ISTIO_AGENT + TLS_SUFFIX
    if name.endswith(TLS_SUFFIX) and tls_agent in names:
        return tls_agent
    return ISTIO_AGENT if ISTIO_AGENT in names else None


def versus(
    results: Results, summary: dict[str, dict[str, Any]], name: str, agent: str
) -> dict[str, Any]:
    """A row against the agent's: per workload, the throughput ratio (round by round, then
    the median), relay CPU per message and peak RSS as ratios (> 1: the row costs more);
    and the idle RSS ratio."""
    out: dict[str, Any] = {"agent": agent}
    row, ref = summary[name], summary[agent]
    for workload in WORKLOADS:
        if workload not in row or workload not in ref:
            continue
        runs: list[dict[str, Any]] = getattr(results, workload).get(name, [])
        theirs: list[dict[str, Any]] = getattr(results, workload).get(agent, [])
        cmp: dict[str, float] = {}
        if runs and len(runs) == len(theirs):
            cmp["rate"] = _median(
                [r["rate"] / t["rate"] for r, t in zip(runs, theirs, strict=True)]
            )
        mine, other = cpu_per_message(row[workload], 1.0), cpu_per_message(ref[workload], 1.0)
        if mine is not None and other:
            cmp["cpu"] = mine / other
        if row[workload].get("peak_rss") and ref[workload].get("peak_rss"):
            cmp["peak_rss"] = row[workload]["peak_rss"] / ref[workload]["peak_rss"]
        out[workload] = cmp
    if row.get("idle_rss") and ref.get("idle_rss"):
        out["idle_rss"] = row["idle_rss"] / ref["idle_rss"]
    return out


def cpu_per_message(agg: dict[str, Any], scale: float) -> float | None:
    """The relay's CPU seconds per message of a workload, times ``scale`` (1e3: ms, 1e6: µs);
    None for a row without a relay process."""
    cpu = agg.get("relay_cpu")
    return None if cpu is None else cpu / agg["count"] * scale


def _fmt(value: float | None, spec: str, na: str = "n/a") -> str:
    return na if value is None else format(value, spec)


def table(summary: dict[str, dict[str, Any]], s: Settings) -> str:
    mb = 1024 * 1024
    lines: list[str] = []
    flavour = "delta ADS" if s.delta else "SotW ADS"
    spread = s.rounds > 1
    w = max([14, *(len(name) + 2 for name in summary)])  # the arrangement column

    def ratio(agg: dict[str, Any], name: str) -> str:
        if "ratio" not in agg:
            return f"{'n/a':>11}" + (f"{'':>12}" if spread else "")
        text = f"{agg['ratio']:>10.2f}x"
        if spread and summary[name].get("baseline", "direct") == name:
            text += f"{'':>12}"
        elif spread:
            text += f"{agg['ratio_min']:>7.2f}-{agg['ratio_max']:.2f}"
        return text

    def mib(value: float | None) -> str:
        return _fmt(value / mb if value else None, ".0f")

    ratio_head = f"{'vs direct':>11}" + (f"{'(range)':>12}" if spread else "")

    def section(
        workload: str,
        title: Callable[[int], str],
        header: str,
        cells: Callable[[str, dict[str, Any], dict[str, Any], int], str],
    ) -> None:
        """One workload's table: a title, a header, a line per arrangement that ran it."""
        rows = [(name, row) for name, row in summary.items() if workload in row]
        if not rows:
            return
        size = rows[0][1][workload]["message_bytes"]
        if lines:
            lines.append("")
        lines.append(title(size))
        lines.append(f"{'arrangement':<{w}}{header}")
        for name, row in rows:
            lines.append(f"{name:<{w}}{cells(name, row, row[workload], size)}")

    def storm(name: str, row: dict[str, Any], st: dict[str, Any], size: int) -> str:
        return (
            f"{st['wall']:>8.2f}{st['mbps']:>7.0f}{st['rate']:>10.1f}{ratio(st, name)}"
            f"{_fmt(cpu_per_message(st, 1e3), '.2f'):>19}"
            f"{mib(row.get('idle_rss')):>14}{mib(st.get('peak_rss')):>6}"
            f"{mib(st.get('rss_after')):>7}"
        )

    def small(name: str, row: dict[str, Any], sm: dict[str, Any], size: int) -> str:
        added = sm.get("added_p50")
        return (
            f"{sm['wall']:>8.2f}{sm['rate']:>11.0f}{ratio(sm, name)}"
            f"{sm['p50'] * 1e6:>9.0f}{sm['p99'] * 1e6:>9.0f}"
            f"{_fmt(added and added * 1e6, '+.0f', '-'):>14}"
            f"{_fmt(cpu_per_message(sm, 1e6), '.0f'):>21}"
        )

    def burst(name: str, row: dict[str, Any], bu: dict[str, Any], size: int) -> str:
        return (
            f"{bu['wall']:>8.2f}{bu['rate']:>11.0f}{ratio(bu, name)}"
            f"{_fmt(cpu_per_message(bu, 1e6), '.0f'):>21}"
        )

    def over_idle(agg: dict[str, Any], size: int) -> str:
        """RSS before (idle), peak and their difference, in MB and as a share of the push."""
        over = agg.get("peak_over_before")
        per = f"{over / size:.2f}x" if over is not None else "n/a"
        return (
            f"{mib(agg.get('rss_before')):>13}{mib(agg.get('peak_rss')):>6}"
            f"{_fmt(over and over / mb, '.0f'):>11}{per:>11}"
            f"{_fmt(agg.get('streamed'), '.0f', '-'):>10}"
        )

    def cpu_and_rss(agg: dict[str, Any], size: int) -> str:
        """Relay CPU a push (ms), then ``over_idle``: the big-push tables' right half."""
        return f"{_fmt(cpu_per_message(agg, 1e3), '.1f'):>19}{over_idle(agg, size)}"

    def big(name: str, row: dict[str, Any], bg: dict[str, Any], size: int) -> str:
        return (
            f"{bg['wall']:>8.2f}{_fmt(bg.get('mbps'), '.0f'):>7}{bg['rate']:>10.2f}"
            f"{ratio(bg, name)}{cpu_and_rss(bg, size)}"
        )

    def peak(name: str, row: dict[str, Any], pk: dict[str, Any], size: int) -> str:
        return f"{pk['wall']:>8.2f}{ratio(pk, name)}{cpu_and_rss(pk, size)}"

    section(
        "storm",
        lambda size: (
            f"push storm: {s.storm} x {size / 1e6:.2f} MB CDS ({flavour}), each read and ACKed"
        ),
        f"{'wall s':>8}{'MB/s':>7}{'pushes/s':>10}{ratio_head}"
        f"{'relay CPU ms/push':>19}{'RSS MB: idle':>14}{'peak':>6}{'after':>7}",
        storm,
    )
    section(
        "small",
        lambda size: (
            f"small updates: {s.small} x ~{size} B EDS ({flavour}), "
            "response -> ACK before the next (latency as the control plane sees it)"
        ),
        f"{'wall s':>8}{'updates/s':>11}{ratio_head}"
        f"{'p50 us':>9}{'p99 us':>9}{'added p50 us':>14}{'relay CPU us/update':>21}",
        small,
    )
    section(
        "burst",
        lambda size: (
            f"pushed updates: {s.burst} x ~{size} B EDS ({flavour}), "
            "back to back as istiod pushes, each read and ACKed (throughput under load)"
        ),
        f"{'wall s':>8}{'updates/s':>11}{ratio_head}{'relay CPU us/update':>21}",
        burst,
    )
    over_head = f"{'RSS MB: idle':>13}{'peak':>6}{'over idle':>11}{'/ message':>11}{'streamed':>10}"
    for workload in ("peak_big", "peak_huge"):
        section(
            workload,
            lambda size: (
                f"one big push: {size / 1e6:.1f} MB CDS ({flavour}), ACKed; relay peak RSS "
                "over idle (its RSS just before; max over rounds; target <= 16 MB)"
            ),
            f"{'wall s':>8}{ratio_head}{'relay CPU ms/push':>19}{over_head}",
            peak,
        )
    section(
        "big",
        lambda size: (
            f"big pushes: {s.big} x {size / 1e6:.1f} MB CDS ({flavour}), back to back as "
            "istiod pushes, each read and ACKed (target >= 0.85x direct)"
        ),
        f"{'wall s':>8}{'MB/s':>7}{'pushes/s':>10}{ratio_head}{'relay CPU ms/push':>19}{over_head}",
        big,
    )
    versus_agent(lines, summary, w)
    notes = _footnotes(summary)
    if notes:
        lines.append("")
        for note in notes:
            lines.extend(textwrap.wrap(note, 100, subsequent_indent="  "))
    peers = [
        f"  {name:<{w}}"
        + "".join(
            f"  {wl}: control plane {row[wl]['cp_cpu']:.2f}s, client {row[wl]['client_cpu']:.2f}s"
            for wl in WORKLOADS
            if wl in row
        )
        for name, row in summary.items()
    ]
    if peers:
        lines.append("")
        lines.append("peer CPU seconds (the relay shares the CPUs with them):")
        lines.extend(peers)
    cores = [f"{n}={r['core']}" for n, r in summary.items() if r.get("core")]
    if cores:
        lines.append(f"relay cores: {', '.join(cores)}")
    return "\n".join(lines)


def versus_agent(lines: list[str], summary: dict[str, dict[str, Any]], w: int) -> None:
    """The rows against the stock pilot-agent, as the issue's targets put them."""
    rows = [(name, row["vs_agent"]) for name, row in summary.items() if "vs_agent" in row]
    if not rows:
        return
    lines.append("")
    lines.append(
        "against the stock pilot-agent (targets: throughput >= 1.00x; relay CPU per message "
        "<= 0.50x; idle and peak RSS <= 1.00x)"
    )
    lines.append(
        f"{'arrangement':<{w}}{'vs':<17}{'workload':<9}{'throughput':>11}{'CPU/msg':>9}"
        f"{'peak RSS':>10}{'idle RSS':>10}"
    )

    for name, vs in rows:
        first = True
        for workload in WORKLOADS:
            if workload not in vs:
                continue
            cmp = vs[workload]
            idle = times(vs.get("idle_rss")) if first else ""
            lines.append(
                f"{name if first else '':<{w}}{vs['agent'] if first else '':<17}{workload:<9}"
                f"{times(cmp.get('rate')):>11}{times(cmp.get('cpu')):>9}"
                f"{times(cmp.get('peak_rss')):>10}{idle:>10}"
            )
            first = False


def _footnotes(summary: dict[str, dict[str, Any]]) -> list[str]:
    notes: list[str] = []
    if any("small" in row for row in summary.values()):
        notes.append(
            "added p50: the row's p50 minus its baseline's, per round, then the median; the "
            "response -> ACK round trip crosses the relay twice (response down, ACK up): the "
            'issue\'s "added latency, request -> response, p50 <= 50 us"'
        )
    if any(w in row for row in summary.values() for w in BIG_WORKLOADS):
        notes.append(
            "big pushes: idle is the relay's RSS just before the workload, at rest; peak is its "
            "VmHWM, reset before the workload; streamed: responses the relay wrote to the client "
            f"as they arrived (its {STREAMED_METRIC}; '-': not an xdsfast row, or a build "
            "without the counter)"
        )
    tls_rows = [n for n in summary if n.endswith(TLS_SUFFIX) and n != "direct-tls"]
    if tls_rows:
        base = {summary[n].get("baseline") for n in tls_rows}
        how = (
            "direct-tls (client -> control plane over TLS: the same TLS hops)"
            if base == {"direct-tls"}
            else "plaintext direct: the ratio includes TLS's own cost (add direct-tls to --only)"
        )
        notes.append(
            f"{', '.join(tls_rows)}: TLS to the control plane (self-signed CA, h2 ALPN); "
            f"'vs direct' and 'added' are against {how}"
        )
    return notes


def write_png(
    summary: dict[str, dict[str, Any]], s: Settings, info: dict[str, Any], path: str
) -> None:
    """Ratios against direct (storm, small updates) and relay CPU per update, per arrangement.

    matplotlib is imported here, by name: neither the benchmark nor the type check
    (CI installs the test extra only) needs it.
    """
    importlib.import_module("matplotlib").use("Agg")  # files only, no display
    plt: Any = importlib.import_module("matplotlib.pyplot")

    names = list(summary)
    sizes = {
        w: next(summary[n][w]["message_bytes"] for n in names if w in summary[n])
        for w in ("storm", "small", "burst", "big")
        if any(w in summary[n] for n in names)
    }
    panels: list[tuple[str, str, str]] = []
    if "storm" in sizes:
        what = f"{s.storm} x {sizes['storm'] / 1e6:.0f} MB CDS"
        panels.append(("storm", "ratio", f"push storm ({what})\npushes/s vs direct"))
    if "small" in sizes:
        what = f"{s.small} x {sizes['small']} B EDS"
        panels.append(("small", "ratio", f"small updates ({what})\nupdates/s vs direct"))
        panels.append(("small", "cpu", "relay CPU per update + its ACK\n(µs, lower is better)"))
    if "burst" in sizes:
        what = f"{s.burst} x {sizes['burst']} B EDS pushed"
        panels.append(("burst", "ratio", f"pushed updates ({what})\nupdates/s vs direct"))
        panels.append(("burst", "cpu", "relay CPU per pushed update + ACK\n(µs, lower is better)"))
    if "big" in sizes:
        what = f"{s.big} x {sizes['big'] / 1e6:.0f} MB CDS pushed"
        panels.append(("big", "ratio", f"big pushes ({what})\npushes/s vs direct"))
    if not panels:
        raise BenchError("no storm or small-update results to chart")
    cols = min(3, len(panels))  # three a row: five panels stay readable
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 4.6 * rows), squeeze=False)
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    colours, relays = {}, 0
    for name in names:  # the baselines grey, every relay its own colour in every panel
        if name.startswith("direct"):
            colours[name] = "0.55" if name == "direct" else "0.75"
        else:
            colours[name], relays = f"C{relays % 10}", relays + 1
    for ax, (workload, kind, title) in zip(axes.flat, panels, strict=False):
        labels, values, lows, highs = [], [], [], []
        for name in names:
            agg = summary[name].get(workload)
            if not agg:
                continue
            if kind == "ratio" and "ratio" in agg:
                value, low, high = agg["ratio"], agg["ratio_min"], agg["ratio_max"]
            elif kind == "cpu" and (per := cpu_per_message(agg, 1e6)) is not None:
                value = low = high = per
            else:
                continue
            labels.append(name)
            values.append(value)
            lows.append(value - low)
            highs.append(high - value)
        x = list(range(len(labels)))
        ax.bar(x, values, color=[colours[n] for n in labels])
        if kind == "ratio":
            if s.rounds > 1:
                ax.errorbar(x, values, yerr=[lows, highs], fmt="none", ecolor="black", capsize=4)
            ax.axhline(1.0, color="black", linestyle="--", linewidth=0.8)
        top = max([v + h for v, h in zip(values, highs, strict=True)], default=1.0)
        for xi, value, high in zip(x, values, highs, strict=True):  # above the range bar
            text = f"{value:.2f}x" if kind == "ratio" else f"{value:.0f}"
            ax.text(xi, value + high + top * 0.02, text, ha="center", va="bottom", fontsize=9)
        ax.set_ylim(0, top * 1.15)
        ax.set_xticks(x, labels, rotation=25, ha="right", fontsize=9)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    tls = [n for n in names if n.endswith(TLS_SUFFIX) and n != "direct-tls"]
    vs_tls = any(summary[n].get("baseline", "direct") != "direct" for n in tls)
    base = " (TLS rows vs direct-tls)" if vs_tls else ""
    fig.suptitle(
        f"xdsfast relay vs direct, {'delta' if s.delta else 'SotW'} ADS{base}; "
        + (f"{s.rounds} rounds: medians, whiskers the range" if s.rounds > 1 else "1 round")
        + "\n"
        f"{info['nproc']} CPUs ({info['cpus_usable']} usable), {info['cpu_model']}, "
        f"Python {info['python']}, load {info['loadavg'][0]:.2f}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----- main --------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="20 pushes, 2000 updates (< 1 min)")
    p.add_argument("--storm", type=int, help="pushes in the storm (default 100; quick 20)")
    p.add_argument("--small", type=int, help="small updates (default 20000; quick 2000)")
    p.add_argument(
        "--burst", type=int, help="small updates pushed back to back (default 20000; quick 2000)"
    )
    p.add_argument("--delta", action="store_true", help="use DeltaAggregatedResources")
    p.add_argument(
        "--big",
        type=int,
        default=0,
        metavar="N",
        help=f"also N pushes of {BIG_PUSH_BYTES / 1e6:.0f} MB back to back (throughput vs "
        f"direct), and one of {BIG_PUSH_BYTES / 1e6:.0f} MB and one of "
        f"{HUGE_PUSH_BYTES / 1e6:.0f} MB, each ACKed: the relay's peak RSS over idle "
        "(default 0: skipped)",
    )
    # The big pushes' size in bytes (the huge one is 5 times it): for the smoke test only.
    p.add_argument("--big-size", type=int, default=BIG_PUSH_BYTES, help=argparse.SUPPRESS)
    p.add_argument(
        "--rounds",
        type=int,
        help="repeat all arrangements, report medians and the ratio's range (default 3; quick 2)",
    )
    p.add_argument(
        "--only",
        default=",".join(DEFAULT_ARRANGEMENTS),
        help=f"comma-separated, from {','.join(ARRANGEMENTS)} "
        f"(default {','.join(DEFAULT_ARRANGEMENTS)})",
    )
    p.add_argument(
        "--relay-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment for every relay process, e.g. MALLOC_ARENA_MAX=2 (repeatable)",
    )
    p.add_argument("--json", metavar="PATH", help="also write all results as JSON")
    p.add_argument(
        "--png",
        metavar="PATH",
        help="also chart the ratios vs direct and the relay CPU per update (needs matplotlib)",
    )
    p.add_argument("--keep-logs", action="store_true", help="keep the temp dir with child logs")
    p.add_argument(
        "--from-json",
        metavar="PATH",
        help="run nothing: print the tables (and --png) of an earlier --json run",
    )
    args = p.parse_args(argv)
    names = tuple(n.strip() for n in args.only.split(",") if n.strip())
    unknown = set(names) - set(ARRANGEMENTS)
    if unknown:
        p.error(f"unknown arrangement(s): {', '.join(sorted(unknown))}")
    args.arrangements = names
    bad = [item for item in args.relay_env if "=" not in item]
    if bad:
        p.error(f"--relay-env wants KEY=VALUE, not {bad[0]!r}")
    return args


def _have(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # ValueError: blocked in sys.modules
        return False


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally blocks that stop children


@contextlib.contextmanager
def workdir(keep: bool) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="relay-bench-"))
    try:
        yield path
    finally:
        if keep:
            print(f"logs kept in {path}", file=sys.stderr)
        else:
            shutil.rmtree(path, ignore_errors=True)


def run_bench(settings: Settings, keep_logs: bool = False) -> Results:
    """Every round of every arrangement, against one control plane and client."""
    results = Results()
    with workdir(keep_logs) as tmp, Children(tmp) as children:
        bench = Bench(settings, children, tmp)
        for round_no in range(settings.rounds):
            if settings.rounds > 1:
                print(f"round {round_no + 1}/{settings.rounds}", file=sys.stderr)
            for name in settings.arrangements:
                bench.arrangement(name, results)
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.png and not _have("matplotlib"):  # one line, before the run rather than after it
        print(f"relay_bench: error: --png needs matplotlib ({MATPLOTLIB_HINT})", file=sys.stderr)
        return 2
    if args.from_json:
        payload = json.loads(Path(args.from_json).read_text())
        saved = dict(payload["settings"], arrangements=tuple(payload["settings"]["arrangements"]))
        settings = Settings(**saved)
        report(payload["summary"], settings, payload["machine"], payload["command"], None)
        return write_chart(args.png, payload["summary"], settings, payload["machine"])
    settings = Settings(
        storm=args.storm if args.storm is not None else (20 if args.quick else 100),
        small=args.small if args.small is not None else (2000 if args.quick else 20000),
        burst=args.burst if args.burst is not None else (2000 if args.quick else 20000),
        delta=args.delta,
        rounds=max(1, args.rounds if args.rounds is not None else (2 if args.quick else 3)),
        arrangements=args.arrangements,
        relay_env=dict(item.split("=", 1) for item in args.relay_env),
        big=max(0, args.big),
        big_bytes=max(1, args.big_size),
        huge_bytes=max(1, args.big_size) * (HUGE_PUSH_BYTES // BIG_PUSH_BYTES),
    )
    signal.signal(signal.SIGTERM, _terminate)
    command = shlex.join([Path(sys.executable).name, *sys.argv])
    info = machine()
    started = time.monotonic()
    try:
        results = run_bench(settings, args.keep_logs)
    except BenchError as exc:
        print(f"relay_bench: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("relay_bench: interrupted; children stopped", file=sys.stderr)
        return 130
    elapsed = time.monotonic() - started
    summary = summarize(results, settings.arrangements)
    report(summary, settings, info, command, elapsed)
    if args.json:
        payload = {
            "command": command,
            "machine": info,
            "settings": settings.__dict__,
            "elapsed_s": elapsed,
            "summary": summary,
            "runs": {
                **{w: getattr(results, w) for w in WORKLOADS},
                "idle_rss": results.idle_rss,
            },
        }
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
    return write_chart(args.png, summary, settings, info)


def times(value: float | None) -> str:
    """A ratio as the tables print it ("n/a" where a side has no figure)."""
    return "n/a" if value is None else f"{value:.2f}x"


def machine_line(info: dict[str, Any]) -> str:
    """The machine a run's figures came from, and how loaded it was (shared: it matters)."""
    end = f", at end {info['loadavg_end'][0]:.2f}" if "loadavg_end" in info else ""
    return (
        f"machine: {info['nproc']} CPUs ({info['cpus_usable']} usable), {info['cpu_model']}, "
        f"Linux {info['kernel']}, load avg (1 min) at start {info['loadavg'][0]:.2f}{end}"
    )


def report(
    summary: dict[str, dict[str, Any]],
    settings: Settings,
    info: dict[str, Any],
    command: str,
    elapsed: float | None,
) -> None:
    took = f"; run time {elapsed:.0f}s" if elapsed is not None else ""
    print()
    print(f"command: {command}")
    print(machine_line(info))
    print(
        f"python {info['python']}, grpcio {info['grpcio']}, protobuf {info['protobuf']}, "
        f"uvloop {info['uvloop']}; rounds: {settings.rounds} (medians){took}"
    )
    print()
    print(table(summary, settings))


def write_chart(
    path: str | None, summary: dict[str, dict[str, Any]], s: Settings, info: dict[str, Any]
) -> int:
    """``--png``: the exit status; a missing matplotlib is one line, not a traceback."""
    if not path:
        return 0
    try:
        write_png(summary, s, info, path)
    except ImportError as exc:
        print(f"relay_bench: error: --png needs matplotlib ({exc})", file=sys.stderr)
        return 1
    except (BenchError, OSError, ValueError) as exc:
        print(f"relay_bench: error: --png: {exc}", file=sys.stderr)
        return 1
    print(f"chart: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
