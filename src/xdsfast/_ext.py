"""The one switch between the compiled cores and their pure-Python twins.

Decided once per process: the twins serve when ``XDSFAST_NO_EXTENSIONS`` is set
to a non-empty value, or when a compiled module cannot be imported (a platform
without a binary wheel, a partial build).  Every chooser (``wire``, ``route``,
the fast engine, ``dns.table``) calls :func:`load`, so what serves is what
:func:`implementations` reports to ``xdsfast version`` and ``xdsfast_core_info``.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from types import ModuleType
from typing import Final

__all__ = ["CORES", "NO_EXTENSIONS", "implementation", "implementations", "load", "summary"]

NO_EXTENSIONS: Final = bool(os.environ.get("XDSFAST_NO_EXTENSIONS"))

#: Each compiled core (short name -> module path); its twin is the same path + ``_py``.
CORES: Final = {
    "_core": "xdsfast._core",  # the wire peeker
    "_h2": "xdsfast.engines.fast._h2",  # the fast engine's per-read path
    "_route": "xdsfast._route",  # the relay's per-message path
    "_dnstable": "xdsfast._dnstable",  # the DNS proxy's name table
}

_chosen: dict[str, tuple[ModuleType, str]] = {}


def load(name: str) -> ModuleType:
    """The module serving core ``name`` (a key of :data:`CORES`): compiled or twin."""
    if name not in _chosen:
        path = CORES[name]
        chosen: tuple[ModuleType, str] | None = None
        if not NO_EXTENSIONS:
            # no compiled module for this platform (or a partial build): the twin serves
            with contextlib.suppress(ImportError):
                chosen = importlib.import_module(path), "cython"
        _chosen[name] = chosen or (importlib.import_module(path + "_py"), "python")
    return _chosen[name][0]


def implementation(name: str) -> str:
    """Which one serves core ``name``: "cython" or "python".

    A compiled core not yet loaded is loaded here, so a partial build says so."""
    if NO_EXTENSIONS:
        return "python"
    load(name)
    return _chosen[name][1]


def implementations() -> dict[str, str]:
    """Each core's implementation ("cython" or "python"), in :data:`CORES` order."""
    return {name: implementation(name) for name in CORES}


def summary() -> str:
    """All cores at once: "cython" when every one is compiled, "python" when none is,
    else "mixed"."""
    kinds = set(implementations().values())
    return kinds.pop() if len(kinds) == 1 else "mixed"
