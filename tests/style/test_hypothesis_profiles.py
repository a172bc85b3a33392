"""The hypothesis profiles of tests/conftest.py: "ci" by default, "long" on demand through
HYPOTHESIS_PROFILE, and no test that pins its own number of examples past the profile."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.style

# a literal count: examples(n) is how a test asks for its own number
_LITERAL = re.compile(r"max_examples\s*=\s*\d")


def _profile(name: str | None) -> list[str]:
    """What a fresh interpreter that imports tests.conftest sees under HYPOTHESIS_PROFILE."""
    env = {k: v for k, v in os.environ.items() if k != "HYPOTHESIS_PROFILE"}
    if name is not None:
        env["HYPOTHESIS_PROFILE"] = name
    code = (
        "from hypothesis import settings\n"
        "from tests.conftest import examples\n"
        "d = settings.default\n"
        "print(d.max_examples, d.derandomize, d.database, d.deadline, examples(300))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def test_ci_is_the_default_and_draws_the_same_examples_every_run() -> None:
    assert _profile(None) == ["100", "True", "None", "None", "300"]
    assert _profile("ci") == _profile(None)


def test_long_draws_twenty_times_as_many_at_random() -> None:
    assert _profile("long") == ["2000", "False", "None", "None", "6000"]


def test_an_unknown_profile_is_refused() -> None:
    env = {**os.environ, "HYPOTHESIS_PROFILE": "lnog"}
    out = subprocess.run(
        [sys.executable, "-c", "import tests.conftest"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode != 0 and "lnog" in out.stderr


def test_no_test_pins_a_literal_number_of_examples() -> None:
    pinned = sorted(
        str(p.relative_to(ROOT))
        for p in (ROOT / "tests").rglob("*.py")
        if p.name != "conftest.py" and p != ROOT / "tests/style/test_hypothesis_profiles.py"
        if _LITERAL.search(p.read_text())
    )
    assert pinned == []
