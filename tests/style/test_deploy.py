"""docker-compose.yml, Prometheus and Grafana files: valid, and the same host as the launcher."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from snpemu.hostconfig import HostConfig, parse_env_file
from snpemu.launcher import prometheus
from snpemu.launcher.plan import SERVICE_NAMES, plan

from tests.conftest import ROOT, tool

pytestmark = pytest.mark.style

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


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    raw = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    env = parse_env_file((ROOT / ".env").read_text())
    return _interpolate(raw, env)  # type: ignore[no-any-return]


def test_compose_file_matches_compose_spec_schema() -> None:
    result = subprocess.run(
        [tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", "docker-compose.yml"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_runs_the_launchers_services_ports_and_commands(compose: dict[str, Any]) -> None:
    config = HostConfig.load({"SNPEMU_CONFIG": str(ROOT / ".env")})
    specs = plan(config, state_dir=Path("/x"), host_credential="c", python="python")
    services = compose["services"]
    assert set(services) == {s.name for s in specs} | {"prometheus", "grafana"}
    for s in specs:
        svc = services[s.name]
        assert svc["command"] == list(s.argv), s.name
        env = svc["environment"]
        assert env["SNPEMU_GRPC_PORT"] == str(s.endpoint.grpc_port)
        assert env["SNPEMU_METRICS_PORT"] == str(s.endpoint.metrics_port)
        assert env["SNPEMU_INSTANCE"] == s.name
        assert env["SNPEMU_BIND"] == "0.0.0.0"
        for peer in ("rmp", "psp", "kvm", "netd"):
            assert env[f"SNPEMU_{peer.upper()}_ADDR"] == f"{peer}:{config.endpoint(peer).grpc_port}"
        assert ("SNPEMU_HOST_CREDENTIAL" in env) == s.is_host_side
        g, m = s.endpoint.grpc_port, s.endpoint.metrics_port
        ports = [f"127.0.0.1:{g}:{g}", f"127.0.0.1:{m}:{m}"]
        if s.name == "psp":
            k = config.kds_port
            ports.append(f"127.0.0.1:{k}:{k}")
            assert env["SNPEMU_KDS_PORT"] == str(k) == s.env["SNPEMU_KDS_PORT"]
        assert svc["ports"] == ports
        assert svc["image"] == "snpemu:latest" and svc["build"] == "."
        assert svc["init"] is True and svc["restart"] == "unless-stopped"
        # A real gRPC health check, with no spaces in any argument.
        assert svc["healthcheck"]["test"] == [
            "CMD",
            "snpemu-healthcheck",
            f"127.0.0.1:{g}",
            s.service_name,
        ]
    assert services["prometheus"]["ports"] == [f"127.0.0.1:{config.prometheus_port}:9090"]
    assert services["grafana"]["ports"] == [f"127.0.0.1:{config.grafana_port}:3000"]


def test_compose_start_order_follows_health(compose: dict[str, Any]) -> None:
    services = compose["services"]

    def deps(name: str) -> dict[str, str]:
        return {k: v["condition"] for k, v in services[name].get("depends_on", {}).items()}

    assert deps("rmp") == {}
    assert deps("psp") == {"rmp": "service_healthy"}
    assert deps("kvm") == {"rmp": "service_healthy", "psp": "service_healthy"}
    assert deps("netd") == {"rmp": "service_healthy", "kvm": "service_healthy"}
    for guest in ("guest-0", "guest-1"):
        assert deps(guest) == {"kvm": "service_healthy", "netd": "service_healthy"}
    assert deps("grafana") == {"prometheus": "service_healthy"}


def test_env_guest_count_matches_compose(compose: dict[str, Any]) -> None:
    env = parse_env_file((ROOT / ".env").read_text())
    guests = [n for n in compose["services"] if n.startswith("guest-")]
    assert len(guests) == int(env["SNPEMU_GUESTS"])


def test_dockerfile_copies_what_the_image_needs() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert "COPY pyproject.toml README.md .env ./" in text
    assert "COPY services ./services" in text
    assert "SNPEMU_CONFIG=/app/.env" in text
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert "services" not in ignored and ".env" not in ignored


def test_compose_prometheus_config_is_the_launchers_rendering() -> None:
    config = HostConfig.load({"SNPEMU_CONFIG": str(ROOT / ".env")})
    committed = (ROOT / "deploy/prometheus/prometheus.yml").read_text()
    assert committed == prometheus.render(config.endpoints, lambda e: e.name), (
        "regenerate with: python -m snpemu.launcher prometheus-config --compose "
        "> deploy/prometheus/prometheus.yml"
    )


def test_promtool_accepts_the_prometheus_config() -> None:
    result = subprocess.run(
        [tool("promtool"), "check", "config", "--syntax-only", "deploy/prometheus/prometheus.yml"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_grafana_datasource_has_the_fixed_uid() -> None:
    ds = yaml.safe_load(
        (ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text()
    )
    (source,) = ds["datasources"]
    assert source["uid"] == "snpemu-prometheus" and source["url"] == "http://prometheus:9090"


@pytest.mark.parametrize(
    "path", sorted((ROOT / "deploy/grafana/dashboards").glob("*.json")), ids=lambda p: p.name
)
def test_dashboard_panels_are_complete(path: Path) -> None:
    dash = json.loads(path.read_text())
    assert dash["uid"] and dash["title"]
    exported = {"up", "grpc_server_started_total", "grpc_server_handled_total"} | {
        f"grpc_server_handling_seconds_{s}" for s in ("bucket", "sum", "count")
    }
    for panel in dash["panels"]:
        where = f"{path.name} panel {panel.get('title')!r}"
        assert panel.get("title") and panel.get("description"), where
        assert panel["fieldConfig"]["defaults"].get("unit"), where
        assert panel["datasource"] == {"type": "prometheus", "uid": "snpemu-prometheus"}, where
        for target in panel["targets"]:
            expr = target["expr"]
            assert target["datasource"]["uid"] == "snpemu-prometheus", where
            if "rate(" in expr:
                assert "[$__rate_interval]" in expr, where
            names = set(re.findall(r"\b([a-z_]+(?:_total|_bucket|_sum|_count)|up)\b", expr))
            assert names and names <= exported, (where, names - exported)


def test_every_launcher_service_has_a_known_grpc_service() -> None:
    assert set(SERVICE_NAMES) == {"rmp", "psp", "kvm", "netd", "guest"}
