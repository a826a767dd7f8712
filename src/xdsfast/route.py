"""The relay's per-message path, from the compiled ``xdsfast._route`` or its twin.

Chosen by the one switch, :mod:`xdsfast._ext`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from xdsfast import _ext

__all__ = ["IMPLEMENTATION", "ByteTotals", "Latencies", "RouteCore", "Tally", "TypeState"]

if TYPE_CHECKING:  # both have the same API; the twin is the reference
    from xdsfast._route_py import ByteTotals, Latencies, RouteCore, Tally, TypeState

    IMPLEMENTATION = "python"
else:
    _impl = _ext.load("_route")
    IMPLEMENTATION = _ext.implementation("_route")
    ByteTotals = _impl.ByteTotals
    Latencies = _impl.Latencies
    RouteCore = _impl.RouteCore
    Tally = _impl.Tally
    TypeState = _impl.TypeState
