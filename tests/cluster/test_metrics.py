"""Every service's /metrics against the catalog (docs/metrics.md), on the real launcher."""

from __future__ import annotations

import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families
from snpemu.metrics_catalog import by_service

from tests.cluster.conftest import Cluster

pytestmark = pytest.mark.cluster
INSTANCES = {"rmp": "rmp", "psp": "psp", "kvm": "kvm", "netd": "netd", "guest-0": "guest"}


def scrape(cluster: Cluster, name: str) -> dict[str, tuple[str, set[str], int]]:
    """{exposed family name: (type, label names, samples)} from one service."""
    port = cluster.config.endpoint(name).metrics_port
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        exposed = fam.name + "_total" if fam.type == "counter" else fam.name
        labels = {k for s in fam.samples for k in s.labels if k not in ("le", "quantile")}
        out[exposed] = (fam.type, labels, len(fam.samples))
    return out


@pytest.mark.parametrize("name", sorted(INSTANCES))
def test_service_exports_exactly_its_catalog_families(cluster: Cluster, name: str) -> None:
    want = by_service(INSTANCES[name])
    got = scrape(cluster, name)
    assert set(got) == set(want), (
        f"exported but not in the catalog: {sorted(set(got) - set(want))}; "
        f"in the catalog but not exported: {sorted(set(want) - set(got))}"
    )
    for fname, family in want.items():
        kind, labels, samples = got[fname]
        assert kind == family.type, fname
        # every labelled family has its series from the start (at zero until something happens)
        assert samples > 0, f"{fname} has no series yet"
        assert labels == set(family.labels), (fname, labels)
