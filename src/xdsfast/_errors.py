"""Errors shared by the compiled core and its pure-Python twin.

Kept in a module of its own so that both implementations raise the very
same class, whichever one is active.
"""


class WireError(ValueError):
    """Bytes that are not a well-formed protobuf message of the expected kind."""
