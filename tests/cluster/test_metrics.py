"""Every service's /metrics against the catalog (docs/metrics.md), on the real launcher."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
import urllib.parse
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


def test_after_a_workload_every_panel_has_data_and_top_sees_it(cluster: Cluster) -> None:
    from tests.cluster.test_guest import grpcurl, wait_running
    from tests.style.test_deploy import dashboard_exprs

    for g in ("guest-0", "guest-1"):
        wait_running(cluster, g)
    # a rate needs a sample from before the workload: wait until Prometheus has scraped twice
    deadline = time.monotonic() + 60
    while not cluster.query("min(count_over_time(up[1m])) >= 2"):
        assert time.monotonic() < deadline, "Prometheus is not scraping"
        time.sleep(1)
    for g in ("guest-0", "guest-1"):
        grpcurl(cluster, g, "AttachNetDevice", {})
    for i in range(5):
        grpcurl(
            cluster, "guest-0", "GetReport", {"report_data": base64.b64encode(b"%d" % i).decode()}
        )
        grpcurl(
            cluster,
            "guest-0",
            "SendPacket",
            {"destination_mac": "02:00:00:00:00:02", "payload": "aGk="},
        )
    # errors too, so the error panels have something: a refused RPC, a refused firmware call
    bad = cluster.grpcurl(
        "-d",
        json.dumps({"report_data": base64.b64encode(bytes(65)).decode()}),
        cluster.address("guest-0"),
        "snp.guest.v1.GuestService/GetReport",
        host=False,
    )
    assert "InvalidArgument" in bad.stderr, bad.stderr
    assert (
        "refused" in grpcurl(cluster, "guest-1", "TamperSequenceNumber", {"offset": 3})["outcome"]
    )
    for conversion in ("CONVERSION_TO_SHARED", "CONVERSION_TO_PRIVATE"):
        grpcurl(
            cluster,
            "guest-1",
            "ConvertMemory",
            {
                "gpa": 0x400000,
                "size": 0x200000,
                "conversion": conversion,
                "page_size": "PAGE_SIZE_4K",
            },
        )
    top = subprocess.run(
        [sys.executable, "-m", "snpemu.launcher", "top", "--once", "--json", "--interval", "1"],
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert top.returncode == 0, top.stderr
    view = json.loads(top.stdout)
    assert set(view["services_up"]) == set(INSTANCES) | {"guest-1"}
    assert view["rmp_pages"].get("hypervisor", 0) > 0
    # Prometheus scrapes every 5 s and a rate needs two samples in its window: poll until every
    # panel has data at once (or a minute has gone by), with a window that keeps the workload
    # in view for all that time
    deadline = time.monotonic() + 60
    while True:
        empty = []
        for where, expr in dashboard_exprs():
            result = cluster.query(expr.replace("$__rate_interval", "3m"))
            if not result or all(r["value"][1] == "NaN" for r in result):
                empty.append((where, expr, result))
        if not empty or time.monotonic() > deadline:
            break
        time.sleep(2)
    if empty:  # say what Prometheus and kvm hold, to tell a scrape problem from a code one
        raw = cluster.query("snp_guest_request_duration_seconds_bucket")
        port = cluster.config.endpoint("kvm").metrics_port
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            kvm = [x for x in r.read().decode().splitlines() if "duration_seconds" in x]
        pytest.fail(f"panels without data: {empty}\nPrometheus: {raw}\nkvm: {kvm}")
    rules = json.loads(
        urllib.request.urlopen(f"{cluster.prometheus_url}/api/v1/rules", timeout=10).read()
    )["data"]["groups"]
    loaded = [r for g in rules for r in g["rules"]]
    assert len(loaded) == 7 and all(r["health"] == "ok" for r in loaded), loaded
