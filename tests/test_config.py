"""Config: one typed object from flags and Istio's environment."""

from __future__ import annotations

import pytest

from xdsfast.config import Config, ConfigError, TlsFiles, parse_duration


def build(flags: dict[str, object], env: dict[str, str]) -> Config:
    """Config.build with the system trust store for istiod (no root CA file needed)."""
    return Config.build(flags, {"XDS_ROOT_CA": "SYSTEM", **env})


def test_defaults_are_istios() -> None:
    config = build({}, {})
    assert config.discovery_address == "istiod.istio-system.svc:15012"
    assert config.xds_socket == "./etc/istio/proxy/XDS"
    assert config.grpc_bootstrap == "./etc/istio/proxy/grpc-bootstrap.json"
    assert config.dns_address == "localhost:15053"
    assert config.status_address == "0.0.0.0:15020"
    assert config.max_recv_msg_size == 4 * 1024 * 1024
    assert (config.keepalive_interval, config.keepalive_timeout) == (30.0, 10.0)
    assert not config.plaintext and not config.dns_enabled
    assert config.tls == TlsFiles("SYSTEM", "istiod.istio-system.svc")
    assert config.token_path == "./var/run/secrets/tokens/istio-token"


@pytest.mark.parametrize(
    "proxy_config",
    [
        "discoveryAddress: istiod.mesh:15010\ncontrolPlaneAuthPolicy: NONE\nconfigPath: /run/px\n",
        '{"discoveryAddress": "istiod.mesh:15010", "controlPlaneAuthPolicy": "NONE",'
        ' "configPath": "/run/px"}',
    ],
    ids=["yaml", "json"],
)
def test_proxy_config_in_yaml_or_json(proxy_config: str) -> None:
    config = build({}, {"PROXY_CONFIG": proxy_config})
    assert config.discovery_address == "istiod.mesh:15010"
    assert config.plaintext
    assert config.xds_socket == "/run/px/XDS"


def test_flags_win_over_environment() -> None:
    env = {
        "PROXY_CONFIG": "discoveryAddress: istiod.mesh:15010",
        "ISTIO_META_DNS_CAPTURE": "true",
        "DNS_PROXY_ADDR": "127.0.0.1:5353",
        "GRPC_XDS_BOOTSTRAP": "/env/bootstrap.json",
    }
    flags = {
        "discovery_address": "unix:/tmp/istiod.sock",
        "dns": False,
        "dns_address": "127.0.0.1:6363",
        "grpc_bootstrap": "/flag/bootstrap.json",
    }
    config = build(flags, env)
    assert config.discovery_address == "unix:/tmp/istiod.sock"
    assert not config.dns_enabled
    assert config.dns_address == "127.0.0.1:6363"
    assert config.grpc_bootstrap == "/flag/bootstrap.json"
    assert build({}, env).dns_enabled
    assert build({}, env).grpc_bootstrap == "/env/bootstrap.json"


@pytest.mark.parametrize("name", ["ISTIO_META_DNS_CAPTURE", "ISTIO_META_ENABLE_DNS_SERVER"])
@pytest.mark.parametrize(("value", "enabled"), [("1", True), ("True", True), ("f", False)])
def test_dns_switches_parse_like_go(name: str, value: str, enabled: bool) -> None:
    assert build({}, {name: value}).dns_enabled is enabled


def test_xds_headers_and_cluster_id() -> None:
    env = {"XDS_HEADER_X_Team": "a=b", "ISTIO_META_CLUSTER_ID": "c1", "XDS_HEADER_": "ignored"}
    config = build({}, env)
    assert config.xds_headers == (("x_team", "a=b"),)
    assert config.cluster_id == "c1"
    assert ("CLUSTER_ID", "c1") in config.node_metadata


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30.0), ("1m30s", 90.0), ("500ms", 0.5), ("1h", 3600.0), ("1.5s", 1.5), ("0", 0.0)],
)
def test_go_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "30", "s", "1x", "-1s", "1s junk"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


@pytest.mark.parametrize(
    "address", ["[::1]:15012", "istiod:15012", "unix:/var/run/istiod.sock", "10.0.0.1:1"]
)
def test_good_discovery_addresses(address: str) -> None:
    assert build({"discovery_address": address}, {}).discovery_address == address


@pytest.mark.parametrize("address", ["istiod", "::1:15012", "unix:", "h:0", "h:65536", ":80"])
def test_bad_discovery_addresses(address: str) -> None:
    with pytest.raises(ConfigError):
        build({"discovery_address": address}, {})
