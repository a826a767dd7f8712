"""Config: one typed object from flags and Istio's environment."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from xdsfast.config import Config, ConfigError, TlsFiles, _proxy_config, parse_duration


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


def read_like_yaml(text: str) -> dict[str, Any] | str:
    """What ``yaml.safe_load`` makes of a PROXY_CONFIG, or "error"."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return "error"
    return value if isinstance(value, dict) else "error"


def read_ours(text: str) -> dict[str, Any] | str:
    try:
        return _proxy_config(text)
    except ConfigError:
        return "error"


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=8,
)


@given(
    st.dictionaries(st.text(max_size=5), JSON_VALUES, max_size=4),
    st.booleans(),
    st.sampled_from([None, 0, 2, "\t"]),
)
def test_json_proxy_config_reads_as_yaml_would(
    document: dict[str, Any], ascii_only: bool, indent: int | str | None
) -> None:
    """JSON is read without PyYAML only where that changes nothing (floats, NaN, surrogate
    pairs, tabs, control characters all go through YAML)."""
    text = json.dumps(document, ensure_ascii=ascii_only, indent=indent)
    assert read_ours(text) == read_like_yaml(text)


@pytest.mark.parametrize(
    "text",
    [
        '{"a": 1e3, "b": 1.5E+2}',
        '{"a": NaN}',
        '{"a": "\\ud83d\\ude00"}',
        '{\t"a": 1}',
        '{"a": "\x7f"}',
        '{"a": 1} # comment',
        '{"a": [1, {"b": null}], "c": true, "d": "x\\/y"}',
        '{"<<": {"x": 1}}',
        "[1, 2]",
    ],
)
def test_json_edge_cases_read_as_yaml_would(text: str) -> None:
    assert read_ours(text) == read_like_yaml(text)


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


@pytest.mark.parametrize(
    ("value", "size"), [(None, 1 << 20), ("0", 0), ("4194304", 4 << 20), ("1073741824", 1 << 30)]
)
def test_envoy_send_buffer(value: str | None, size: int) -> None:
    env = {} if value is None else {"XDSFAST_ENVOY_SEND_BUFFER": value}
    assert build({}, env).envoy_send_buffer == size


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("-1", "must be 0 or more"),
        ("1MiB", "is not an integer"),
        ("1073741825", "must be at most 1073741824"),
        ("99999999999999999999", "must be at most 1073741824"),
    ],
)
def test_bad_envoy_send_buffer(value: str, why: str) -> None:
    with pytest.raises(ConfigError, match=f"^XDSFAST_ENVOY_SEND_BUFFER='{value}' {why}$"):
        build({}, {"XDSFAST_ENVOY_SEND_BUFFER": value})


@pytest.mark.parametrize("value", ["0", "-5"])
def test_positive_integers_stay_positive(value: str) -> None:
    with pytest.raises(ConfigError, match=f"^ISTIO_GPRC_MAXSTREAMS='{value}' must be positive$"):
        build({}, {"ISTIO_GPRC_MAXSTREAMS": value})
