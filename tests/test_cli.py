"""The command line, run as a real process."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path

import grpc
import orjson
import pytest
from conftest import XdsfastFactory

import xdsfast
from xdsfast import _ext, wire
from xdsfast.peers.adsclient import AdsClient
from xdsfast.peers.controlplane import ControlPlane
from xdsfast.typeurls import CLUSTER


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "xdsfast", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def test_help_lists_subcommands() -> None:
    out = run_cli("--help")
    assert out.returncode == 0
    for command in ("version", "run", "demo"):
        assert command in out.stdout


def test_version_reports_package_and_core() -> None:
    out = run_cli("version")
    assert out.returncode == 0
    first, *cores = out.stdout.strip().splitlines()
    assert first == f"xdsfast {xdsfast.__version__} (core: {_ext.summary()})"
    # one line a compiled core, as the one switch chose it
    assert [line.split() for line in cores] == [
        [name, kind, _ext.CORES[name] + ("_py" if kind == "python" else "")]
        for name, kind in _ext.implementations().items()
    ]
    assert _ext.implementation("_core") == wire.IMPLEMENTATION


def test_version_reports_the_twin_when_forced() -> None:
    out = run_cli("version", env=dict(os.environ, XDSFAST_NO_EXTENSIONS="1"))
    first, *cores = out.stdout.strip().splitlines()
    assert first.endswith("(core: python)")
    assert [line.split()[:2] for line in cores] == [[name, "python"] for name in _ext.CORES]


@pytest.mark.parametrize("args", [("bogus",), ("--bogus",), (), ("version", "--nope")], ids=str)
def test_bad_usage_is_one_line_exit_2(args: tuple[str, ...]) -> None:
    out = run_cli(*args)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("xdsfast: error: ")
    assert "Traceback" not in out.stderr


# -- xdsfast run ------------------------------------------------------------------------------

BAD_RUN = {
    "discovery address": (["--plaintext", "--discovery-address", "nohost"], {}),
    "discovery port": (["--plaintext", "--discovery-address", "h:99999"], {}),
    "log level": (["--plaintext", "--log-level", "loud"], {}),
    "log format": (["--plaintext", "--log-format", "xml"], {}),
    "xds listen": (["--plaintext", "--xds-listen", "localhost"], {}),
    "dns capture": (["--plaintext"], {"ISTIO_META_DNS_CAPTURE": "maybe"}),
    "keepalive": (["--plaintext"], {"GRPC_KEEPALIVE_INTERVAL": "soon"}),
    "max recv": (["--plaintext"], {"ISTIO_GPRC_MAXRECVMSGSIZE": "-4"}),
    "envoy send buffer": (["--plaintext"], {"XDSFAST_ENVOY_SEND_BUFFER": "lots"}),
    "proxy config": (["--plaintext"], {"PROXY_CONFIG": "discoveryAddress: [unclosed"}),
    "proxy config type": (["--plaintext"], {"PROXY_CONFIG": "[1, 2]"}),
    "xds header": (["--plaintext"], {"XDS_HEADER_BAD NAME": "x"}),
    "no root CA for TLS": ([], {}),
    "unknown flag": (["--plaintext", "--frobnicate"], {}),
}


@pytest.mark.parametrize(("args", "env"), BAD_RUN.values(), ids=BAD_RUN.keys())
def test_run_rejects_bad_input_in_one_line(
    args: list[str], env: dict[str, str], tmp_path: Path
) -> None:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("XDS_HEADER_", "PROXY_"))}
    out = run_cli("run", "--xds-socket", str(tmp_path / "XDS"), *args, env={**full_env, **env})
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("xdsfast: error: ")
    assert not (tmp_path / "XDS").exists()


def test_run_with_tls_needs_istiods_root_ca(tmp_path: Path) -> None:
    out = run_cli("run", "--xds-socket", str(tmp_path / "XDS"))
    assert "istiod's root CA ./var/run/secrets/istio/root-cert.pem does not exist" in out.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_run_serves_and_stops_cleanly_on_a_signal(
    xdsfast_run: XdsfastFactory, control_plane: ControlPlane, sig: int
) -> None:
    relay = await xdsfast_run("--discovery-address", control_plane.address)
    path = relay.socket_path
    assert stat.S_ISSOCK(path.stat().st_mode)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666
    client = AdsClient(f"unix:{path}")
    await client.open()
    await client.request(CLUSTER)
    await control_plane.wait_for_request(lambda r: r.type_url == CLUSTER)
    assert await relay.stop(sig=sig) == 0
    # Drained: Envoy's stream ended with OK (it reconnects), istiod's stream is gone.
    assert (await client.wait_closed()).code == grpc.StatusCode.OK
    await control_plane.wait_for(lambda: control_plane.active_streams == 0)
    await client.close()
    assert not path.exists()
    assert b"Traceback" not in relay.stderr


async def test_run_replaces_a_stale_socket_and_creates_the_directory(
    xdsfast_run: XdsfastFactory, control_plane: ControlPlane, short_tmp: Path
) -> None:
    stale = short_tmp / "p0" / "XDS"
    stale.parent.mkdir(exist_ok=True)
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(stale))  # left behind by a previous agent: nobody listens
    relay = await xdsfast_run("--discovery-address", control_plane.address)
    assert relay.socket_path == stale
    client = AdsClient(f"unix:{stale}")
    await client.open()
    await client.request(CLUSTER)
    await control_plane.wait_for_request(lambda r: r.type_url == CLUSTER)
    await client.close()


async def test_run_takes_istiod_and_plaintext_from_proxy_config(
    xdsfast_run: XdsfastFactory, control_plane: ControlPlane, short_tmp: Path
) -> None:
    proxy_config = f"discoveryAddress: {control_plane.address}\ncontrolPlaneAuthPolicy: NONE\n"
    relay = await xdsfast_run("--log-format", "json", env={"PROXY_CONFIG": proxy_config})
    client = AdsClient(f"unix:{relay.socket_path}")
    await client.open()
    await client.request(CLUSTER)
    await control_plane.wait_for_request(lambda r: r.type_url == CLUSTER)
    await client.close()
    assert await relay.stop() == 0
    entries = [orjson.loads(line) for line in relay.stderr.splitlines() if line.startswith(b"{")]
    assert entries, relay.stderr
    assert {"time", "level", "scope", "msg"} <= set(entries[0])
    assert any(e["scope"] == "xdsproxy" and e["msg"] == "Envoy stream established" for e in entries)


def test_run_reports_a_listener_it_cannot_open(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = run_cli(
            "run",
            "--plaintext",
            "--xds-socket",
            str(tmp_path / "XDS"),
            "--xds-listen",
            f"127.0.0.1:{port}",
        )
    assert out.returncode == 1
    assert out.stderr.strip().startswith("xdsfast: error:")
    assert "Traceback" not in out.stderr


# What `xdsfast run` must not import before it serves: each costs idle memory (RSS) for the
# life of the process (prometheus-client ~3 MB, PyYAML ~1 MB, the Wasm cache and protobuf
# code ~1 MB until an ECDS response comes, dnslib and the DNS server when DNS is off).
NEVER_IMPORTED = (
    "prometheus_client",
    "grpc",
    "yaml",
    "orjson",
    "xdsfast.engines.grpcio",
    "xdsfast.wasm.cache",
    "xdsfast.wasm.convert",
)
NO_DNS_NEVER_IMPORTED = (*NEVER_IMPORTED, "dnslib", "xdsfast.dns.proxy", "xdsfast.dns.server")


def modules_imported_until_serving(*args: str, cwd: Path) -> set[str]:
    """Start the fast engine's ``xdsfast run`` as Istio does (a JSON ``PROXY_CONFIG``) and
    list, from ``-X importtime``, every module it imported before logging it serves."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ISTIO_")}
    proxy_config = {"discoveryAddress": "127.0.0.1:1", "controlPlaneAuthPolicy": "NONE"}
    env.update(XDSFAST_ENGINE="fast", PROXY_CONFIG=orjson.dumps(proxy_config).decode())
    command = [sys.executable, "-X", "importtime", "-m", "xdsfast", "run"]
    command += ["--xds-socket", str(cwd / "XDS"), "--status-address", "127.0.0.1:0", *args]
    proc = subprocess.Popen(command, env=env, cwd=cwd, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    modules, lines = set(), []
    try:
        for line in proc.stderr:
            lines.append(line)
            if line.startswith("import time:") and "|" in line:
                modules.add(line.rsplit("|", 1)[1].strip())
            elif "xDS proxy serving" in line:
                break
        else:
            raise AssertionError("xdsfast run did not start:\n" + "".join(lines[-20:]))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        proc.stderr.close()
    assert "xdsfast.engines.fast.protocol" in modules  # the list is real: the engine in use
    return modules


@pytest.mark.parametrize(
    ("args", "never"),
    [
        (("--no-dns",), NO_DNS_NEVER_IMPORTED),
        (("--dns", "--dns-address", "127.0.0.1:0"), NEVER_IMPORTED),
    ],
    ids=["no-dns", "dns"],
)
def test_run_does_not_import_what_it_does_not_use(
    short_tmp: Path, args: tuple[str, ...], never: tuple[str, ...]
) -> None:
    modules = modules_imported_until_serving(*args, cwd=short_tmp)
    loaded = sorted(m for m in modules if m.split(".")[0] in never or m in never)
    assert loaded == []
