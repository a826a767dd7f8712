"""One Wasm plugin's configuration, however it arrived: a typed HTTP or network Wasm
filter, or a TypedStruct (udpa or xds) wrapping either.

A :class:`Plugin` answers what the conversion needs (where the code is, its
checksum, timeout, fail-open, the VM's environment) and produces the new
``typed_config`` with the code pointing at a local file and every ``ISTIO_META*``
environment key removed. The typed form is edited as protobuf (unknown fields
survive); the TypedStruct form is edited as its JSON, so nothing is lost either,
and it stays a TypedStruct.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from google.protobuf import any_pb2, json_format, struct_pb2
from google.protobuf.message import DecodeError

from xdsfast.wasm import wasm_pb2
from xdsfast.wasm.types import NETWORK_WASM, TYPED_STRUCTS, WASM_TYPES

META_PREFIX = "ISTIO_META"
PULL_SECRET = "ISTIO_META_WASM_IMAGE_PULL_SECRET"
PULL_POLICY = "ISTIO_META_WASM_IMAGE_PULL_POLICY"
RESOURCE_VERSION = "ISTIO_META_WASM_PLUGIN_RESOURCE_VERSION"


class NotWasm(Exception):
    """The typed_config is not a Wasm filter: nothing to convert."""


class BadConfig(ValueError):
    """A Wasm filter that cannot be decoded (NACK)."""


@dataclass
class Plugin:
    """What the conversion reads from a Wasm filter config."""

    network: bool
    fail_open: bool
    kind: str  # "remote", "local" or "" (no code at all)
    url: str = ""  # the remote http_uri.uri ("" when there is no http_uri)
    sha256: str = ""  # "" when not given ("nil" counts as not given)
    timeout: float | None = None  # http_uri.timeout, if set and positive
    env: dict[str, str] = field(default_factory=dict)
    _localize: Any = None  # (path: str) -> any_pb2.Any

    def localized(self, path: str) -> any_pb2.Any:
        """The typed_config with the code in ``path`` and no ISTIO_META* environment."""
        result: any_pb2.Any = self._localize(path)
        return result


def read_plugin(typed_config: any_pb2.Any) -> Plugin:
    """The plugin in ``typed_config``; NotWasm or BadConfig."""
    if typed_config.type_url in WASM_TYPES:
        return _typed(typed_config)
    if typed_config.type_url in TYPED_STRUCTS:
        return _struct(typed_config)
    raise NotWasm(typed_config.type_url)


def _fail_open(policy: int, deprecated: bool) -> bool:
    if policy == wasm_pb2.FAIL_OPEN:
        return True
    if policy == wasm_pb2.UNSPECIFIED:
        return deprecated
    return False  # FAIL_CLOSED, and FAIL_RELOAD (there is nothing to reload from)


def _sha(value: str) -> str:
    return "" if value == "nil" else value


def _typed(typed_config: any_pb2.Any) -> Plugin:
    try:
        wasm = wasm_pb2.Wasm.FromString(typed_config.value)
    except DecodeError as exc:
        raise BadConfig(f"cannot decode {typed_config.type_url}: {exc}") from None
    config = wasm.config
    vm = config.vm_config
    code = vm.code
    kind = code.WhichOneof("specifier") or ""
    plugin = Plugin(
        network=typed_config.type_url == NETWORK_WASM,
        fail_open=_fail_open(config.failure_policy, config.fail_open),
        kind=kind,
        env=dict(vm.environment_variables.key_values),
    )
    if kind == "remote":
        remote = code.remote
        plugin.url = remote.http_uri.uri
        plugin.sha256 = _sha(remote.sha256)
        if remote.http_uri.HasField("timeout"):
            seconds = remote.http_uri.timeout.seconds + remote.http_uri.timeout.nanos / 1e9
            plugin.timeout = seconds if seconds > 0 else None

    def localize(path: str) -> any_pb2.Any:
        changed = wasm_pb2.Wasm()
        changed.CopyFrom(wasm)
        changed_vm = changed.config.vm_config
        changed_vm.code.local.filename = path  # replaces the remote source (a oneof)
        _strip(changed_vm.environment_variables.key_values)
        return any_pb2.Any(type_url=typed_config.type_url, value=changed.SerializeToString())

    plugin._localize = localize
    return plugin


def _strip(key_values: Any) -> None:
    for key in [k for k in key_values if k.startswith(META_PREFIX)]:
        del key_values[key]


# ----- TypedStruct: the same fields, as JSON (either field-name spelling) ------------


def _key(obj: dict[str, Any], snake: str) -> str:
    """The key ``obj`` uses for field ``snake``: the proto name or its lowerCamel JSON name."""
    if snake in obj:
        return snake
    head, *rest = snake.split("_")
    camel = head + "".join(part.title() for part in rest)
    return camel if camel in obj else snake


def _obj(obj: dict[str, Any], snake: str) -> dict[str, Any]:
    value = obj.get(_key(obj, snake))
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadConfig(f"TypedStruct Wasm config: {snake} is not an object")
    return value


def _struct(typed_config: any_pb2.Any) -> Plugin:
    try:
        typed = wasm_pb2.TypedStruct.FromString(typed_config.value)
    except DecodeError as exc:
        raise BadConfig(f"cannot decode {typed_config.type_url}: {exc}") from None
    if typed.type_url not in WASM_TYPES:
        raise NotWasm(typed.type_url)
    value: dict[str, Any] = json_format.MessageToDict(typed.value)
    config = _obj(value, "config")
    vm = _obj(config, "vm_config")
    code = _obj(vm, "code")
    env = {str(k): str(v) for k, v in _obj(_obj(vm, "environment_variables"), "key_values").items()}
    policy_value = config.get(_key(config, "failure_policy"), 0)
    try:
        policy = (
            wasm_pb2.FailurePolicy.Value(policy_value)
            if isinstance(policy_value, str)
            else int(policy_value)
        )
    except ValueError:
        raise BadConfig(f"TypedStruct Wasm config: bad failure_policy {policy_value!r}") from None
    kind = "remote" if "remote" in code else "local" if "local" in code else ""
    plugin = Plugin(
        network=typed.type_url == NETWORK_WASM,
        fail_open=_fail_open(policy, config.get(_key(config, "fail_open")) is True),
        kind=kind,
        env=env,
    )
    if kind == "remote":
        remote = _obj(code, "remote")
        http_uri = _obj(remote, "http_uri")
        plugin.url = str(http_uri.get("uri", ""))
        plugin.sha256 = _sha(str(remote.get("sha256", "")))
        timeout = http_uri.get("timeout")
        if isinstance(timeout, str) and timeout.endswith("s"):
            try:
                seconds = float(timeout[:-1])
            except ValueError:
                raise BadConfig(f"TypedStruct Wasm config: bad timeout {timeout!r}") from None
            plugin.timeout = seconds if seconds > 0 else None

    def localize(path: str) -> any_pb2.Any:
        # ``value`` is this call's own dict: edit it in place and re-wrap it.
        vm_obj = _obj(_obj(value, "config"), "vm_config")
        vm_obj[_key(vm_obj, "code")] = {"local": {"filename": path}}
        key_values = _obj(_obj(vm_obj, "environment_variables"), "key_values")
        for k in [k for k in key_values if k.startswith(META_PREFIX)]:
            del key_values[k]
        body = struct_pb2.Struct()
        body.update(value)
        changed = wasm_pb2.TypedStruct(type_url=typed.type_url, value=body)
        return any_pb2.Any(type_url=typed_config.type_url, value=changed.SerializeToString())

    plugin._localize = localize
    return plugin
