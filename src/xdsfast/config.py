"""One typed configuration, built from flags and Istio's environment variables in one place.

Flags win over the environment; environment names and defaults are Istio's.
Anything invalid raises :class:`ConfigError`, which the CLI reports in one line.
Every default is named here once (``DEFAULT_*``); importing this module is cheap (no
asyncio), so the inspect commands' help and address defaults can read them.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NoReturn

from xdsfast.files import FileProblem, check_regular

if TYPE_CHECKING:  # health and heap load asyncio: only building a Config needs them
    from xdsfast.health import Probe

DEFAULT_DISCOVERY_ADDRESS = "istiod.istio-system.svc:15012"
DEFAULT_CONFIG_PATH = "./etc/istio/proxy"
DEFAULT_DNS_ADDRESS = "localhost:15053"
DEFAULT_STATUS_ADDRESS = "0.0.0.0:15020"
DEFAULT_TOKEN_PATH = "./var/run/secrets/tokens/istio-token"
DEFAULT_ROOT_CA = "./var/run/secrets/istio/root-cert.pem"
MOUNTED_ROOT_CA = "./etc/certs/root-cert.pem"
ISTIOD_SERVER_NAME = "istiod.istio-system.svc"
XDS_HEADER_PREFIX = "XDS_HEADER_"
LOG_LEVELS = ("debug", "info", "warn", "error", "none")
LOG_FORMATS = ("text", "json")

# Every other default, named once: Config's fields, Config.build and the modules that
# take these settings (engines, wasm.cache) all use these names.
DEFAULT_RESOLV_CONF = "/etc/resolv.conf"
DEFAULT_DNS_FORWARD_TIMEOUT = 5.0  # DNS_FORWARD_TIMEOUT, seconds per upstream server
# Istio's gRPC options, for Envoy's side and (keepalive) for istiod's
DEFAULT_MAX_RECV_MSG_SIZE = 4 << 20  # ISTIO_GPRC_MAXRECVMSGSIZE: 4 MiB
DEFAULT_MAX_CONCURRENT_STREAMS = 100_000  # ISTIO_GPRC_MAXSTREAMS
DEFAULT_KEEPALIVE_INTERVAL = 30.0  # GRPC_KEEPALIVE_INTERVAL, seconds
DEFAULT_KEEPALIVE_TIMEOUT = 10.0  # GRPC_KEEPALIVE_TIMEOUT, seconds
DEFAULT_HEAP_RELEASE_INTERVAL = 5.0  # XDSFAST_HEAP_RELEASE_INTERVAL, seconds
# XDSFAST_ENVOY_SEND_BUFFER: SO_SNDBUF asked for Envoy's Unix socket connections (the kernel
# doubles it, capped at net.core.wmem_max); 0: the kernel's default (net.core.wmem_default)
DEFAULT_ENVOY_SEND_BUFFER = 1 << 20
ENVOY_SEND_BUFFER_MAX = 1 << 30
# The Wasm module cache and its downloads
DEFAULT_WASM_CACHE_DIR = "/var/lib/istio/data"  # --wasm-cache-dir
DEFAULT_WASM_MODULE_EXPIRY = 24 * 3600.0  # WASM_MODULE_EXPIRY: a day unused, then deleted
DEFAULT_WASM_PURGE_INTERVAL = 3600.0  # WASM_PURGE_INTERVAL: how often expiry is checked
DEFAULT_WASM_HTTP_REQUEST_TIMEOUT = 15.0  # WASM_HTTP_REQUEST_TIMEOUT, seconds per attempt
DEFAULT_WASM_HTTP_MAX_RETRIES = 5  # WASM_HTTP_REQUEST_MAX_RETRIES, attempts per fetch
DEFAULT_WASM_MAX_BINARY_SIZE = 256 << 20  # ISTIO_WASM_MAX_BINARY_SIZE_BYTES: 256 MiB


class ConfigError(ValueError):
    """A flag or environment value that cannot be used."""


SYSTEM_ROOTS = "SYSTEM"


@dataclass(frozen=True)
class TlsFiles:
    """Where the TLS material for istiod lives; the files are read at every new connection,
    so rotated certificates apply without a restart."""

    root_ca: str  # a PEM file, or SYSTEM_ROOTS for the system's trust store
    server_name: str  # checked against istiod's certificate
    client_key: str | None = None
    client_cert: str | None = None


@dataclass(frozen=True)
class Config:
    """Everything ``xdsfast run`` needs."""

    discovery_address: str = DEFAULT_DISCOVERY_ADDRESS
    plaintext: bool = False
    xds_socket: str = f"{DEFAULT_CONFIG_PATH}/XDS"
    xds_listen: str | None = None
    dns_enabled: bool = False
    dns_address: str = DEFAULT_DNS_ADDRESS
    resolv_conf: str = DEFAULT_RESOLV_CONF
    dns_upstreams: tuple[str, ...] = ()  # --dns-upstream IP:PORT; empty: resolv.conf's
    dns_forward_parallel: bool = False  # DNS_FORWARD_PARALLEL
    # XDSFAST_DNS_FORWARD_REMOTE: forward for non-loopback clients too (else REFUSED)
    dns_forward_remote: bool = False
    dns_forward_timeout: float = DEFAULT_DNS_FORWARD_TIMEOUT
    # XDSFAST_NODE_DNS_CAPTURE: with DNS on, the node of each stream's first request gets
    # DNS_CAPTURE and DNS_PROXY_ADDR (pilot-agent's DNS, which would set them, is off)
    node_dns_capture: bool = True
    pod_namespace: str = ""  # POD_NAMESPACE
    domain: str = ""  # --domain; empty means <pod_namespace>.svc.cluster.local
    status_address: str = DEFAULT_STATUS_ADDRESS
    log_level: str = "info"
    log_format: str = "text"
    cluster_id: str = ""
    xds_headers: tuple[tuple[str, str], ...] = field(default_factory=tuple)
    max_recv_msg_size: int = DEFAULT_MAX_RECV_MSG_SIZE
    max_concurrent_streams: int = DEFAULT_MAX_CONCURRENT_STREAMS
    keepalive_interval: float = DEFAULT_KEEPALIVE_INTERVAL
    keepalive_timeout: float = DEFAULT_KEEPALIVE_TIMEOUT
    grpc_bootstrap: str | None = None  # where to write the proxyless gRPC bootstrap, if at all
    tls: TlsFiles | None = None  # None: plaintext to istiod
    token_path: str = DEFAULT_TOKEN_PATH
    readiness_probe: Probe | None = None  # ProxyConfig.readinessProbe: workload health checks
    pcds_enabled: bool = False  # PROXY_CONFIG_XDS_AGENT: consume ProxyConfig pushes
    trust_bundle: str = f"{DEFAULT_CONFIG_PATH}/trust-bundle.pem"
    node_id: str = "sidecar~127.0.0.1~xdsfast.default~default.svc.cluster.local"
    node_metadata: tuple[tuple[str, str], ...] = field(default_factory=tuple)
    engine: str = "fast"  # --engine / XDSFAST_ENGINE: the transport, "fast" or "grpcio"
    # XDSFAST_HEAP_RELEASE_INTERVAL: freed buffers are kept for the next push and given back
    # this often (seconds); 0 (or glibc malloc tuned through its own variables): glibc's policy
    heap_release_interval: float = DEFAULT_HEAP_RELEASE_INTERVAL
    # XDSFAST_ENVOY_SEND_BUFFER: the kernel's send buffer for each Envoy connection on the
    # Unix socket (fast engine), so a big push goes to Envoy in fewer, larger writes
    envoy_send_buffer: int = DEFAULT_ENVOY_SEND_BUFFER
    # ECDS Wasm conversion (Istio's env vars; the cache directory also --wasm-cache-dir)
    wasm_conversion: bool = True  # ISTIO_AGENT_ENABLE_WASM_REMOTE_LOAD_CONVERSION
    wasm_cache_dir: str = DEFAULT_WASM_CACHE_DIR
    wasm_module_expiry: float = DEFAULT_WASM_MODULE_EXPIRY
    wasm_purge_interval: float = DEFAULT_WASM_PURGE_INTERVAL
    wasm_http_request_timeout: float = DEFAULT_WASM_HTTP_REQUEST_TIMEOUT
    wasm_http_max_retries: int = DEFAULT_WASM_HTTP_MAX_RETRIES
    wasm_max_binary_size: int = DEFAULT_WASM_MAX_BINARY_SIZE
    wasm_insecure_registries: tuple[str, ...] = ()  # WASM_INSECURE_REGISTRIES ("*": all)
    wasm_blocked_cidrs: tuple[str, ...] = ()  # BLOCKED_CIDRS_IN_WASM_FETCH

    @classmethod
    def build(cls, flags: Mapping[str, Any], env: Mapping[str, str]) -> Config:
        """Combine parsed flags (None = not given) with the environment."""
        proxy_config = _proxy_config(env.get("PROXY_CONFIG", ""))
        discovery = _first(
            flags.get("discovery_address"),
            proxy_config.get("discoveryAddress"),
            DEFAULT_DISCOVERY_ADDRESS,
        )
        check_address(discovery, "discovery address", allow_unix=True)
        config_path = str(proxy_config.get("configPath") or DEFAULT_CONFIG_PATH)
        plaintext = bool(flags.get("plaintext")) or (
            str(proxy_config.get("controlPlaneAuthPolicy", "")).upper() == "NONE"
        )
        dns_flag = flags.get("dns")
        dns_enabled = (
            dns_flag
            if dns_flag is not None
            else _bool(env, "ISTIO_META_DNS_CAPTURE") or _bool(env, "ISTIO_META_ENABLE_DNS_SERVER")
        )
        xds_listen = flags.get("xds_listen")
        if xds_listen:
            check_address(xds_listen, "--xds-listen", allow_port_zero=True)
        dns_address = _first(
            flags.get("dns_address"), env.get("DNS_PROXY_ADDR"), DEFAULT_DNS_ADDRESS
        )
        check_address(dns_address, "DNS address", allow_port_zero=True)
        dns_upstreams = tuple(flags.get("dns_upstream") or ())
        for upstream in dns_upstreams:
            check_dns_upstream(upstream)
        pod_namespace = env.get("POD_NAMESPACE", "")
        status_address = _first(flags.get("status_address"), None, DEFAULT_STATUS_ADDRESS)
        check_address(status_address, "status address", allow_port_zero=True)
        log_level = _first(flags.get("log_level"), None, "info").lower()
        if log_level not in LOG_LEVELS:
            raise ConfigError(
                f"--log-level must be one of {', '.join(LOG_LEVELS)}, not {log_level!r}"
            )
        log_format = _first(flags.get("log_format"), None, "text")
        if log_format not in LOG_FORMATS:
            raise ConfigError(f"--log-format must be text or json, not {log_format!r}")
        return cls(
            discovery_address=discovery,
            plaintext=plaintext,
            xds_socket=_first(flags.get("xds_socket"), None, f"{config_path.rstrip('/')}/XDS"),
            xds_listen=xds_listen or None,
            dns_enabled=bool(dns_enabled),
            dns_address=dns_address,
            resolv_conf=_first(flags.get("resolv_conf"), None, DEFAULT_RESOLV_CONF),
            dns_upstreams=dns_upstreams,
            dns_forward_parallel=_bool(env, "DNS_FORWARD_PARALLEL"),
            dns_forward_remote=_bool(env, "XDSFAST_DNS_FORWARD_REMOTE"),
            dns_forward_timeout=_duration(env, "DNS_FORWARD_TIMEOUT", DEFAULT_DNS_FORWARD_TIMEOUT),
            node_dns_capture=env.get("XDSFAST_NODE_DNS_CAPTURE", "") == ""
            or _bool(env, "XDSFAST_NODE_DNS_CAPTURE"),
            pod_namespace=pod_namespace,
            domain=_first(flags.get("domain"), None, f"{pod_namespace}.svc.cluster.local"),
            status_address=status_address,
            log_level=log_level,
            log_format=log_format,
            cluster_id=env.get("ISTIO_META_CLUSTER_ID", ""),
            xds_headers=xds_headers(env),
            max_recv_msg_size=_int(env, "ISTIO_GPRC_MAXRECVMSGSIZE", DEFAULT_MAX_RECV_MSG_SIZE),
            max_concurrent_streams=_int(
                env, "ISTIO_GPRC_MAXSTREAMS", DEFAULT_MAX_CONCURRENT_STREAMS
            ),
            keepalive_interval=_duration(
                env, "GRPC_KEEPALIVE_INTERVAL", DEFAULT_KEEPALIVE_INTERVAL
            ),
            keepalive_timeout=_duration(env, "GRPC_KEEPALIVE_TIMEOUT", DEFAULT_KEEPALIVE_TIMEOUT),
            grpc_bootstrap=_first(
                flags.get("grpc_bootstrap"),
                env.get("GRPC_XDS_BOOTSTRAP"),
                f"{config_path.rstrip('/')}/grpc-bootstrap.json",
            ),
            tls=None if plaintext else tls_files(discovery, env),
            token_path=_first(flags.get("token_path"), None, DEFAULT_TOKEN_PATH),
            readiness_probe=_readiness_probe(proxy_config, env),
            pcds_enabled=_bool(env, "PROXY_CONFIG_XDS_AGENT"),
            trust_bundle=f"{config_path.rstrip('/')}/trust-bundle.pem",
            node_id=_first(flags.get("node_id"), None, node_id(env)),
            node_metadata=node_metadata(env),
            engine=_engine(flags.get("engine"), env),
            heap_release_interval=_heap_release_interval(env),
            envoy_send_buffer=_int(
                env,
                "XDSFAST_ENVOY_SEND_BUFFER",
                DEFAULT_ENVOY_SEND_BUFFER,
                zero_allowed=True,
                at_most=ENVOY_SEND_BUFFER_MAX,
            ),
            wasm_conversion=env.get("ISTIO_AGENT_ENABLE_WASM_REMOTE_LOAD_CONVERSION", "") == ""
            or _bool(env, "ISTIO_AGENT_ENABLE_WASM_REMOTE_LOAD_CONVERSION"),
            wasm_cache_dir=_first(flags.get("wasm_cache_dir"), None, DEFAULT_WASM_CACHE_DIR),
            wasm_module_expiry=_duration(env, "WASM_MODULE_EXPIRY", DEFAULT_WASM_MODULE_EXPIRY),
            wasm_purge_interval=_duration(env, "WASM_PURGE_INTERVAL", DEFAULT_WASM_PURGE_INTERVAL),
            wasm_http_request_timeout=_duration(
                env, "WASM_HTTP_REQUEST_TIMEOUT", DEFAULT_WASM_HTTP_REQUEST_TIMEOUT
            ),
            wasm_http_max_retries=_int(
                env, "WASM_HTTP_REQUEST_MAX_RETRIES", DEFAULT_WASM_HTTP_MAX_RETRIES
            ),
            wasm_max_binary_size=_int(
                env, "ISTIO_WASM_MAX_BINARY_SIZE_BYTES", DEFAULT_WASM_MAX_BINARY_SIZE
            ),
            wasm_insecure_registries=_list(env, "WASM_INSECURE_REGISTRIES"),
            wasm_blocked_cidrs=_cidrs(env, "BLOCKED_CIDRS_IN_WASM_FETCH"),
        )

    @property
    def upstream_target(self) -> str:
        """The discovery address as a gRPC target."""
        return self.discovery_address


def _readiness_probe(proxy_config: Mapping[str, Any], env: Mapping[str, str]) -> Probe | None:
    spec = proxy_config.get("readinessProbe")
    if not spec:
        return None
    if not isinstance(spec, dict):
        raise ConfigError("PROXY_CONFIG readinessProbe must be an object")
    host = (env.get("INSTANCE_IP") or "").split(",")[0] or "localhost"
    if _bool(env, "REWRITE_PROBE_LEGACY_LOCALHOST_DESTINATION"):
        host = "localhost"
    from xdsfast.health import ProbeError, probe_from_config

    try:
        return probe_from_config(spec, host)
    except (ProbeError, KeyError, TypeError, AttributeError) as exc:
        raise ConfigError(f"PROXY_CONFIG: {exc}") from None


def _list(env: Mapping[str, str], name: str) -> tuple[str, ...]:
    """A comma-separated list; empty items are dropped."""
    return tuple(item.strip() for item in env.get(name, "").split(",") if item.strip())


def _cidrs(env: Mapping[str, str], name: str) -> tuple[str, ...]:
    cidrs = _list(env, name)
    for cidr in cidrs:
        try:
            ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            raise ConfigError(f"{name}: {cidr!r} is not a CIDR") from None
    return cidrs


ENGINES = ("fast", "grpcio")


def _engine(flag: Any, env: Mapping[str, str]) -> str:
    """The transport engine: ``--engine``, else ``XDSFAST_ENGINE``, else the fast one."""
    engine = _first(flag, env.get("XDSFAST_ENGINE"), "fast").lower()
    if engine not in ENGINES:
        raise ConfigError(f"--engine must be fast or grpcio, not {engine!r}")
    return engine


def _first(*values: Any) -> str:
    for value in values:
        if value is not None and value != "":
            return str(value)
    return ""


class _NotJson(Exception):
    """The text is not JSON that YAML would read the same way."""


def _not_json(_: str) -> NoReturn:
    raise _NotJson


# JSON whose YAML reading is the same: printable ASCII lines (YAML rejects tabs between
# tokens and some raw control characters) without escaped surrogate pairs (YAML keeps the
# two halves); floats and NaN are refused while parsing (``1e3`` is a string in YAML 1.1).
_YAML_SAFE_TEXT = re.compile(r"[\n\r\x20-\x7e]*")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89abAB]")


def _load_yaml_or_json(text: str) -> Any:
    """``yaml.safe_load(text)``, reading JSON without PyYAML where that gives the same
    value: Istio's injector writes ``PROXY_CONFIG`` as JSON, and importing PyYAML costs
    ~1 MB of resident memory for the life of the process."""
    if (
        text.lstrip().startswith("{")
        and _YAML_SAFE_TEXT.fullmatch(text)
        and not _SURROGATE_ESCAPE.search(text)
    ):
        try:
            return json.loads(text, parse_float=_not_json, parse_constant=_not_json)
        except (ValueError, _NotJson):
            pass
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0]
        raise ConfigError(f"PROXY_CONFIG is not valid YAML or JSON: {first}") from None


def _proxy_config(text: str) -> dict[str, Any]:
    """Istio's ``PROXY_CONFIG``: a ProxyConfig in YAML or JSON."""
    if not text.strip():
        return {}
    value = _load_yaml_or_json(text)
    if not isinstance(value, dict):
        raise ConfigError("PROXY_CONFIG must be a ProxyConfig object (YAML or JSON)")
    return value


_TRUE = {"1", "t", "T", "TRUE", "true", "True"}
_FALSE = {"0", "f", "F", "FALSE", "false", "False"}


def _bool(env: Mapping[str, str], name: str) -> bool:
    """Go's strconv.ParseBool, which Istio's env vars use; empty means unset."""
    value = env.get(name, "")
    if value == "" or value in _FALSE:
        return False
    if value in _TRUE:
        return True
    raise ConfigError(f"{name}={value!r} is not a boolean (true or false)")


def _int(
    env: Mapping[str, str],
    name: str,
    default: int,
    *,
    zero_allowed: bool = False,
    at_most: int | None = None,
) -> int:
    value = env.get(name, "")
    if value == "":
        return default
    try:
        number = int(value)
    except ValueError:
        raise ConfigError(f"{name}={value!r} is not an integer") from None
    if number < 0 or (number == 0 and not zero_allowed):
        raise ConfigError(f"{name}={value!r} must be {'0 or more' if zero_allowed else 'positive'}")
    if at_most is not None and number > at_most:
        raise ConfigError(f"{name}={value!r} must be at most {at_most}")
    return number


_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """Go's time.ParseDuration (``30s``, ``1m30s``, ``500ms``), in seconds."""
    if text == "0":
        return 0.0
    pos = 0
    total = 0.0
    while pos < len(text):
        match = _DURATION_PART.match(text, pos)
        if match is None:
            raise ValueError(text)
        total += float(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
    if pos == 0:
        raise ValueError(text)
    return total


def _duration(
    env: Mapping[str, str], name: str, default: float, *, zero_allowed: bool = False
) -> float:
    value = env.get(name, "")
    if value == "":
        return default
    try:
        seconds = parse_duration(value)
    except ValueError:
        raise ConfigError(f"{name}={value!r} is not a duration (like 30s or 1m)") from None
    if seconds == 0 and not zero_allowed:
        raise ConfigError(f"{name}={value!r} must be positive")
    return seconds


def _heap_release_interval(env: Mapping[str, str]) -> float:
    """0 when the operator tuned glibc's malloc themselves: their settings stand."""
    interval = _duration(
        env, "XDSFAST_HEAP_RELEASE_INTERVAL", DEFAULT_HEAP_RELEASE_INTERVAL, zero_allowed=True
    )
    from xdsfast import heap

    return 0.0 if heap.operator_tuned(env) else interval


_HEADER_NAME = re.compile(r"^[0-9a-z_.-]+$")


def xds_headers(env: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    """Every ``XDS_HEADER_<NAME>=<value>`` as gRPC metadata ``<name>: value``."""
    headers = []
    for key in sorted(env):
        if not key.startswith(XDS_HEADER_PREFIX) or key == XDS_HEADER_PREFIX:
            continue
        name = key[len(XDS_HEADER_PREFIX) :].lower()
        value = env[key]
        if not _HEADER_NAME.match(name) or name.startswith("grpc-"):
            raise ConfigError(f"{key}: {name!r} cannot be a gRPC metadata key")
        if name.endswith("-bin") or not all(" " <= c <= "~" for c in value):
            raise ConfigError(f"{key}: the value must be printable ASCII")
        headers.append((name, value))
    return tuple(headers)


def _required(path: str, what: str) -> str:
    """``path`` if it is a regular file; else a ConfigError saying exactly what it is
    (``stat`` only: a FIFO there is not opened, so start-up never blocks on it)."""
    try:
        check_regular(path, what)
    except FileProblem as exc:
        raise ConfigError(str(exc)) from None
    return path


def root_ca(env: Mapping[str, str]) -> str:
    """istiod's root CA, looked for in Istio's order."""
    explicit = env.get("XDS_ROOT_CA", "")
    if explicit == SYSTEM_ROOTS:
        return SYSTEM_ROOTS
    if explicit:
        return _required(explicit, "XDS_ROOT_CA:")
    if os.path.isfile(MOUNTED_ROOT_CA):
        return MOUNTED_ROOT_CA
    if env.get("PROV_CERT"):
        return _required(os.path.join(env["PROV_CERT"], "root-cert.pem"), "PROV_CERT root CA")
    if _bool(env, "FILE_MOUNTED_CERTS"):
        mounted = env.get("ISTIO_META_TLS_CLIENT_ROOT_CERT", "")
        if not mounted:
            raise ConfigError("FILE_MOUNTED_CERTS needs ISTIO_META_TLS_CLIENT_ROOT_CERT")
        return _required(mounted, "ISTIO_META_TLS_CLIENT_ROOT_CERT:")
    if env.get("PILOT_CERT_PROVIDER", "").lower() == "none":
        raise ConfigError("PILOT_CERT_PROVIDER=none gives no root CA for istiod; set XDS_ROOT_CA")
    return _required(DEFAULT_ROOT_CA, "istiod's root CA")


def tls_files(discovery: str, env: Mapping[str, str]) -> TlsFiles:
    """TLS to istiod as Istio's agent sets it up (root CA, server name, client certificate)."""
    host = "" if discovery.startswith("unix:") else split_host_port(discovery)[0]
    server_name = env.get("ISTIOD_SAN") or (
        ISTIOD_SERVER_NAME if not host or "localhost" in host else host
    )
    key = chain = None
    if env.get("PROV_CERT"):
        key = os.path.join(env["PROV_CERT"], "key.pem")
        chain = os.path.join(env["PROV_CERT"], "cert-chain.pem")
    elif _bool(env, "FILE_MOUNTED_CERTS"):
        key = env.get("ISTIO_META_TLS_CLIENT_KEY") or None
        chain = env.get("ISTIO_META_TLS_CLIENT_CERT_CHAIN") or None
    return TlsFiles(root_ca(env), server_name, key, chain)


def node_id(env: Mapping[str, str]) -> str:
    """Istio's sidecar node id: ``sidecar~IP~POD.NAMESPACE~NAMESPACE.svc.cluster.local``."""
    namespace = env.get("POD_NAMESPACE") or "default"
    pod = env.get("POD_NAME") or "xdsfast"
    ip = (env.get("INSTANCE_IP") or "127.0.0.1").split(",")[0]
    return f"sidecar~{ip}~{pod}.{namespace}~{namespace}.svc.cluster.local"


def node_metadata(env: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    """Node metadata as Istio's agent forms it: ``ISTIO_META_<KEY>`` becomes ``<KEY>``."""
    meta = {k[len("ISTIO_META_") :]: v for k, v in env.items() if k.startswith("ISTIO_META_")}
    if env.get("POD_NAMESPACE"):
        meta.setdefault("NAMESPACE", env["POD_NAMESPACE"])
    if env.get("INSTANCE_IP"):
        meta.setdefault("INSTANCE_IPS", env["INSTANCE_IP"])
    return tuple(sorted(meta.items()))


def split_host_port(address: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port``; raises ValueError."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(address)
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(address)
    return host, int(port)


def check_address(
    address: str, what: str, *, allow_unix: bool = False, allow_port_zero: bool = False
) -> None:
    """Reject anything that is not HOST:PORT (or unix:PATH where allowed)."""
    if allow_unix and address.startswith("unix:"):
        if len(address) <= len("unix:"):
            raise ConfigError(f"{what} {address!r}: unix: needs a path")
        return
    try:
        _, port = split_host_port(address)
    except ValueError:
        expected = "HOST:PORT or unix:PATH" if allow_unix else "HOST:PORT"
        raise ConfigError(f"{what} {address!r} is not {expected}") from None
    if port > 65535 or (port == 0 and not allow_port_zero):
        raise ConfigError(f"{what} {address!r}: port out of range")


def check_dns_upstream(address: str) -> None:
    """``--dns-upstream``: IP:PORT or [IPv6]:PORT (a resolver is not found by name)."""
    try:
        host, port = split_host_port(address)
        ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(f"--dns-upstream {address!r} is not IP:PORT or [IPv6]:PORT") from None
    if not 0 < port <= 65535:
        raise ConfigError(f"--dns-upstream {address!r}: port out of range")


def from_environment(flags: Mapping[str, Any]) -> Config:
    return Config.build(flags, os.environ)


def dump(config: Config) -> str:
    """The configuration as one JSON line (no secrets are held here)."""
    return json.dumps(config.__dict__, default=list)
