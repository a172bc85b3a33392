"""docker-compose.yml, Prometheus and Grafana files: valid, and the same host as the launcher."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from snpemu.hostconfig import HostConfig, parse_env_file
from snpemu.launcher import prometheus
from snpemu.launcher.plan import SERVICE_NAMES, plan
from snpemu.metrics_catalog import names

from tests.conftest import ROOT, tool
from tests.style.compose_file import compose_file

pytestmark = pytest.mark.style


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return compose_file()


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
    assert "install -y --no-install-recommends ovmf" in text  # kvm's default firmware
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert "services" not in ignored and ".env" not in ignored


def test_compose_prometheus_config_is_the_launchers_rendering() -> None:
    config = HostConfig.load({"SNPEMU_CONFIG": str(ROOT / ".env")})
    committed = (ROOT / "deploy/prometheus/prometheus.yml").read_text()
    rendered = prometheus.render(
        config.endpoints, lambda e: e.name, rule_files=prometheus.RULE_FILES
    )
    assert committed == rendered, (
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


DASHBOARDS = sorted((ROOT / "deploy/grafana/dashboards").glob("*.json"))
RULES = ROOT / "deploy/prometheus/rules/snpemu.yml"
# a metric name inside PromQL: a word followed by {, [ or ) ... but not a function or label
_NAME = re.compile(r"\b((?:snp|grpc_server)_[a-z0-9_]+|up)\b")


def dashboard_exprs() -> list[tuple[str, str]]:
    out = []
    for path in DASHBOARDS:
        for panel in json.loads(path.read_text())["panels"]:
            for target in panel["targets"]:
                out.append((f"{path.name}: {panel['title']}", target["expr"]))
    return out


def rule_exprs() -> list[tuple[str, str]]:
    rules = yaml.safe_load(RULES.read_text())
    return [(r["alert"], r["expr"]) for g in rules["groups"] for r in g["rules"]]


def test_dashboards_are_generated() -> None:
    result = subprocess.run(
        [sys.executable, "scripts/gen_dashboards.py", "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_panels_are_complete(path: Path) -> None:
    dash = json.loads(path.read_text())
    assert dash["uid"] and dash["title"] and dash["description"]
    for panel in dash["panels"]:
        where = f"{path.name} panel {panel.get('title')!r}"
        assert panel.get("title") and panel.get("description"), where
        assert panel["fieldConfig"]["defaults"].get("unit"), where
        assert panel["datasource"] == {"type": "prometheus", "uid": "snpemu-prometheus"}, where
        assert panel["targets"], where
        for target in panel["targets"]:
            expr = target["expr"]
            assert target["datasource"]["uid"] == "snpemu-prometheus", where
            for fn in ("rate(", "increase("):
                if fn in expr:
                    assert "[$__rate_interval]" in expr, where
                    assert re.search(r"\[(?!\$__rate_interval)", expr) is None, where


def test_every_query_names_only_cataloged_metrics() -> None:
    known = names() | {"up"}
    for where, expr in dashboard_exprs() + rule_exprs():
        used = set(_NAME.findall(expr))
        assert used, (where, expr)
        assert used <= known, (where, sorted(used - known))


def test_every_query_parses(tmp_path: Path) -> None:
    """promtool parses each dashboard query (as a recording rule, $__rate_interval as 1m)."""
    rules = [
        {"record": f"snpemu:panel_{i}", "expr": expr.replace("$__rate_interval", "1m")}
        for i, (_where, expr) in enumerate(dashboard_exprs())
    ]
    path = tmp_path / "panels.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "panels", "rules": rules}]}))
    result = subprocess.run(
        [tool("promtool"), "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_rules_check_and_their_unit_tests_pass() -> None:
    for args in (
        ["check", "rules", str(RULES)],
        ["test", "rules", str(RULES.with_name("snpemu_test.yml"))],
    ):
        result = subprocess.run(
            [tool("promtool"), *args], capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_firing_and_a_quiet_case() -> None:
    tests = yaml.safe_load(RULES.with_name("snpemu_test.yml").read_text())["tests"]
    cases = [c for t in tests for c in t["alert_rule_test"]]
    for alert, _expr in rule_exprs():
        mine = [c for c in cases if c["alertname"] == alert]
        assert any(c["exp_alerts"] for c in mine), f"{alert}: no case where it fires"
        assert any(not c["exp_alerts"] for c in mine), f"{alert}: no case where it stays quiet"


def test_every_launcher_service_has_a_known_grpc_service() -> None:
    assert set(SERVICE_NAMES) == {"rmp", "psp", "kvm", "netd", "guest"}
