"""The wheels users install: compiled core without a compiler, and the pure-Python fallback.

Builds with scripts/build-wheels (sdist -> wheel -> auditwheel), installs each wheel
into a fresh venv whose PATH has no compiler, and runs what a user runs.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import xdsfast

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def sh(*args: str | Path, env: dict[str, str] | None = None, timeout: float = 600) -> str:
    out = subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, env=env, timeout=timeout
    )
    assert out.returncode == 0, f"{args}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout


def fresh_venv(where: Path) -> tuple[Path, dict[str, str]]:
    """A venv, and an environment whose PATH holds nothing but it: no gcc, no cc."""
    sh(sys.executable, "-m", "venv", where)
    env = {k: v for k, v in os.environ.items() if k not in ("CC", "CXX", "PYTHONPATH")}
    env["PATH"] = str(where / "bin")
    env.pop("XDSFAST_NO_EXTENSIONS", None)
    return where / "bin", env


@pytest.fixture(scope="module")
def compiled_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    sh(ROOT / "scripts" / "build-wheels", out)
    (wheel,) = out.glob("*.whl")
    return wheel


def test_compiled_wheel_installs_and_runs_without_a_compiler(
    compiled_wheel: Path, tmp_path: Path
) -> None:
    assert "manylinux" in compiled_wheel.name
    assert f"-{xdsfast.__version__}-" in compiled_wheel.name
    names = zipfile.ZipFile(compiled_wheel).namelist()
    for module in ("_core", "engines/fast/_h2", "_route"):  # the peeker, engine's, relay's paths
        assert any(n.startswith(f"xdsfast/{module}.") and n.endswith(".so") for n in names)
    assert "xdsfast/py.typed" in names and "xdsfast/_core.c" not in names
    (sdist,) = compiled_wheel.parent.glob("*.tar.gz")
    assert sdist.name == f"xdsfast-{xdsfast.__version__}.tar.gz"

    bin_dir, env = fresh_venv(tmp_path / "venv")
    sh(bin_dir / "pip", "install", "-q", f"{compiled_wheel}[demo]", env=env)
    probe = "import importlib.util as u; print(u.find_spec('Cython') is None)"
    assert sh(bin_dir / "python", "-c", probe, env=env).strip() == "True"
    version = sh(bin_dir / "xdsfast", "version", env=env)
    assert version.splitlines()[0] == f"xdsfast {xdsfast.__version__} (core: cython)"
    demo = sh(bin_dir / "xdsfast", "demo", "--check", env=env, timeout=180)
    assert "every step worked" in demo


def test_pure_python_wheel_for_platforms_without_a_binary(tmp_path: Path) -> None:
    out = tmp_path / "dist"
    sh(ROOT / "scripts" / "build-wheels", "--pure", out)
    (wheel,) = out.glob("*.whl")
    assert wheel.name.endswith("-py3-none-any.whl")
    assert not any(n.endswith(".so") for n in zipfile.ZipFile(wheel).namelist())
    bin_dir, env = fresh_venv(tmp_path / "venv")
    sh(bin_dir / "pip", "install", "-q", wheel, env=env)
    version = sh(bin_dir / "xdsfast", "version", env=env)
    assert version.splitlines()[0] == f"xdsfast {xdsfast.__version__} (core: python)"
