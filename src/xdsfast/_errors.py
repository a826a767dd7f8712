"""Errors shared by the compiled core and its pure-Python twin.

Kept in a module of its own so that both implementations raise the very
same class, whichever one is active.
"""


class WireError(ValueError):
    """Bytes that are not a well-formed protobuf message of the expected kind."""


class H2ConnectionError(Exception):
    """An HTTP/2 connection-level protocol error: the connection ends with GOAWAY ``code``."""

    def __init__(self, code: int, why: str) -> None:
        super().__init__(why)
        self.code = code
