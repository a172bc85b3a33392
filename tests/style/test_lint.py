"""Lint and format checks are tests too: buf, ruff, mypy, generated code."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT, tool

pytestmark = pytest.mark.style


def _run(*cmd: str, cwd: str | None = None) -> None:
    result = subprocess.run(cmd, cwd=cwd or ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{' '.join(cmd)}:\n{result.stdout}\n{result.stderr}"


def test_buf_lint_standard() -> None:
    _run(tool("buf"), "lint", cwd=str(ROOT / "protos"))


def test_buf_format() -> None:
    _run(tool("buf"), "format", "--diff", "--exit-code", cwd=str(ROOT / "protos"))


def test_generated_code_is_current() -> None:
    _run(sys.executable, "scripts/gen_protos.py", "--check")


def test_ruff_check() -> None:
    _run(tool("ruff"), "check", "services", "scripts", "tests", "bench")


def test_ruff_format() -> None:
    _run(tool("ruff"), "format", "--check", "services", "scripts", "tests", "bench")


def test_mypy_strict() -> None:
    _run(tool("mypy"))
