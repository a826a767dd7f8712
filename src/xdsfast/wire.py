"""The wire peeker, from the compiled core or its pure-Python twin.

The compiled ``xdsfast._core`` is used unless ``XDSFAST_NO_EXTENSIONS`` is set
to a non-empty value or it cannot be imported (a platform without a binary
wheel).  ``IMPLEMENTATION`` says which one is active.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from xdsfast._errors import WireError

__all__ = [
    "IMPLEMENTATION",
    "NO_EXTENSIONS",
    "DeltaRequestPeek",
    "DeltaResponsePeek",
    "RequestPeek",
    "ResponsePeek",
    "WireError",
    "peek_delta_request",
    "peek_delta_response",
    "peek_request",
    "peek_response",
]

NO_EXTENSIONS = bool(os.environ.get("XDSFAST_NO_EXTENSIONS"))

if TYPE_CHECKING or NO_EXTENSIONS:
    from xdsfast._core_py import (
        DeltaRequestPeek,
        DeltaResponsePeek,
        RequestPeek,
        ResponsePeek,
        peek_delta_request,
        peek_delta_response,
        peek_request,
        peek_response,
    )

    IMPLEMENTATION = "python"
else:
    try:
        from xdsfast._core import (
            DeltaRequestPeek,
            DeltaResponsePeek,
            RequestPeek,
            ResponsePeek,
            peek_delta_request,
            peek_delta_response,
            peek_request,
            peek_response,
        )

        IMPLEMENTATION = "cython"
    except ImportError:  # no compiled core for this platform: the twin serves
        from xdsfast._core_py import (
            DeltaRequestPeek,
            DeltaResponsePeek,
            RequestPeek,
            ResponsePeek,
            peek_delta_request,
            peek_delta_response,
            peek_request,
            peek_response,
        )

        IMPLEMENTATION = "python"
