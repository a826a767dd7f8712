"""The relay's per-message path, from the compiled ``xdsfast._route`` or its twin.

Chosen as :mod:`xdsfast.wire` chooses the peeker: the twin when
``XDSFAST_NO_EXTENSIONS`` is set or no compiled module can be imported.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from xdsfast import wire

__all__ = ["IMPLEMENTATION", "ByteTotals", "Latencies", "RouteCore", "Tally", "TypeState"]

if TYPE_CHECKING or wire.NO_EXTENSIONS:  # both have the same API; the twin is the reference
    from xdsfast._route_py import ByteTotals, Latencies, RouteCore, Tally, TypeState

    IMPLEMENTATION = "python"
else:
    try:
        from xdsfast._route import ByteTotals, Latencies, RouteCore, Tally, TypeState

        IMPLEMENTATION = "cython"
    except ImportError:  # no compiled module for this platform: the twin serves
        from xdsfast._route_py import ByteTotals, Latencies, RouteCore, Tally, TypeState

        IMPLEMENTATION = "python"
