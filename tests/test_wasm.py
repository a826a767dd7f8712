"""ECDS Wasm conversion: remote modules fetched from local HTTP servers, cached, rewritten
to local files or replaced by the RBAC fallback; through the relay (scripted client and
the istiod stand-in, SotW and delta) and into a real Envoy."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import AgentFactory
from envoy.config.core.v3 import base_pb2, config_source_pb2, extension_pb2, http_uri_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as http_rbac_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.http.wasm.v3 import wasm_pb2 as http_wasm_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.filters.network.rbac.v3 import rbac_pb2 as network_rbac_pb2
from envoy.extensions.filters.network.wasm.v3 import wasm_pb2 as network_wasm_pb2
from envoy.extensions.wasm.v3 import wasm_pb2 as envoy_wasm_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2, duration_pb2, json_format, struct_pb2
from google.protobuf.descriptor import Descriptor
from google.protobuf.message import Message
from support import MODES, connect, free_port, needs_envoy
from udpa.type.v1 import typed_struct_pb2
from wasm_modules import MODULE, MODULE_SHA, SIZE_LIMIT, ModuleServer

from xdsfast.agent import Agent
from xdsfast.config import Config
from xdsfast.engines import Mode
from xdsfast.intercept import Rejected
from xdsfast.metrics import Metrics
from xdsfast.peers import mesh
from xdsfast.peers.adsclient import AdsClient
from xdsfast.peers.backend import http_get
from xdsfast.peers.controlplane import ControlPlane
from xdsfast.peers.envoy import EnvoyProcess
from xdsfast.typeurls import CLUSTER, EXTENSION_CONFIG, LISTENER
from xdsfast.wasm import build_rewriter, wasm_pb2
from xdsfast.wasm.cache import ModuleCache, module_path
from xdsfast.wasm.convert import WasmRewriter
from xdsfast.wasm.fetch import FetchSettings
from xdsfast.wasm.metrics import WasmMetrics

ECDS = EXTENSION_CONFIG
HTTP_RBAC = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC"
NETWORK_RBAC = "type.googleapis.com/envoy.extensions.filters.network.rbac.v3.RBAC"


# ----- the module source ------------------------------------------------------------------


# ----- configs ------------------------------------------------------------------------------


def plugin_config(
    name: str = "ext",
    url: str | None = None,
    sha256: str = "",
    *,
    local: str | None = None,
    fail_open: bool = False,
    policy: int = 0,
    env: dict[str, str] | None = None,
    timeout: float | None = None,
) -> envoy_wasm_pb2.PluginConfig:
    vm = envoy_wasm_pb2.VmConfig(vm_id="vm", runtime="envoy.wasm.runtime.v8")
    if url is not None:
        vm.code.remote.http_uri.CopyFrom(http_uri_pb2.HttpUri(uri=url, cluster="unused"))
        vm.code.remote.sha256 = sha256
        if timeout is not None:
            vm.code.remote.http_uri.timeout.FromNanoseconds(int(timeout * 1e9))
        vm.code.remote.retry_policy.num_retries.value = 3
    elif local is not None:
        vm.code.local.filename = local
    if env:
        vm.environment_variables.key_values.update(env)
        vm.environment_variables.host_env_keys.append("HOME")
    return envoy_wasm_pb2.PluginConfig(
        name=name,
        root_id="root",
        vm_config=vm,
        fail_open=fail_open,
        failure_policy=policy,
    )


def extension(
    name: str = "ext", *, network: bool = False, **kwargs: Any
) -> extension_pb2.TypedExtensionConfig:
    config = plugin_config(name, **kwargs)
    wasm: Message = (
        network_wasm_pb2.Wasm(config=config) if network else http_wasm_pb2.Wasm(config=config)
    )
    packed = any_pb2.Any()
    packed.Pack(wasm)
    return extension_pb2.TypedExtensionConfig(name=name, typed_config=packed)


def response(mode: Mode, *configs: Message, version: str = "1") -> bytes:
    packed = []
    for config in configs:
        item = any_pb2.Any()
        item.Pack(config)
        packed.append(item)
    message: Message
    if mode is Mode.SOTW:
        message = discovery_pb2.DiscoveryResponse(
            version_info=version, type_url=ECDS, nonce="n1", resources=packed
        )
        return message.SerializeToString()
    message = discovery_pb2.DeltaDiscoveryResponse(
        system_version_info=version,
        type_url=ECDS,
        nonce="n1",
        resources=[discovery_pb2.Resource(name=f"r{i}", resource=a) for i, a in enumerate(packed)],
    )
    return message.SerializeToString()


def configs_in(mode: Mode, data: bytes | Message) -> list[extension_pb2.TypedExtensionConfig]:
    if isinstance(data, bytes):
        data = (
            discovery_pb2.DiscoveryResponse
            if mode is Mode.SOTW
            else discovery_pb2.DeltaDiscoveryResponse
        ).FromString(data)
    if isinstance(data, discovery_pb2.DeltaDiscoveryResponse):
        anys = [r.resource for r in data.resources]
    else:
        assert isinstance(data, discovery_pb2.DiscoveryResponse)
        anys = list(data.resources)
    out = []
    for packed in anys:
        config = extension_pb2.TypedExtensionConfig()
        assert packed.Unpack(config)
        out.append(config)
    return out


def http_plugin(config: extension_pb2.TypedExtensionConfig) -> envoy_wasm_pb2.PluginConfig:
    wasm = http_wasm_pb2.Wasm()
    assert config.typed_config.Unpack(wasm), config.typed_config.type_url
    return wasm.config


def http_rbac(config: extension_pb2.TypedExtensionConfig) -> http_rbac_pb2.RBAC:
    rbac = http_rbac_pb2.RBAC()
    assert config.typed_config.Unpack(rbac), config.typed_config.type_url
    return rbac


# ----- the rewriter on its own --------------------------------------------------------------

Rewriters = Callable[..., WasmRewriter]


@pytest.fixture
def rewriter(tmp_path: Path) -> Callable[..., WasmRewriter]:
    def make(**settings: Any) -> WasmRewriter:
        values: dict[str, Any] = {
            "wasm_cache_dir": str(tmp_path / "cache"),
            "wasm_http_max_retries": 2,
            "wasm_max_binary_size": SIZE_LIMIT,
        }
        values.update(settings)
        metrics = Metrics()
        made = build_rewriter(Config(**values), metrics).rewriter
        made.registry_metrics = metrics  # type: ignore[attr-defined]
        return made

    return make


def sample(rw: WasmRewriter, name: str, label: str | None = None) -> float | None:
    metrics: Metrics = rw.registry_metrics  # type: ignore[attr-defined]
    return metrics.sample(name, None if label is None else {"x": label})


MODE_PARAMS = [pytest.param(Mode.SOTW, id="sotw"), pytest.param(Mode.DELTA, id="delta")]


@pytest.mark.parametrize("mode", MODE_PARAMS)
async def test_non_wasm_and_local_code_pass_through_as_the_same_bytes(
    rewriter: Rewriters, mode: Mode
) -> None:
    rw = rewriter()
    other = extension_pb2.TypedExtensionConfig(name="router")
    other.typed_config.Pack(router_pb2.Router())
    data = response(mode, other, extension("local", local="/etc/m.wasm"))
    assert await rw.rewrite(mode, data) is data
    assert sample(rw, "istio_agent_wasm_config_conversion_count", "no_remote_load") == 2
    assert sample(rw, "istio_agent_wasm_config_conversion_duration_count") == 1


@pytest.mark.parametrize("mode", MODE_PARAMS)
async def test_remote_module_becomes_a_local_file_in_istios_layout(
    rewriter: Rewriters, modules: ModuleServer, tmp_path: Path, mode: Mode
) -> None:
    rw = rewriter()
    url = modules.url("/module.wasm")
    env = {
        "ISTIO_META_WASM_PLUGIN_RESOURCE_VERSION": "7",
        "ISTIO_META_OTHER": "x",
        "KEEP": "me",
    }
    other = extension_pb2.TypedExtensionConfig(name="router")
    other.typed_config.Pack(router_pb2.Router())
    data = response(mode, extension("a", url=url, sha256=MODULE_SHA, env=env), other)
    out = configs_in(mode, await rw.rewrite(mode, data))
    plugin = http_plugin(out[0])
    expected = tmp_path / "cache" / hashlib.sha256(url.encode()).hexdigest() / f"{MODULE_SHA}.wasm"
    assert plugin.vm_config.code.local.filename == str(expected)
    assert expected.read_bytes() == MODULE
    assert dict(plugin.vm_config.environment_variables.key_values) == {"KEEP": "me"}
    assert list(plugin.vm_config.environment_variables.host_env_keys) == ["HOME"]
    assert plugin.name == "a" and plugin.root_id == "root" and plugin.vm_config.vm_id == "vm"
    assert out[1] == other  # untouched neighbour
    assert sample(rw, "istio_agent_wasm_remote_fetch_count", "success") == 1
    assert sample(rw, "istio_agent_wasm_cache_lookup_count", "false") == 1
    assert sample(rw, "istio_agent_wasm_cache_entries") == 1
    assert sample(rw, "istio_agent_wasm_config_conversion_count", "success") == 1


async def test_sha_nil_chunked_and_redirects(rewriter: Rewriters, modules: ModuleServer) -> None:
    rw = rewriter()
    data = response(
        Mode.SOTW,
        extension("a", url=modules.url("/chunked"), sha256="nil"),
        extension("b", url=modules.url("/redirect"), sha256=MODULE_SHA),
    )
    out = configs_in(Mode.SOTW, await rw.rewrite(Mode.SOTW, data))
    for config in out:
        assert Path(http_plugin(config).vm_config.code.local.filename).read_bytes() == MODULE
    assert modules.hits["/module-r"] == 1


async def test_same_url_in_parallel_is_downloaded_once_and_then_hits(
    rewriter: Rewriters, modules: ModuleServer
) -> None:
    rw = rewriter()
    url = modules.url("/module.wasm")
    data = response(Mode.SOTW, *(extension(f"e{i}", url=url, sha256=MODULE_SHA) for i in range(4)))
    await rw.rewrite(Mode.SOTW, data)
    await rw.rewrite(Mode.SOTW, response(Mode.SOTW, extension("x", url=url)))  # no sha: known
    assert modules.hits["/module.wasm"] == 1
    assert sample(rw, "istio_agent_wasm_cache_lookup_count", "true") == 4
    assert sample(rw, "istio_agent_wasm_cache_lookup_count", "false") == 1


@pytest.mark.parametrize(
    ("path", "sha", "fetch_result", "hits"),
    [
        pytest.param("/fail", "", "download_failure", 2, id="http-503-retried"),
        pytest.param("/missing", "", "download_failure", 1, id="http-404-not-retried"),
        pytest.param("/big", "", "download_failure", 1, id="oversized"),
        pytest.param("/big-unsized", "", "download_failure", 1, id="oversized-no-length"),
        pytest.param("/module.wasm", "0" * 64, "checksum_mismatched", 1, id="wrong-checksum"),
    ],
)
async def test_fetch_failures_fall_back_to_deny_all(
    rewriter: Rewriters,
    modules: ModuleServer,
    path: str,
    sha: str,
    fetch_result: str,
    hits: int,
) -> None:
    rw = rewriter()
    data = response(Mode.SOTW, extension("ext", url=modules.url(path), sha256=sha))
    (config,) = configs_in(Mode.SOTW, await rw.rewrite(Mode.SOTW, data))
    assert config.name == "ext"
    rbac = http_rbac(config)
    assert rbac.rules_stat_prefix == "wasm-default-deny" and rbac.HasField("rules")
    assert not rbac.rules.policies and rbac.rules.action == rbac.rules.ALLOW
    assert modules.hits[path] == hits
    assert sample(rw, "istio_agent_wasm_remote_fetch_count", fetch_result) == 1
    assert sample(rw, "istio_agent_wasm_config_conversion_count", "fetch_failure") == 1
    assert sample(rw, "istio_agent_wasm_cache_entries") == 0


async def test_timeout_bounds_the_fetch(rewriter: Rewriters, modules: ModuleServer) -> None:
    rw = rewriter(wasm_http_max_retries=5)
    data = response(Mode.SOTW, extension("ext", url=modules.url("/slow"), timeout=0.3))
    (config,) = configs_in(Mode.SOTW, await asyncio.wait_for(rw.rewrite(Mode.SOTW, data), 10))
    assert http_rbac(config).rules_stat_prefix == "wasm-default-deny"


@pytest.mark.parametrize(
    ("fail_open", "policy", "allow"),
    [
        pytest.param(True, 0, True, id="deprecated-fail_open"),
        pytest.param(False, envoy_wasm_pb2.FAIL_OPEN, True, id="FAIL_OPEN"),
        pytest.param(True, envoy_wasm_pb2.FAIL_CLOSED, False, id="FAIL_CLOSED-wins"),
        pytest.param(False, 0, False, id="default-closed"),
    ],
)
async def test_fail_open_allows_all(
    rewriter: Rewriters, modules: ModuleServer, fail_open: bool, policy: int, allow: bool
) -> None:
    rw = rewriter()
    data = response(
        Mode.SOTW,
        extension("ext", url=modules.url("/missing"), fail_open=fail_open, policy=policy),
    )
    (config,) = configs_in(Mode.SOTW, await rw.rewrite(Mode.SOTW, data))
    rbac = http_rbac(config)
    if allow:
        assert rbac.rules_stat_prefix == "wasm-default-allow" and not rbac.HasField("rules")
    else:
        assert rbac.rules_stat_prefix == "wasm-default-deny" and rbac.HasField("rules")


async def test_network_filter_falls_back_to_network_rbac(
    rewriter: Rewriters, modules: ModuleServer
) -> None:
    rw = rewriter()
    data = response(
        Mode.SOTW,
        extension("net", network=True, url=modules.url("/missing")),
        extension("net-open", network=True, url=modules.url("/missing"), fail_open=True),
    )
    closed, opened = configs_in(Mode.SOTW, await rw.rewrite(Mode.SOTW, data))
    for config, prefix, rules in (
        (closed, "wasm-default-deny", True),
        (opened, "wasm-default-allow", False),
    ):
        rbac = network_rbac_pb2.RBAC()
        assert config.typed_config.type_url == NETWORK_RBAC
        assert config.typed_config.Unpack(rbac)
        assert rbac.stat_prefix == prefix and rbac.HasField("rules") is rules


@pytest.mark.parametrize(
    ("url", "env", "result"),
    [
        pytest.param("oci://registry.example/plugin:1.0", {}, "fetch_failure", id="oci"),
        pytest.param("file:///etc/passwd", {}, "fetch_failure", id="file"),
        pytest.param(
            "MODULE", {"ISTIO_META_WASM_IMAGE_PULL_SECRET": ""}, "fetch_failure", id="empty-secret"
        ),
        pytest.param("", {}, "miss_remote_fetch_hint", id="no-http-uri"),
    ],
)
async def test_refused_sources_fall_back(
    rewriter: Rewriters, modules: ModuleServer, url: str, env: dict[str, str], result: str
) -> None:
    rw = rewriter()
    real_url = modules.url("/module.wasm") if url == "MODULE" else url
    config = extension("ext", url=real_url, env=env)
    if not url:
        wasm = http_wasm_pb2.Wasm()
        config.typed_config.Unpack(wasm)
        wasm.config.vm_config.code.remote.ClearField("http_uri")
        config.typed_config.Pack(wasm)
    (out,) = configs_in(Mode.SOTW, await rw.rewrite(Mode.SOTW, response(Mode.SOTW, config)))
    assert http_rbac(out).rules_stat_prefix == "wasm-default-deny"
    assert sample(rw, "istio_agent_wasm_config_conversion_count", result) == 1
    assert modules.hits == {}
    if url.startswith("oci"):
        assert sample(rw, "xdsfast_wasm_unsupported_sources_total", "oci") == 1


async def test_blocked_cidrs_refuse_the_fetch(rewriter: Rewriters, modules: ModuleServer) -> None:
    rw = rewriter(wasm_blocked_cidrs=("127.0.0.0/8",))
    data = response(Mode.SOTW, extension("ext", url=modules.url("/module.wasm")))
    (out,) = configs_in(Mode.SOTW, await rw.rewrite(Mode.SOTW, data))
    assert http_rbac(out).rules_stat_prefix == "wasm-default-deny"
    assert modules.hits == {}


async def test_pull_policy_always_refetches_on_a_new_resource_version(
    rewriter: Rewriters, modules: ModuleServer
) -> None:
    rw = rewriter()
    url = modules.url("/module.wasm")

    def push(version: str, policy: str) -> bytes:
        env = {
            "ISTIO_META_WASM_IMAGE_PULL_POLICY": policy,
            "ISTIO_META_WASM_PLUGIN_RESOURCE_VERSION": version,
        }
        return response(Mode.SOTW, extension("ext", url=url, sha256=MODULE_SHA, env=env))

    await rw.rewrite(Mode.SOTW, push("1", "Always"))
    await rw.rewrite(Mode.SOTW, push("1", "Always"))  # same version: cached
    assert modules.hits["/module.wasm"] == 1
    await rw.rewrite(Mode.SOTW, push("2", "Always"))
    assert modules.hits["/module.wasm"] == 2
    await rw.rewrite(Mode.SOTW, push("3", "IfNotPresent"))
    assert modules.hits["/module.wasm"] == 2


async def test_typed_struct_wrapped_wasm_is_rewritten_and_stays_lossless(
    rewriter: Rewriters, modules: ModuleServer
) -> None:
    rw = rewriter()
    url = modules.url("/module.wasm")
    plugin = json_format.MessageToDict(
        http_wasm_pb2.Wasm(config=plugin_config("ts", url=url, env={"ISTIO_META_A": "1", "B": "2"}))
    )
    plugin["config"]["vmConfig"]["someFutureField"] = {"kept": True}
    value = struct_pb2.Struct()
    value.update(plugin)
    typed = typed_struct_pb2.TypedStruct(
        type_url="type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm", value=value
    )
    config = extension_pb2.TypedExtensionConfig(name="ts")
    config.typed_config.Pack(typed)
    (out,) = configs_in(Mode.SOTW, await rw.rewrite(Mode.SOTW, response(Mode.SOTW, config)))
    result = typed_struct_pb2.TypedStruct()
    assert out.typed_config.Unpack(result)
    vm = json_format.MessageToDict(result.value)["config"]["vmConfig"]
    assert Path(vm["code"]["local"]["filename"]).read_bytes() == MODULE
    assert vm["environmentVariables"]["keyValues"] == {"B": "2"}
    assert vm["someFutureField"] == {"kept": True}
    # Failing, fail-open as a JSON enum name: the allow-all fallback.
    plugin["config"]["vmConfig"]["code"]["remote"]["httpUri"]["uri"] = modules.url("/missing")
    plugin["config"]["failurePolicy"] = "FAIL_OPEN"
    typed.value.Clear()
    typed.value.update(plugin)
    config.typed_config.Pack(typed)
    (out,) = configs_in(Mode.SOTW, await rw.rewrite(Mode.SOTW, response(Mode.SOTW, config)))
    assert http_rbac(out).rules_stat_prefix == "wasm-default-allow"


@pytest.mark.parametrize("mode", MODE_PARAMS)
async def test_no_code_or_undecodable_is_rejected(rewriter: Rewriters, mode: Mode) -> None:
    rw = rewriter()
    with pytest.raises(Rejected, match="neither remote nor local"):
        await rw.rewrite(mode, response(mode, extension("ext")))
    broken = extension_pb2.TypedExtensionConfig(name="x")
    broken.typed_config.type_url = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm"
    broken.typed_config.value = b"\x0a\x05ab"
    with pytest.raises(Rejected, match="cannot decode"):
        await rw.rewrite(mode, response(mode, broken))
    assert sample(rw, "istio_agent_wasm_config_conversion_count", "unmarshal_failure") == 2


# ----- the cache: expiry and purge ----------------------------------------------------------


async def test_expired_modules_are_purged(tmp_path: Path) -> None:
    now = [1000.0]
    downloads: list[str] = []

    async def fetcher(url: str, timeout: float, settings: FetchSettings) -> bytes:
        downloads.append(url)
        return MODULE

    metrics = WasmMetrics(Metrics())
    cache = ModuleCache(
        str(tmp_path), FetchSettings(), metrics, expiry=60.0, clock=lambda: now[0], fetcher=fetcher
    )
    first = await cache.get("http://a/m.wasm", MODULE_SHA, timeout=1)
    second = await cache.get("http://b/m.wasm", "", timeout=1)
    assert first == module_path(tmp_path, "http://a/m.wasm", MODULE_SHA)
    assert metrics.cache_entries.value == 2
    now[0] += 50
    assert await cache.get("http://a/m.wasm", MODULE_SHA, timeout=1) == first  # used again
    now[0] += 20  # b unused for 70 s, a for 20 s
    assert cache.purge() == 1
    assert first.is_file() and not second.exists() and not second.parent.exists()
    assert metrics.cache_entries.value == 1
    await cache.get("http://b/m.wasm", "", timeout=1)  # fetched again
    assert downloads == ["http://a/m.wasm", "http://b/m.wasm", "http://b/m.wasm"]
    first.unlink()  # deleted behind the cache's back: fetched again, not served missing
    assert (await cache.get("http://a/m.wasm", MODULE_SHA, timeout=1)).is_file()
    assert len(downloads) == 4


async def test_the_purge_runs_periodically(tmp_path: Path) -> None:
    async def fetcher(url: str, timeout: float, settings: FetchSettings) -> bytes:
        return MODULE

    metrics = WasmMetrics(Metrics())
    cache = ModuleCache(
        str(tmp_path), FetchSettings(), metrics, expiry=0.0, purge_interval=0.01, fetcher=fetcher
    )
    path = await cache.get("http://a/m.wasm", "", timeout=1)

    async def gone() -> None:
        while path.exists():
            await asyncio.sleep(0.01)

    cache.start()
    try:
        await asyncio.wait_for(gone(), 10)  # the deadline only; the purge loop does the work
    finally:
        await cache.stop()
    assert len(cache) == 0


async def test_the_rewriter_loads_with_the_first_ecds_response_then_purges(
    modules: ModuleServer, tmp_path: Path
) -> None:
    """Most proxies get no ECDS, so the cache and Wasm protobuf code load with the first
    response; the metrics are there from the start, and the purge runs once there is a
    cache."""
    metrics = Metrics()
    config = Config(
        wasm_cache_dir=str(tmp_path / "cache"), wasm_module_expiry=0.0, wasm_purge_interval=0.01
    )
    deferred = build_rewriter(config, metrics)
    deferred.start()
    try:
        assert not deferred.built
        assert metrics.sample("istio_agent_wasm_cache_entries") == 0
        data = response(
            Mode.SOTW, extension("ext", url=modules.url("/module.wasm"), sha256=MODULE_SHA)
        )
        (out,) = configs_in(Mode.SOTW, await deferred.rewrite(Mode.SOTW, data))
        assert deferred.built
        assert metrics.sample("istio_agent_wasm_remote_fetch_count", {"result": "success"}) == 1
        path = Path(http_plugin(out).vm_config.code.local.filename)

        async def gone() -> None:
            while path.exists():
                await asyncio.sleep(0.01)

        await asyncio.wait_for(gone(), 10)  # expired at once: only the purge deletes it
    finally:
        await deferred.stop()


# ----- our subset protos against Envoy's ----------------------------------------------------


OURS_VS_ENVOY = [
    (wasm_pb2.TypedExtensionConfig, extension_pb2.TypedExtensionConfig),
    (wasm_pb2.Wasm, http_wasm_pb2.Wasm),
    (wasm_pb2.Wasm, network_wasm_pb2.Wasm),
    (wasm_pb2.PluginConfig, envoy_wasm_pb2.PluginConfig),
    (wasm_pb2.VmConfig, envoy_wasm_pb2.VmConfig),
    (wasm_pb2.EnvironmentVariables, envoy_wasm_pb2.EnvironmentVariables),
    (wasm_pb2.AsyncDataSource, base_pb2.AsyncDataSource),
    (wasm_pb2.RemoteDataSource, base_pb2.RemoteDataSource),
    (wasm_pb2.HttpUri, http_uri_pb2.HttpUri),
    (wasm_pb2.DataSource, base_pb2.DataSource),
    (wasm_pb2.TypedStruct, typed_struct_pb2.TypedStruct),
    (wasm_pb2.HttpRbac, http_rbac_pb2.RBAC),
    (wasm_pb2.NetworkRbac, network_rbac_pb2.RBAC),
]


@pytest.mark.parametrize(("ours", "theirs"), OURS_VS_ENVOY, ids=lambda m: m.DESCRIPTOR.full_name)
def test_every_field_matches_envoys(ours: Any, theirs: Any) -> None:
    mine: Descriptor = ours.DESCRIPTOR
    envoy: Descriptor = theirs.DESCRIPTOR
    for field in mine.fields:
        other = envoy.fields_by_name.get(field.name)
        assert other is not None, f"{mine.full_name}.{field.name} not in {envoy.full_name}"
        assert (field.number, field.type, field.is_repeated) == (
            other.number,
            other.type,
            other.is_repeated,
        ), field.name
        oneof = field.containing_oneof
        assert (oneof.name if oneof else None) == (
            other.containing_oneof.name if other.containing_oneof else None
        ), field.name
        if field.enum_type is not None:
            assert other.enum_type is not None
            assert {v.name: v.number for v in field.enum_type.values} == {
                v.name: v.number for v in other.enum_type.values
            }


def test_a_full_config_round_trips_through_our_protos() -> None:
    config = extension(
        "rt", url="https://x/m.wasm", sha256="ab", env={"K": "V"}, timeout=2.5, policy=2
    )
    wasm = http_wasm_pb2.Wasm()
    config.typed_config.Unpack(wasm)
    wasm.config.configuration.Pack(duration_pb2.Duration(seconds=1))
    wasm.config.vm_config.allow_precompiled = True
    wasm.config.vm_config.nack_on_code_cache_miss = True
    wasm.config.capability_restriction_config.allowed_capabilities["x"].SetInParent()
    wasm.config.allow_on_headers_stop_iteration.value = True
    config.typed_config.Pack(wasm)
    data = config.SerializeToString()
    ours = wasm_pb2.TypedExtensionConfig.FromString(data)
    mine = wasm_pb2.Wasm.FromString(ours.typed_config.value)
    assert mine.config.vm_config.code.remote.http_uri.timeout.ToNanoseconds() == 2_500_000_000
    assert mine.config.failure_policy == wasm_pb2.FAIL_CLOSED
    assert dict(mine.config.vm_config.environment_variables.key_values) == {"K": "V"}
    ours.typed_config.value = mine.SerializeToString()
    back = extension_pb2.TypedExtensionConfig.FromString(ours.SerializeToString())
    # Unknown fields (retry_policy, capabilities...) survive, though re-ordered on the wire.
    assert back.name == "rt" and back.typed_config.type_url == config.typed_config.type_url
    again = http_wasm_pb2.Wasm()
    assert back.typed_config.Unpack(again)
    assert again == wasm


# ----- through the relay: scripted client and the istiod stand-in ---------------------------


@pytest.fixture
def wasm_agent(make_agent: AgentFactory, short_tmp: Path) -> AgentFactory:
    """make_agent with a private module cache and one fetch attempt (failures come fast)."""

    async def start(**settings: Any) -> Agent:
        defaults: dict[str, Any] = {
            "dns_enabled": False,
            "grpc_bootstrap": None,
            "wasm_cache_dir": str(short_tmp / "wasm"),
            "wasm_http_max_retries": 1,
        }
        return await make_agent(**{**defaults, **settings})

    return start


def agent_sample(agent: Agent, name: str, label: str | None = None) -> float | None:
    return agent.metrics.sample(name, None if label is None else {"x": label})


@pytest.mark.parametrize("delta", MODES)
async def test_relay_rewrites_then_hits_the_cache(
    wasm_agent: AgentFactory,
    control_plane: ControlPlane,
    clients: list[AdsClient],
    modules: ModuleServer,
    delta: bool,
) -> None:
    agent = await wasm_agent(discovery_address=control_plane.address)
    client = await connect(agent, clients, delta)
    url = modules.url("/module.wasm")
    env = {"ISTIO_META_WASM_PLUGIN_RESOURCE_VERSION": "1", "ISTIO_META_X": "y", "APP": "z"}
    await client.request(ECDS, ["ext"])
    control_plane.set_resources(
        ECDS, {"ext": extension("ext", url=url, sha256=MODULE_SHA, env=env)}
    )
    first = await client.recv()
    (config,) = configs_in(Mode.DELTA if delta else Mode.SOTW, first)
    plugin = http_plugin(config)
    path = Path(plugin.vm_config.code.local.filename)
    assert path.parent.parent == Path(agent.config.wasm_cache_dir)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == MODULE_SHA
    assert dict(plugin.vm_config.environment_variables.key_values) == {"APP": "z"}
    await client.ack(first, names=["ext"])
    v2 = control_plane.set_resources(
        ECDS, {"ext": extension("ext", url=url, sha256=MODULE_SHA, env={"APP": "w"})}
    )
    second = await client.recv()
    assert http_plugin(
        configs_in(Mode.DELTA if delta else Mode.SOTW, second)[0]
    ).vm_config.code.local.filename == str(path)
    await client.ack(second, names=["ext"])
    await control_plane.wait_for_request(
        lambda r: r.type_url == ECDS and r.is_ack and r.response_version == v2
    )
    assert modules.hits["/module.wasm"] == 1
    assert agent_sample(agent, "istio_agent_wasm_cache_lookup_count", "true") == 1
    assert agent_sample(agent, "istio_agent_wasm_cache_lookup_count", "false") == 1
    assert agent_sample(agent, "istio_agent_wasm_config_conversion_count", "success") == 2
    text = agent.metrics.exposition().decode()
    assert 'istio_agent_wasm_remote_fetch_count{result="success"} 1' in text
    assert "istio_agent_wasm_cache_entries 1" in text
    assert 'istio_agent_wasm_config_conversion_duration_bucket{le="16384.0"} 2.0' in text


@pytest.mark.parametrize("delta", MODES)
@pytest.mark.parametrize("fail_open", [False, True], ids=["fail-closed", "fail-open"])
async def test_relay_sends_the_rbac_fallback(
    wasm_agent: AgentFactory,
    control_plane: ControlPlane,
    clients: list[AdsClient],
    modules: ModuleServer,
    delta: bool,
    fail_open: bool,
) -> None:
    agent = await wasm_agent(discovery_address=control_plane.address)
    client = await connect(agent, clients, delta)
    await client.request(ECDS, ["ext"])
    control_plane.set_resources(
        ECDS, {"ext": extension("ext", url=modules.url("/fail"), fail_open=fail_open)}
    )
    (config,) = configs_in(Mode.DELTA if delta else Mode.SOTW, await client.recv())
    assert config.name == "ext"
    rbac = http_rbac(config)
    assert rbac.rules_stat_prefix == ("wasm-default-allow" if fail_open else "wasm-default-deny")
    assert rbac.HasField("rules") is not fail_open
    assert agent_sample(agent, "istio_agent_wasm_config_conversion_count", "fetch_failure") == 1


@pytest.mark.parametrize("delta", MODES)
async def test_relay_nacks_a_config_without_code(
    wasm_agent: AgentFactory,
    control_plane: ControlPlane,
    clients: list[AdsClient],
    delta: bool,
) -> None:
    agent = await wasm_agent(discovery_address=control_plane.address)
    client = await connect(agent, clients, delta)
    await client.request(ECDS, ["ext"])
    v1 = control_plane.set_resources(ECDS, {"ext": extension("ext", local="/m.wasm")})
    await client.ack(await client.recv(), names=["ext"])
    await control_plane.wait_for_request(
        lambda r: r.type_url == ECDS and r.is_ack and r.response_version == v1
    )
    v2 = control_plane.set_resources(ECDS, {"ext": extension("ext")})
    nack = await control_plane.wait_for_request(
        lambda r: r.type_url == ECDS and r.is_nack and r.response_version == v2
    )
    assert nack.request.error_detail.code == 13
    assert "neither remote nor local" in nack.error
    if not delta:
        assert nack.request.version_info == v1
        # Envoy's subscription is restated, not dropped (an empty list means "everything").
        assert list(nack.request.resource_names) == ["ext"]
    # Envoy never saw v2: the next thing it gets is the next push.
    control_plane.push_raw(CLUSTER, [mesh.eds_cluster("c")])
    assert (await client.recv()).type_url == CLUSTER
    assert (
        agent.metrics.sample("xdsfast_xds_dropped_responses_total", {"reason": "rejected_by_agent"})
        == 1
    )


async def test_relay_leaves_ecds_alone_when_conversion_is_off(
    wasm_agent: AgentFactory,
    control_plane: ControlPlane,
    clients: list[AdsClient],
    modules: ModuleServer,
) -> None:
    agent = await wasm_agent(discovery_address=control_plane.address, wasm_conversion=False)
    assert agent.wasm is None
    client = await connect(agent, clients, False)
    await client.request(ECDS, ["ext"])
    sent = extension("ext", url=modules.url("/module.wasm"))
    control_plane.set_resources(ECDS, {"ext": sent})
    (config,) = configs_in(Mode.SOTW, await client.recv())
    assert config == sent
    assert modules.hits == {}


def test_config_from_istio_environment() -> None:
    config = Config.build(
        {"plaintext": True, "wasm_cache_dir": "/tmp/w"},
        {
            "ISTIO_AGENT_ENABLE_WASM_REMOTE_LOAD_CONVERSION": "false",
            "WASM_MODULE_EXPIRY": "2h",
            "WASM_PURGE_INTERVAL": "10m",
            "WASM_HTTP_REQUEST_TIMEOUT": "3s",
            "WASM_HTTP_REQUEST_MAX_RETRIES": "2",
            "ISTIO_WASM_MAX_BINARY_SIZE_BYTES": "1000",
            "WASM_INSECURE_REGISTRIES": "a.example, b.example",
            "BLOCKED_CIDRS_IN_WASM_FETCH": "10.0.0.0/8,fd00::/8",
        },
    )
    assert (config.wasm_conversion, config.wasm_cache_dir) == (False, "/tmp/w")
    assert (config.wasm_module_expiry, config.wasm_purge_interval) == (7200.0, 600.0)
    assert (config.wasm_http_request_timeout, config.wasm_http_max_retries) == (3.0, 2)
    assert config.wasm_max_binary_size == 1000
    assert config.wasm_insecure_registries == ("a.example", "b.example")
    assert config.wasm_blocked_cidrs == ("10.0.0.0/8", "fd00::/8")
    default = Config.build({"plaintext": True}, {})
    assert default.wasm_conversion and default.wasm_cache_dir == "/var/lib/istio/data"
    assert (default.wasm_module_expiry, default.wasm_http_max_retries) == (86400.0, 5)
    assert default.wasm_max_binary_size == 256 * 1024 * 1024


# ----- a real Envoy accepts the RBAC fallback -----------------------------------------------


def ecds_listener(port: int, filter_name: str) -> listener_pb2.Listener:
    """An HTTP listener whose first filter comes over ECDS (ADS), then a direct answer."""
    ads = config_source_pb2.ConfigSource(
        ads=config_source_pb2.AggregatedConfigSource(),
        resource_api_version=config_source_pb2.V3,
    )
    router = any_pb2.Any()
    router.Pack(router_pb2.Router())
    route = mesh.direct_route("hello", name="r")
    manager = hcm_pb2.HttpConnectionManager(
        stat_prefix="ecds",
        route_config=route,
        http_filters=[
            hcm_pb2.HttpFilter(
                name=filter_name,
                config_discovery=config_source_pb2.ExtensionConfigSource(
                    config_source=ads, type_urls=[HTTP_RBAC]
                ),
            ),
            hcm_pb2.HttpFilter(name="envoy.filters.http.router", typed_config=router),
        ],
    )
    packed = any_pb2.Any()
    packed.Pack(manager)
    chain = listener_components_pb2.FilterChain(
        filters=[listener_components_pb2.Filter(name="hcm", typed_config=packed)]
    )
    listener = listener_pb2.Listener(name="ecds", filter_chains=[chain])
    listener.address.socket_address.address = "127.0.0.1"
    listener.address.socket_address.port_value = port
    return listener


@pytest.mark.envoy
@needs_envoy
@pytest.mark.parametrize("delta", MODES)
async def test_real_envoy_acks_the_deny_all_fallback(
    wasm_agent: AgentFactory,
    control_plane: ControlPlane,
    modules: ModuleServer,
    short_tmp: Path,
    delta: bool,
) -> None:
    cp = control_plane
    agent = await wasm_agent(discovery_address=cp.address)
    port = free_port()
    cp.set_resources(CLUSTER, {})
    cp.set_resources(LISTENER, {"ecds": ecds_listener(port, "wasm-ext")})
    version = cp.set_resources(
        ECDS, {"wasm-ext": extension("wasm-ext", url=modules.url("/fail"), sha256=MODULE_SHA)}
    )
    envoy = EnvoyProcess(
        f"unix:{agent.config.xds_socket}", delta=delta, workdir=short_tmp / "envoy"
    )
    await envoy.start()
    try:
        ack = await cp.wait_for_request(
            lambda r: r.type_url == ECDS and r.is_ack and r.response_version == version, 30
        )
        assert not any(r.type_url == ECDS and r.is_nack for r in cp.requests), cp.describe()
        assert ack.request.error_detail.message == ""
        await envoy.wait_ready()
        dump = await envoy.config_dump()
        assert "wasm-default-deny" in str(dump)
        # The fallback denies every request on the listener (the direct answer is never sent).
        deadline = asyncio.get_running_loop().time() + 10
        status = 0
        while status != 403:
            assert asyncio.get_running_loop().time() < deadline, f"last status {status}"
            with contextlib.suppress(OSError):
                status, _, _ = await http_get("127.0.0.1", port, "/", timeout=2.0)
            if status != 403:
                await asyncio.sleep(0.05)
        assert (
            agent.metrics.sample(
                "istio_agent_wasm_config_conversion_count", {"result": "fetch_failure"}
            )
            == 1
        )
    finally:
        await envoy.stop()
    assert os.path.isdir(short_tmp)
