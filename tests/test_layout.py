"""The package's layout rules (README "Layout"): what each kind of module may import.

Data flows one way (socket -> peek -> route -> socket) only while the layers stay apart: the
cores import vocabularies and nothing else, the engines know nothing of xDS content, and
the agent never needs the peers (they need the ``demo`` extra).  Imports under
``if TYPE_CHECKING:`` are not counted: they cost nothing at run time.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"
PACKAGE = SRC / "xdsfast"

#: Import nothing of xdsfast: vocabularies and small utilities every layer may use.
LEAVES = {
    "xdsfast._errors",
    "xdsfast._ext",
    "xdsfast.typeurls",
    "xdsfast.log",
    "xdsfast.files",
    "xdsfast.periodic",
    "xdsfast.agentclient",
    "xdsfast.dns.wire",
    "xdsfast.dns.resolvconf",
    "xdsfast.engines.fast.h2numbers",
    "xdsfast.peers.pki",
    "xdsfast.peers.backend",
}

#: Each compiled core and its twin, and all they may import (the compiled one also cimports).
CORES = {
    "xdsfast._core": {"xdsfast._errors"},
    "xdsfast._route": {"xdsfast._errors", "xdsfast.typeurls", "xdsfast._clock"},
    "xdsfast.engines.fast._h2": {
        "xdsfast._errors",
        "xdsfast._clock",
        "xdsfast.engines.fast.h2numbers",
    },
    "xdsfast._dnstable": {"xdsfast.dns.names", "xdsfast.dns.wire", "xdsfast.nds_pb2"},
}

#: The transports carry opaque bytes: none of these may reach them.
ENGINES_NEVER = ("relay", "intercept", "route", "wire", "dns", "wasm", "metrics", "agent", "peers")

#: Only these may import the peers and the demo (they need the ``demo`` extra).
PEER_USERS = ("xdsfast.peers", "xdsfast.demo", "xdsfast.cli")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def sources() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for path in sorted(PACKAGE.rglob("*")):
        if path.suffix in (".py", ".pyx") and not path.name.endswith("_pb2.py"):
            found.setdefault(module_name(path), path)  # twins are listed under their own names
    return found


def _is_module(name: str) -> bool:
    base = SRC.joinpath(*name.split("."))
    return base.is_dir() or any(base.with_suffix(s).exists() for s in (".py", ".pyx", ".pxd"))


def _named(module: str, names: list[str]) -> set[str]:
    """``from module import a, b``: the submodules among a, b, else module itself."""
    subs = {f"{module}.{n}" for n in names if n and _is_module(f"{module}.{n}")}
    return subs or {module}


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def python_imports(path: Path) -> set[str]:
    """The xdsfast modules ``path`` imports at run time (any depth, lazily or not)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _type_checking(child):
                for other in child.orelse:
                    visit(other)
                continue
            if isinstance(child, ast.Import):
                found.update(a.name for a in child.names if a.name.startswith("xdsfast"))
            elif isinstance(child, ast.ImportFrom) and (child.module or "").startswith("xdsfast"):
                found.update(_named(str(child.module), [a.name for a in child.names]))
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    return found


_CYTHON_IMPORT = re.compile(r"^\s*from\s+(xdsfast[\w.]*)\s+c?import\s+([\w, ()*]+)", re.MULTILINE)


def cython_imports(path: Path) -> set[str]:
    found: set[str] = set()
    for module, names in _CYTHON_IMPORT.findall(path.read_text()):
        found.update(_named(module, [n.strip() for n in names.strip("()").split(",")]))
    return found


def imports(path: Path) -> set[str]:
    found = cython_imports(path) if path.suffix in (".pyx", ".pxd") else python_imports(path)
    return found - {module_name(path)}


ALL = sources()


def test_the_rules_name_real_modules() -> None:
    """A renamed module must not leave a rule that checks nothing."""
    for name in [*LEAVES, *CORES, *(n for deps in CORES.values() for n in deps)]:
        assert _is_module(name), name
    assert imports(PACKAGE / "engines" / "fast" / "_h2.pyx") >= {"xdsfast._clock"}
    assert "xdsfast.peers" in imports(PACKAGE / "demo" / "run.py") or any(
        n.startswith("xdsfast.peers.") for n in imports(PACKAGE / "demo" / "run.py")
    )


@pytest.mark.parametrize("name", sorted(LEAVES))
def test_leaves_import_nothing_of_xdsfast(name: str) -> None:
    assert imports(ALL[name]) == set()


@pytest.mark.parametrize("name", sorted(CORES))
def test_cores_import_only_vocabularies(name: str) -> None:
    twin = ALL[name + "_py"]
    for path in (PACKAGE.joinpath(*name.split(".")[1:]).with_suffix(".pyx"), twin):
        assert imports(path) <= CORES[name], path.name
        pxd = path.with_suffix(".pxd")
        if path.suffix == ".pyx" and pxd.exists():
            assert imports(pxd) <= CORES[name], pxd.name


@pytest.mark.parametrize("name", sorted(n for n in ALL if n.startswith("xdsfast.engines")))
def test_engines_know_nothing_of_xds_content(name: str) -> None:
    banned = tuple(f"xdsfast.{b}" for b in ENGINES_NEVER)
    bad = {
        m for m in imports(ALL[name]) if m in banned or m.startswith(tuple(b + "." for b in banned))
    }
    assert not bad, f"{name} imports {sorted(bad)}"


def test_the_agent_never_imports_the_peers_or_the_demo() -> None:
    offenders = {
        name: sorted(m for m in imports(path) if m.startswith(("xdsfast.peers", "xdsfast.demo")))
        for name, path in ALL.items()
        if not name.startswith(PEER_USERS)
    }
    assert {k: v for k, v in offenders.items() if v} == {}
