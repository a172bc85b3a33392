"""docker-compose.yml as compose reads it: ${VAR} taken from .env."""

from __future__ import annotations

import re
from typing import Any

import yaml
from snpemu.hostconfig import parse_env_file

from tests.conftest import ROOT

_VAR = re.compile(r"\$\{([A-Z0-9_]+)(?::-([^}]*))?\}")


def _interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's ${VAR} / ${VAR:-default} interpolation, from .env as compose reads it."""
    if isinstance(value, str):

        def sub(m: re.Match[str]) -> str:
            if m[1] in env:
                return env[m[1]]
            assert m[2] is not None, f"${{{m[1]}}} is not defined in .env"
            return m[2]

        return _VAR.sub(sub, value)
    if isinstance(value, list):
        return [_interpolate(v, env) for v in value]
    if isinstance(value, dict):
        return {k: _interpolate(v, env) for k, v in value.items()}
    return value


def compose_file() -> dict[str, Any]:
    raw = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    env = parse_env_file((ROOT / ".env").read_text())
    return _interpolate(raw, env)  # type: ignore[no-any-return]
