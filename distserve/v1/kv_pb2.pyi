from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class PullKvRequest(_message.Message):
    __slots__ = ("request_id", "transfer_token", "chunk_bytes", "wire_dtype")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    WIRE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    transfer_token: bytes
    chunk_bytes: int
    wire_dtype: str
    def __init__(self, request_id: _Optional[str] = ..., transfer_token: _Optional[bytes] = ..., chunk_bytes: _Optional[int] = ..., wire_dtype: _Optional[str] = ...) -> None: ...

class KvChunk(_message.Message):
    __slots__ = ("offset", "data", "total_bytes", "shape", "dtype", "wire_dtype")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    WIRE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    offset: int
    data: bytes
    total_bytes: int
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    wire_dtype: str
    def __init__(self, offset: _Optional[int] = ..., data: _Optional[bytes] = ..., total_bytes: _Optional[int] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ..., wire_dtype: _Optional[str] = ...) -> None: ...

class ReleaseKvRequest(_message.Message):
    __slots__ = ("request_id", "transfer_token")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    transfer_token: bytes
    def __init__(self, request_id: _Optional[str] = ..., transfer_token: _Optional[bytes] = ...) -> None: ...

class ReleaseKvResponse(_message.Message):
    __slots__ = ("released",)
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    released: bool
    def __init__(self, released: _Optional[bool] = ...) -> None: ...

class PushKvRequest(_message.Message):
    __slots__ = ("request_id", "transfer_token", "transport", "channel", "capacity", "wire_dtype", "params")
    class ParamsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    WIRE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    transfer_token: bytes
    transport: str
    channel: str
    capacity: int
    wire_dtype: str
    params: _containers.ScalarMap[str, str]
    def __init__(self, request_id: _Optional[str] = ..., transfer_token: _Optional[bytes] = ..., transport: _Optional[str] = ..., channel: _Optional[str] = ..., capacity: _Optional[int] = ..., wire_dtype: _Optional[str] = ..., params: _Optional[_Mapping[str, str]] = ...) -> None: ...

class PushKvResponse(_message.Message):
    __slots__ = ("wire_bytes", "shape", "dtype", "wire_dtype", "channel_gone")
    WIRE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    WIRE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_GONE_FIELD_NUMBER: _ClassVar[int]
    wire_bytes: int
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    wire_dtype: str
    channel_gone: bool
    def __init__(self, wire_bytes: _Optional[int] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ..., wire_dtype: _Optional[str] = ..., channel_gone: _Optional[bool] = ...) -> None: ...

class ConnectKvRequest(_message.Message):
    __slots__ = ("transport", "channel", "peer_id", "params")
    class ParamsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_FIELD_NUMBER: _ClassVar[int]
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    transport: str
    channel: str
    peer_id: str
    params: _containers.ScalarMap[str, str]
    def __init__(self, transport: _Optional[str] = ..., channel: _Optional[str] = ..., peer_id: _Optional[str] = ..., params: _Optional[_Mapping[str, str]] = ...) -> None: ...

class ConnectKvResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DisconnectKvRequest(_message.Message):
    __slots__ = ("transport", "channel")
    TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_FIELD_NUMBER: _ClassVar[int]
    transport: str
    channel: str
    def __init__(self, transport: _Optional[str] = ..., channel: _Optional[str] = ...) -> None: ...

class DisconnectKvResponse(_message.Message):
    __slots__ = ("dropped",)
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    dropped: bool
    def __init__(self, dropped: _Optional[bool] = ...) -> None: ...
