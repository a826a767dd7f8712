# HTTP/2's numbers for the compiled core, as compile-time constants: the same names and
# values as h2numbers.py's IntEnums, which are the registry (test_h2 holds the two equal).
# Enum members share C's one namespace, so the PRIORITY flag is spelled PRIORITY_FLAG here
# (the PRIORITY frame type has the bare name).  Nothing to build: cimported only.

cdef enum FrameType:
    DATA = 0x0
    HEADERS = 0x1
    PRIORITY = 0x2
    RST_STREAM = 0x3
    SETTINGS = 0x4
    PUSH_PROMISE = 0x5
    PING = 0x6
    GOAWAY = 0x7
    WINDOW_UPDATE = 0x8
    CONTINUATION = 0x9

cdef enum Flag:
    END_STREAM = 0x1
    ACK = 0x1
    END_HEADERS = 0x4
    PADDED = 0x8
    PRIORITY_FLAG = 0x20

cdef enum ErrorCode:
    NO_ERROR = 0x0
    PROTOCOL_ERROR = 0x1
    INTERNAL_ERROR = 0x2
    FLOW_CONTROL_ERROR = 0x3
    SETTINGS_TIMEOUT = 0x4
    STREAM_CLOSED = 0x5
    FRAME_SIZE_ERROR = 0x6
    REFUSED_STREAM = 0x7
    CANCEL = 0x8
    COMPRESSION_ERROR = 0x9
    CONNECT_ERROR = 0xA
    ENHANCE_YOUR_CALM = 0xB
    INADEQUATE_SECURITY = 0xC
    HTTP_1_1_REQUIRED = 0xD

cdef enum SettingCode:
    HEADER_TABLE_SIZE = 0x1
    ENABLE_PUSH = 0x2
    MAX_CONCURRENT_STREAMS = 0x3
    INITIAL_WINDOW_SIZE = 0x4
    MAX_FRAME_SIZE = 0x5
    MAX_HEADER_LIST_SIZE = 0x6

cdef enum:
    DEFAULT_WINDOW = 65535
    MAX_WINDOW = 2147483647
    DEFAULT_FRAME = 16384
    MAX_FRAME = 16777215
