"""Each compiled core and its pure-Python twin, for the ``twins`` fixture (conftest.py).

A test that takes ``twins`` runs once on the twins ("python") and, where the
compiled cores are built and ``XDSFAST_NO_EXTENSIONS`` is unset, once on them
("cython"); ``twins.h2``, ``twins.route``, ``twins.core``, ``twins.dnstable`` are
that kind's modules.  Tests that compare the two take :func:`both`.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import pytest

from xdsfast import _ext


class Cores:
    """One kind's modules, by the short name of each core (``_h2`` -> ``h2``)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def module(self, name: str) -> ModuleType:
        path = _ext.CORES[name] + ("_py" if self.kind == "python" else "")
        return importlib.import_module(path)

    @property
    def core(self) -> ModuleType:
        return self.module("_core")

    @property
    def h2(self) -> ModuleType:
        return self.module("_h2")

    @property
    def route(self) -> ModuleType:
        return self.module("_route")

    @property
    def dnstable(self) -> ModuleType:
        return self.module("_dnstable")

    def __repr__(self) -> str:
        return self.kind


def _compiled_built() -> bool:
    try:
        for name in _ext.CORES:
            importlib.import_module(_ext.CORES[name])
    except ImportError:  # a partial build: test_cli / test_wire report it
        return False
    return True


COMPILED = not _ext.NO_EXTENSIONS and _compiled_built()
KINDS = ["python", "cython"] if COMPILED else ["python"]
PARAMS = [pytest.param(Cores(kind), id=kind) for kind in KINDS]


def both() -> tuple[Cores, Cores]:
    """The twins and the compiled cores, to compare them (skips where none are built)."""
    if not COMPILED:
        pytest.skip("no compiled cores to compare with")
    return Cores("python"), Cores("cython")
