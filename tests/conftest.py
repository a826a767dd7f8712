"""Fixtures for the real xDS peers (control plane, backend, short temp dirs)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from twins import PARAMS, Cores
from wasm_modules import ModuleServer

from xdsfast.agent import Agent
from xdsfast.config import Config
from xdsfast.peers.adsclient import AdsClient
from xdsfast.peers.backend import Backend
from xdsfast.peers.controlplane import ControlPlane


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    """pytest-asyncio's hook: every async test runs on uvloop, as xdsfast does in production."""
    import uvloop

    return {"uvloop": uvloop.new_event_loop}


@pytest.fixture(params=PARAMS)
def twins(request: pytest.FixtureRequest) -> Cores:
    """The pure-Python twins, then (where built) the compiled cores: tests/twins.py."""
    cores: Cores = request.param
    return cores


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A temp dir under /tmp with a short name: Unix socket paths must stay <= 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="xf", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest_asyncio.fixture
async def control_plane() -> AsyncIterator[ControlPlane]:
    """A started istiod stand-in on 127.0.0.1 (kernel-picked port)."""
    cp = ControlPlane("127.0.0.1:0")
    await cp.start()
    try:
        yield cp
    finally:
        await cp.stop()


@pytest_asyncio.fixture
async def backend() -> AsyncIterator[Backend]:
    """The sample HTTP backend on 127.0.0.1 (kernel-picked port)."""
    async with Backend() as server:
        yield server


class XdsfastProcess:
    """``xdsfast run`` as a real process, stopped (SIGTERM) after the test."""

    def __init__(self, args: list[str], env: dict[str, str], socket_path: Path) -> None:
        self.args = args
        self.env = env
        self.socket_path = socket_path
        self.proc: asyncio.subprocess.Process | None = None
        self.stderr = b""
        self.status_port: int | None = None  # the status server's port, from its log line

    async def start(self, timeout: float = 20.0) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "xdsfast",
            "run",
            *self.args,
            env=self.env,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            cwd=self.socket_path.parent,  # Istio's relative defaults land in the temp dir
        )
        assert self.proc.stderr is not None
        lines: list[bytes] = []
        try:
            async with asyncio_timeout(timeout):
                while b"xDS proxy serving" not in (lines[-1] if lines else b""):
                    line = await self.proc.stderr.readline()
                    if not line:
                        break
                    lines.append(line)
        except TimeoutError:
            pass
        self.stderr = b"".join(lines)
        if b"xDS proxy serving" not in self.stderr:
            raise RuntimeError(f"xdsfast did not start:\n{self.stderr.decode()}")
        status = _STATUS_FIELD.search(self.stderr)
        if status is not None:
            self.status_port = int(status.group(1))
        self._drain = asyncio.ensure_future(self._read_rest())

    async def _read_rest(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        while line := await self.proc.stderr.readline():
            self.stderr += line

    async def stop(self, timeout: float = 10.0, sig: int = signal.SIGTERM) -> int:
        """Signal (SIGTERM by default) and wait; returns the exit code."""
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(sig)
        try:
            code = await asyncio.wait_for(self.proc.wait(), timeout)
        except asyncio.TimeoutError:
            self.proc.kill()
            raise
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._drain, timeout)
        return code


# The status server's "status=HOST:PORT" field, in a text or a JSON log line.
_STATUS_FIELD = re.compile(
    rb'status server listening[^\n]*?(?:\bstatus=|"status":\s*")[^\s"]*:(\d+)'
)


@contextlib.asynccontextmanager
async def asyncio_timeout(seconds: float) -> AsyncIterator[None]:
    """``asyncio.timeout`` for Python 3.10 too: raises the builtin TimeoutError."""
    task = asyncio.current_task()
    assert task is not None
    handle = asyncio.get_running_loop().call_later(seconds, task.cancel)
    try:
        yield
    except asyncio.CancelledError:
        raise TimeoutError(f"timed out after {seconds}s") from None
    finally:
        handle.cancel()


XdsfastFactory = Callable[..., Awaitable[XdsfastProcess]]


@pytest.fixture(scope="session", params=["grpcio", "fast"])
def engine(request: pytest.FixtureRequest) -> str:
    """The transport engine under test: every relay test runs on both."""
    return str(request.param)


@pytest_asyncio.fixture
async def xdsfast_run(short_tmp: Path, engine: str) -> AsyncIterator[XdsfastFactory]:
    """Start ``xdsfast run --plaintext --xds-socket <tmp>/XDS ARGS...`` as a process."""
    started: list[XdsfastProcess] = []

    async def start(
        *args: str, env: dict[str, str] | None = None, plaintext: bool = True
    ) -> XdsfastProcess:
        socket_path = short_tmp / f"p{len(started)}" / "XDS"
        socket_path.parent.mkdir(exist_ok=True)
        full = ["--plaintext"] if plaintext else []
        full += ["--xds-socket", str(socket_path), "--status-address", "127.0.0.1:0", *args]
        environ = {**os.environ, "XDSFAST_ENGINE": engine, **(env or {})}
        proc = XdsfastProcess(full, environ, socket_path)
        await proc.start()
        started.append(proc)
        return proc

    yield start
    for proc in started:
        with contextlib.suppress(Exception):
            await proc.stop()


AgentFactory = Callable[..., Awaitable[Agent]]


@pytest_asyncio.fixture
async def make_agent(short_tmp: Path, engine: str) -> AsyncIterator[AgentFactory]:
    """Start an in-process agent: ``await make_agent(discovery_address=..., ...)``.

    Defaults keep tests apart: plaintext, DNS on a free port, the status server on a
    free port, a socket in the test's temp dir, the engine under test."""
    agents: list[Agent] = []

    async def start(**settings: Any) -> Agent:
        values: dict[str, Any] = {
            "plaintext": True,
            "dns_enabled": True,
            "dns_address": "127.0.0.1:0",
            "xds_socket": str(short_tmp / f"XDS{len(agents)}"),
            "status_address": "127.0.0.1:0",
            "engine": engine,
        }
        values.update(settings)
        agent = Agent(Config(**values))
        await agent.start()
        agents.append(agent)
        return agent

    yield start
    for agent in agents:
        await agent.stop()


@pytest_asyncio.fixture
async def clients() -> AsyncIterator[list[AdsClient]]:
    """Clients a test opens are closed after it."""
    opened: list[AdsClient] = []
    yield opened
    for client in opened:
        await client.close()


@pytest_asyncio.fixture
async def modules() -> AsyncIterator[ModuleServer]:
    """A loopback server of Wasm modules (tests/wasm_modules.py), stopped after the test."""
    server = ModuleServer()
    await server.start()
    yield server
    await server.stop()
