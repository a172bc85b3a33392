"""deploy/k8s: every rendered manifest valid offline, the same services as docker-compose.yml,
and the alert rules of deploy/prometheus/ as the PrometheusRule."""

from __future__ import annotations

import copy
import functools
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.conftest import ROOT
from tests.style.compose_file import compose_file

pytestmark = pytest.mark.style

K8S = ROOT / "deploy/k8s"
TARGETS = ["base", "overlays/single-host", "overlays/fleet"]
# the oldest Kubernetes with GA gRPC probes, and the newest kubernetes-validate knows
VERSIONS = ["1.27", kubernetes_validate.latest_version()]
CRD_SCHEMA = yaml.safe_load(
    (ROOT / "tests/style/schemas/monitoring.coreos.com-v1.yaml").read_text()
)
SNPEMU = ["rmp", "psp", "kvm", "netd", "guest"]


CREDENTIALS = ("SNPEMU_HOST_CREDENTIAL", "SNPEMU_VMM_CREDENTIAL", "SNPEMU_OWNER_CREDENTIAL")


def kubectl() -> str:
    """Debian's kubectl (kubernetes-client), unpacked into the virtualenv by scripts/install.sh."""
    path = Path(sys.executable).parent.parent / "opt/kubernetes-client/usr/bin/kubectl"
    if not path.exists():
        pytest.fail(f"{path} is missing: run `make install`")
    return str(path)


@functools.cache
def render(target: str) -> tuple[dict[str, Any], ...]:
    out = subprocess.run(
        [kubectl(), "kustomize", str(K8S / target)], capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stderr
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


def find(docs: tuple[dict[str, Any], ...], kind: str, name: str) -> dict[str, Any]:
    [doc] = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def workload(docs: tuple[dict[str, Any], ...], name: str) -> dict[str, Any]:
    return find(docs, "StatefulSet" if name == "guest" else "Deployment", name)


def validate_crd(doc: dict[str, Any]) -> None:
    schema = {**CRD_SCHEMA, "$ref": f"#/$defs/{doc['kind']}"}
    jsonschema.validate(doc, schema, cls=jsonschema.Draft202012Validator)


def test_generated_files_are_current() -> None:
    out = subprocess.run(
        [sys.executable, "scripts/gen_k8s.py", "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr + "regenerate with: python scripts/gen_k8s.py"


@pytest.mark.parametrize("target", TARGETS)
def test_every_rendered_manifest_is_valid(target: str) -> None:
    docs = render(target)
    assert docs
    for doc in docs:
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            validate_crd(doc)
            continue
        for version in VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)


def test_the_validators_reject_a_misspelt_field() -> None:
    docs = render("overlays/single-host")
    monitor = copy.deepcopy(find(docs, "ServiceMonitor", "snpemu"))
    monitor["spec"]["endpoints"][0]["prot"] = monitor["spec"]["endpoints"][0].pop("port")
    with pytest.raises(jsonschema.ValidationError):
        validate_crd(monitor)
    rule = copy.deepcopy(find(docs, "PrometheusRule", "snpemu"))
    rule["spec"]["groups"][0]["rules"][0]["for"] = "thirty seconds"
    with pytest.raises(jsonschema.ValidationError):
        validate_crd(rule)
    rmp = copy.deepcopy(workload(docs, "rmp"))
    rmp["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(rmp, VERSIONS[0], strict=True)


def test_prometheus_rule_is_the_rule_file() -> None:
    rules = yaml.safe_load((ROOT / "deploy/prometheus/rules/snpemu.yml").read_text())
    for target in ("overlays/single-host", "overlays/fleet"):
        for doc in render(target):
            if doc["kind"] == "PrometheusRule":
                assert doc["spec"]["groups"] == rules["groups"], target


def test_images_ports_commands_and_probes_match_compose() -> None:
    services = compose_file()["services"]
    docs = render("base")
    for name in SNPEMU:
        svc = services["guest-0" if name == "guest" else name]
        env = svc["environment"]
        pod = workload(docs, name)["spec"]["template"]["spec"]
        [c] = pod["containers"]
        assert c["image"] == svc["image"], name
        assert c["command"] == svc["command"], name
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        want = {"grpc": int(env["SNPEMU_GRPC_PORT"]), "metrics": int(env["SNPEMU_METRICS_PORT"])}
        if "SNPEMU_KDS_PORT" in env:
            want["kds"] = int(env["SNPEMU_KDS_PORT"])
        assert ports == want, name
        published = {int(p.rsplit(":", 1)[1]) for p in svc["ports"]}
        assert set(ports.values()) == published, name
        k8s_env = {e["name"]: e.get("value") for e in c["env"]}
        for key, value in env.items():
            if key in ("SNPEMU_INSTANCE", *CREDENTIALS):
                continue  # instance from the pod name; credentials from a Secret
            assert k8s_env.get(key) == str(value), (name, key)
        assert set(k8s_env) - set(env) - {"SNPEMU_CREDENTIALS_DIR"} == set(), name
        # no host service holds a guest's credential
        assert {"SNPEMU_VMM_CREDENTIAL", "SNPEMU_OWNER_CREDENTIAL"} & set(k8s_env) == set(), name
        # compose's health check is `snpemu-healthcheck ADDRESS SERVICE`: the same service
        health_service = svc["healthcheck"]["test"][-1]
        for probe in ("startupProbe", "readinessProbe"):
            assert c[probe]["grpc"] == {"port": want["grpc"], "service": health_service}
        assert c["livenessProbe"]["grpc"] == {"port": want["grpc"]}
        service = find(docs, "Service", name)
        assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == want, name


def test_pods_run_as_non_root_on_a_read_only_root() -> None:
    docs = render("base")
    for name in SNPEMU:
        pod = workload(docs, name)["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == 10001  # the Dockerfile's snpemu user
        for c in pod["containers"]:
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, name
            assert sc["allowPrivilegeEscalation"] is False, name
            assert sc["capabilities"]["drop"] == ["ALL"], name
            # what the services write lives on volumes, not the read-only root
            mounts = {m["mountPath"] for m in c["volumeMounts"]}
            data = next((e["value"] for e in c["env"] if e["name"] == "SNPEMU_DATA_DIR"), None)
            assert data is None or data in mounts, name
    psp = workload(docs, "psp")["spec"]["template"]["spec"]
    [claim] = [v for v in psp["volumes"] if "persistentVolumeClaim" in v]
    assert find(docs, "PersistentVolumeClaim", claim["persistentVolumeClaim"]["claimName"])


def test_fleet_is_the_base_once_per_namespace() -> None:
    docs = render("overlays/fleet")
    hosts = yaml.safe_load((K8S / "overlays/fleet/kustomization.yaml").read_text())["bases"]
    namespaces = {d["metadata"]["name"] for d in docs if d["kind"] == "Namespace"}
    assert namespaces == {f"snpemu-{h}" for h in hosts} and len(hosts) >= 2
    base = render("base")
    per_host = len(base) + 3  # the base, its namespace, the ServiceMonitor and PrometheusRule
    assert len(docs) == per_host * len(hosts)
    for ns in namespaces:
        mine = [d for d in docs if d["metadata"].get("namespace") == ns]
        assert {(d["kind"], d["metadata"]["name"]) for d in mine} == {
            (d["kind"], d["metadata"]["name"]) for d in base
        } | {("ServiceMonitor", "snpemu"), ("PrometheusRule", "snpemu")}
        # peers are found by their unqualified service names inside the host's namespace
        kvm = [d for d in mine if d["kind"] == "Deployment" and d["metadata"]["name"] == "kvm"]
        env = {
            e["name"]: e.get("value")
            for e in kvm[0]["spec"]["template"]["spec"]["containers"][0]["env"]
        }
        assert env["SNPEMU_RMP_ADDR"] == "rmp:50071"
