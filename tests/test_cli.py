"""The command line, run as a real process."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import xdsfast
from xdsfast import wire


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "xdsfast", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def test_help_lists_subcommands() -> None:
    out = run_cli("--help")
    assert out.returncode == 0
    for command in ("version",):
        assert command in out.stdout


def test_version_reports_package_and_core() -> None:
    out = run_cli("version")
    assert out.returncode == 0
    assert out.stdout.strip() == f"xdsfast {xdsfast.__version__} (core: {wire.IMPLEMENTATION})"


def test_version_reports_the_twin_when_forced() -> None:
    out = run_cli("version", env=dict(os.environ, XDSFAST_NO_EXTENSIONS="1"))
    assert out.stdout.strip().endswith("(core: python)")


@pytest.mark.parametrize("args", [("bogus",), ("--bogus",), (), ("version", "--nope")], ids=str)
def test_bad_usage_is_one_line_exit_2(args: tuple[str, ...]) -> None:
    out = run_cli(*args)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("xdsfast: error: ")
    assert "Traceback" not in out.stderr
