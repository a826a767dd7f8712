"""What a serving agent has loaded: protobuf only once it builds or decodes a message.

An agent that consumes nothing (DNS and PCDS off, Istio's defaults) forwards opaque bytes
and never needs protobuf; importing it costs ~4 MB of idle RSS, the gap between xdsfast's
idle RSS and the stock pilot-agent's (README, "Against the stock pilot-agent").
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HEAVY = ("google.protobuf", "xdsfast.xds_pb2", "xdsfast.nds_pb2", "grpc")

SCRIPT = """
import asyncio, sys
from xdsfast.agent import Agent
from xdsfast.config import Config

async def main() -> None:
    agent = Agent(Config(
        plaintext=True, dns_enabled={dns}, dns_address="127.0.0.1:0",
        xds_socket=sys.argv[1], status_address="127.0.0.1:0", engine="{engine}",
    ))
    await agent.start()
    try:
        heavy = {heavy!r}
        print(sorted(m for m in heavy if m in sys.modules))
    finally:
        await agent.stop()

asyncio.run(main())
"""


def loaded_after_start(tmp: Path, *, dns: bool, engine: str) -> str:
    """Which of HEAVY an agent started in a fresh interpreter has loaded."""
    script = SCRIPT.format(dns=dns, engine=engine, heavy=HEAVY)
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp / "XDS")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip().splitlines()[-1]


def test_a_serving_agent_that_consumes_nothing_has_no_protobuf(short_tmp: Path) -> None:
    for engine in ("fast", "grpcio"):  # grpc.aio needs grpcio, not protobuf
        expected = "[]" if engine == "fast" else "['grpc']"
        assert loaded_after_start(short_tmp, dns=False, engine=engine) == expected, engine
