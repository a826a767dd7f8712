import datetime

from google.protobuf import any_pb2 as _any_pb2
from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FailurePolicy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    UNSPECIFIED: _ClassVar[FailurePolicy]
    FAIL_RELOAD: _ClassVar[FailurePolicy]
    FAIL_CLOSED: _ClassVar[FailurePolicy]
    FAIL_OPEN: _ClassVar[FailurePolicy]
UNSPECIFIED: FailurePolicy
FAIL_RELOAD: FailurePolicy
FAIL_CLOSED: FailurePolicy
FAIL_OPEN: FailurePolicy

class TypedExtensionConfig(_message.Message):
    __slots__ = ("name", "typed_config")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TYPED_CONFIG_FIELD_NUMBER: _ClassVar[int]
    name: str
    typed_config: _any_pb2.Any
    def __init__(self, name: _Optional[str] = ..., typed_config: _Optional[_Union[_any_pb2.Any, _Mapping]] = ...) -> None: ...

class Wasm(_message.Message):
    __slots__ = ("config",)
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    config: PluginConfig
    def __init__(self, config: _Optional[_Union[PluginConfig, _Mapping]] = ...) -> None: ...

class PluginConfig(_message.Message):
    __slots__ = ("name", "root_id", "vm_config", "configuration", "fail_open", "failure_policy")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ROOT_ID_FIELD_NUMBER: _ClassVar[int]
    VM_CONFIG_FIELD_NUMBER: _ClassVar[int]
    CONFIGURATION_FIELD_NUMBER: _ClassVar[int]
    FAIL_OPEN_FIELD_NUMBER: _ClassVar[int]
    FAILURE_POLICY_FIELD_NUMBER: _ClassVar[int]
    name: str
    root_id: str
    vm_config: VmConfig
    configuration: _any_pb2.Any
    fail_open: bool
    failure_policy: FailurePolicy
    def __init__(self, name: _Optional[str] = ..., root_id: _Optional[str] = ..., vm_config: _Optional[_Union[VmConfig, _Mapping]] = ..., configuration: _Optional[_Union[_any_pb2.Any, _Mapping]] = ..., fail_open: _Optional[bool] = ..., failure_policy: _Optional[_Union[FailurePolicy, str]] = ...) -> None: ...

class VmConfig(_message.Message):
    __slots__ = ("vm_id", "runtime", "code", "configuration", "allow_precompiled", "nack_on_code_cache_miss", "environment_variables")
    VM_ID_FIELD_NUMBER: _ClassVar[int]
    RUNTIME_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    CONFIGURATION_FIELD_NUMBER: _ClassVar[int]
    ALLOW_PRECOMPILED_FIELD_NUMBER: _ClassVar[int]
    NACK_ON_CODE_CACHE_MISS_FIELD_NUMBER: _ClassVar[int]
    ENVIRONMENT_VARIABLES_FIELD_NUMBER: _ClassVar[int]
    vm_id: str
    runtime: str
    code: AsyncDataSource
    configuration: _any_pb2.Any
    allow_precompiled: bool
    nack_on_code_cache_miss: bool
    environment_variables: EnvironmentVariables
    def __init__(self, vm_id: _Optional[str] = ..., runtime: _Optional[str] = ..., code: _Optional[_Union[AsyncDataSource, _Mapping]] = ..., configuration: _Optional[_Union[_any_pb2.Any, _Mapping]] = ..., allow_precompiled: _Optional[bool] = ..., nack_on_code_cache_miss: _Optional[bool] = ..., environment_variables: _Optional[_Union[EnvironmentVariables, _Mapping]] = ...) -> None: ...

class EnvironmentVariables(_message.Message):
    __slots__ = ("host_env_keys", "key_values")
    class KeyValuesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    HOST_ENV_KEYS_FIELD_NUMBER: _ClassVar[int]
    KEY_VALUES_FIELD_NUMBER: _ClassVar[int]
    host_env_keys: _containers.RepeatedScalarFieldContainer[str]
    key_values: _containers.ScalarMap[str, str]
    def __init__(self, host_env_keys: _Optional[_Iterable[str]] = ..., key_values: _Optional[_Mapping[str, str]] = ...) -> None: ...

class AsyncDataSource(_message.Message):
    __slots__ = ("local", "remote")
    LOCAL_FIELD_NUMBER: _ClassVar[int]
    REMOTE_FIELD_NUMBER: _ClassVar[int]
    local: DataSource
    remote: RemoteDataSource
    def __init__(self, local: _Optional[_Union[DataSource, _Mapping]] = ..., remote: _Optional[_Union[RemoteDataSource, _Mapping]] = ...) -> None: ...

class RemoteDataSource(_message.Message):
    __slots__ = ("http_uri", "sha256")
    HTTP_URI_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    http_uri: HttpUri
    sha256: str
    def __init__(self, http_uri: _Optional[_Union[HttpUri, _Mapping]] = ..., sha256: _Optional[str] = ...) -> None: ...

class HttpUri(_message.Message):
    __slots__ = ("uri", "cluster", "timeout")
    URI_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    uri: str
    cluster: str
    timeout: _duration_pb2.Duration
    def __init__(self, uri: _Optional[str] = ..., cluster: _Optional[str] = ..., timeout: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class DataSource(_message.Message):
    __slots__ = ("filename", "inline_bytes", "inline_string", "environment_variable")
    FILENAME_FIELD_NUMBER: _ClassVar[int]
    INLINE_BYTES_FIELD_NUMBER: _ClassVar[int]
    INLINE_STRING_FIELD_NUMBER: _ClassVar[int]
    ENVIRONMENT_VARIABLE_FIELD_NUMBER: _ClassVar[int]
    filename: str
    inline_bytes: bytes
    inline_string: str
    environment_variable: str
    def __init__(self, filename: _Optional[str] = ..., inline_bytes: _Optional[bytes] = ..., inline_string: _Optional[str] = ..., environment_variable: _Optional[str] = ...) -> None: ...

class TypedStruct(_message.Message):
    __slots__ = ("type_url", "value")
    TYPE_URL_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    type_url: str
    value: _struct_pb2.Struct
    def __init__(self, type_url: _Optional[str] = ..., value: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class Rbac(_message.Message):
    __slots__ = ("action",)
    class Action(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        ALLOW: _ClassVar[Rbac.Action]
        DENY: _ClassVar[Rbac.Action]
        LOG: _ClassVar[Rbac.Action]
    ALLOW: Rbac.Action
    DENY: Rbac.Action
    LOG: Rbac.Action
    ACTION_FIELD_NUMBER: _ClassVar[int]
    action: Rbac.Action
    def __init__(self, action: _Optional[_Union[Rbac.Action, str]] = ...) -> None: ...

class HttpRbac(_message.Message):
    __slots__ = ("rules", "rules_stat_prefix")
    RULES_FIELD_NUMBER: _ClassVar[int]
    RULES_STAT_PREFIX_FIELD_NUMBER: _ClassVar[int]
    rules: Rbac
    rules_stat_prefix: str
    def __init__(self, rules: _Optional[_Union[Rbac, _Mapping]] = ..., rules_stat_prefix: _Optional[str] = ...) -> None: ...

class NetworkRbac(_message.Message):
    __slots__ = ("rules", "stat_prefix")
    RULES_FIELD_NUMBER: _ClassVar[int]
    STAT_PREFIX_FIELD_NUMBER: _ClassVar[int]
    rules: Rbac
    stat_prefix: str
    def __init__(self, rules: _Optional[_Union[Rbac, _Mapping]] = ..., stat_prefix: _Optional[str] = ...) -> None: ...
