"""The allocator policy: freed push buffers stay for the next push and go back later."""

from __future__ import annotations

import asyncio
import json
import resource
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import XdsfastFactory, asyncio_timeout
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2

from xdsfast import heap
from xdsfast.config import Config, ConfigError
from xdsfast.peers.adsclient import AdsClient
from xdsfast.peers.controlplane import ControlPlane
from xdsfast.periodic import Periodic

glibc_only = pytest.mark.skipif(not heap.supported(), reason="the policy is glibc's")
MiB = 1 << 20
CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"

# Run in a fresh interpreter: the policy is process-wide.  RSS from /proc after a 20 MiB
# buffer (every page written) is freed, then after release().
_SCRIPT = """
import json, resource, sys
from xdsfast import heap
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()
held = sys.argv[1] == "hold" and heap.hold()
base = rss()
buf = b"x" * (20 << 20)
grown = rss()
del buf
freed = rss()
released = heap.release()
print(json.dumps({"held": held, "grown": grown - base, "freed": freed - base,
                  "released": rss() - base}))
"""


def _heap_run(mode: str) -> dict[str, int]:
    out = subprocess.run(
        [sys.executable, "-c", _SCRIPT, mode], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    result: dict[str, int] = json.loads(out.stdout)
    return result


@glibc_only
def test_a_freed_buffer_is_kept_until_released() -> None:
    held = _heap_run("hold")
    assert held["held"]
    assert held["grown"] >= 19 * MiB
    assert held["freed"] >= 19 * MiB  # kept for the next push: no page faults then
    assert held["released"] < 4 * MiB  # and given back when asked


@glibc_only
def test_without_the_policy_glibc_gives_a_big_buffer_back_at_once() -> None:
    """The default this module changes (so the test above can tell them apart)."""
    default = _heap_run("default")
    assert default["grown"] >= 19 * MiB
    assert default["freed"] < 4 * MiB


@pytest.mark.parametrize(
    ("env", "tuned"),
    [
        ({}, None),
        ({"MALLOC_ARENA_MAX": "2"}, None),
        ({"MALLOC_TRIM_THRESHOLD_": "0"}, "MALLOC_TRIM_THRESHOLD_"),
        ({"MALLOC_MMAP_THRESHOLD_": "65536"}, "MALLOC_MMAP_THRESHOLD_"),
        ({"MALLOC_TOP_PAD_": "0"}, "MALLOC_TOP_PAD_"),
        ({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"}, "GLIBC_TUNABLES"),
        ({"GLIBC_TUNABLES": "glibc.rtld.optional_static_tls=512"}, None),
    ],
)
def test_malloc_tuned_by_the_operator_is_left_alone(env: dict[str, str], tuned: str | None) -> None:
    assert heap.operator_tuned(env) == tuned
    config = Config.build({}, {"XDS_ROOT_CA": "SYSTEM", **env})
    assert config.heap_release_interval == (0.0 if tuned else 5.0)


@pytest.mark.parametrize(("value", "seconds"), [("", 5.0), ("0", 0.0), ("2s", 2.0), ("1m", 60.0)])
def test_release_interval_from_the_environment(value: str, seconds: float) -> None:
    env = {"XDS_ROOT_CA": "SYSTEM", "XDSFAST_HEAP_RELEASE_INTERVAL": value}
    assert Config.build({}, env).heap_release_interval == seconds


def test_a_bad_release_interval_is_one_clear_error() -> None:
    env = {"XDS_ROOT_CA": "SYSTEM", "XDSFAST_HEAP_RELEASE_INTERVAL": "soon"}
    with pytest.raises(ConfigError, match="XDSFAST_HEAP_RELEASE_INTERVAL='soon' is not a dur"):
        Config.build({}, env)


@pytest.mark.asyncio
async def test_periodic_runs_every_interval_until_stopped() -> None:
    calls: list[float] = []
    loop = asyncio.get_running_loop()
    releaser = Periodic(0.01, lambda: calls.append(loop.time()))
    releaser.start()
    releaser.start()  # a second start changes nothing
    async with asyncio_timeout(10):
        while len(calls) < 3:
            await asyncio.sleep(0.01)
    await releaser.stop()
    await releaser.stop()  # twice is fine
    releaser.start()  # and it starts again
    async with asyncio_timeout(10):
        while len(calls) < 5:
            await asyncio.sleep(0.01)
    await releaser.stop()


def _rss(pid: int) -> int:
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * resource.getpagesize()


# The fast engine only: with grpcio, grpc-core's own allocations sometimes keep the last
# message's memory in use (RSS +12 MiB in about 1 run in 10 with the release, most runs
# without it), which no trim can give back.
@glibc_only
@pytest.mark.asyncio
@pytest.mark.parametrize("engine", ["fast"])
async def test_the_relay_gives_a_big_push_back_after_the_interval(
    xdsfast_run: XdsfastFactory, control_plane: ControlPlane
) -> None:
    """Held between pushes, but not for ever: the relay's RSS returns after a 12 MiB push."""
    cp = control_plane
    proc = await xdsfast_run(
        "--discovery-address", cp.address, env={"XDSFAST_HEAP_RELEASE_INTERVAL": "200ms"}
    )
    assert proc.proc is not None
    async with asyncio_timeout(10):
        while b"freed heap memory is kept for reuse" not in proc.stderr:
            await asyncio.sleep(0.02)
    async with AdsClient(f"unix:{proc.socket_path}") as client:
        await client.request(CLUSTER)
        await cp.wait_for(lambda: cp.active_streams == 1)
        before = _rss(proc.proc.pid)
        blob = any_pb2.Any(type_url=CLUSTER, value=b"c" * (12 * MiB))
        (nonce,) = cp.push_raw(CLUSTER, [blob])
        pushed: discovery_pb2.DiscoveryResponse = await client.recv()
        assert pushed.nonce == nonce and len(pushed.resources[0].value) == 12 * MiB
        await client.ack(pushed)
        await cp.wait_for(lambda: any(r.is_ack for r in cp.requests))
        seen: list[int] = []
        try:
            async with asyncio_timeout(15):
                while (rss := _rss(proc.proc.pid)) > before + 6 * MiB:
                    seen.append(rss)
                    await asyncio.sleep(0.05)
        except TimeoutError:
            pytest.fail(
                f"RSS {before // MiB} MiB before the push, "
                f"{seen[0] // MiB} -> {seen[-1] // MiB} MiB after it"
            )
