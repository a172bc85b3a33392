"""Every service's /metrics against the catalog (docs/metrics.md), on the real launcher."""

from __future__ import annotations

import base64
import json
import math
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families
from snp.rmp.v1 import rmp_pb2, rmp_pb2_grpc
from snpemu.launcher.supervisor import grpc_health
from snpemu.metrics_catalog import by_service
from snpemu.rmp.client import credential_metadata, read_credential

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


@dataclass(frozen=True)
class Panel:
    """What one dashboard query must show after the workload of the test below.

    series: the labels of the result series the workload moves. counter: the PromQL of the
    counter behind a rate/increase/stat panel, grouped as the panel groups it; the workload
    must raise it by at least `least` between the snapshot before the workload and the end
    (and the panel's own value for the series must be above zero). A gauge panel (counter
    None) must show at least `least` for the series. why: what in the workload drives it.
    """

    series: dict[str, str]
    counter: str | None
    least: float
    why: str


GUEST = "snp.guest.v1.GuestService"
PSP_ERRORS = (
    'sum by (command, status) (rate(snp_psp_commands_total{status!="SUCCESS"}[$__rate_interval]))'
)
RPC_ERRORS = (
    "sum by (grpc_service, grpc_code) "
    '(rate(grpc_server_handled_total{grpc_code!="OK"}[$__rate_interval]))'
)
PANELS: dict[str, Panel] = {
    "sum(snp_host_panics_total)": Panel(
        {}, "sum(snp_host_panics_total)", 1, "a kernel write to a guest page, last"
    ),
    "sum(snp_rmp_leaked_pages_total)": Panel(
        {}, "sum(snp_rmp_leaked_pages_total)", 1, "LeakPages of one page"
    ),
    "sum(snp_netd_restarts_total)": Panel(
        {}, "sum(snp_netd_restarts_total)", 1, "netd killed, the launcher restarts it"
    ),
    "sum by (state) (snp_kvm_vms)": Panel({"state": "running"}, None, 2, "the two guests"),
    'sum(snp_guest_agent_state{state="running"})': Panel({}, None, 2, "the two guests"),
    "sum by (operation, page_size) (rate(snp_psc_pages_total[$__rate_interval]))": Panel(
        {"operation": "shared", "page_size": "4k"},
        "sum by (operation, page_size) (snp_psc_pages_total)",
        512,
        "ConvertMemory of 2 MiB to shared in 4K pages",
    ),
    "sum by (protocol, result) (rate(snp_psc_requests_total[$__rate_interval]))": Panel(
        {"protocol": "ghcb", "result": "success"},
        "sum by (protocol, result) (snp_psc_requests_total)",
        2,
        "ConvertMemory to shared, then back to private",
    ),
    "sum by (msg_type, result) (rate(snp_guest_requests_total[$__rate_interval]))": Panel(
        {"msg_type": "report", "result": "success"},
        "sum by (msg_type, result) (snp_guest_requests_total)",
        5,
        "five GetReport",
    ),
    "histogram_quantile(0.5, sum by (le) "
    "(rate(snp_guest_request_duration_seconds_bucket[$__rate_interval])))": Panel(
        {}, "sum(snp_guest_request_duration_seconds_count)", 5, "five GetReport"
    ),
    "histogram_quantile(0.99, sum by (le) "
    "(rate(snp_guest_request_duration_seconds_bucket[$__rate_interval])))": Panel(
        {}, "sum(snp_guest_request_duration_seconds_count)", 5, "five GetReport"
    ),
    "sum by (exit_code) (rate(snp_vmgexit_total[$__rate_interval]))": Panel(
        {"exit_code": "guest_request"},
        "sum by (exit_code) (snp_vmgexit_total)",
        5,
        "five GetReport",
    ),
    "sum by (state) (snp_rmp_pages)": Panel(
        {"state": "guest_valid"}, None, 1, "the guests' validated memory"
    ),
    "sum by (origin, policy, outcome) "
    "(increase(snp_rmp_violations_total[$__rate_interval]))": Panel(
        {"origin": "user", "policy": "gmem", "outcome": "refused"},
        "sum by (origin, policy, outcome) (snp_rmp_violations_total)",
        1,
        "a user-mode write to a guest page under gmem",
    ),
    "sum by (command, status) (rate(snp_psp_commands_total[$__rate_interval]))": Panel(
        {"command": "SNP_GUEST_REQUEST", "status": "SUCCESS"},
        "sum by (command, status) (snp_psp_commands_total)",
        5,
        "five GetReport",
    ),
    PSP_ERRORS: Panel(
        {"command": "SNP_INIT", "status": "INVALID_PLATFORM_STATE"},
        'sum by (command, status) (snp_psp_commands_total{status!="SUCCESS"})',
        1,
        "SNP_INIT again on an initialised platform",
    ),
    "sum by (result) (rate(snp_netd_packets_total[$__rate_interval]))": Panel(
        {"result": "delivered"},
        "sum by (result) (snp_netd_packets_total)",
        5,
        "five SendPacket from guest-0 to guest-1",
    ),
    "up": Panel({}, None, 1, "every target scraped (each series is checked)"),
    "sum by (grpc_service) (rate(grpc_server_handled_total[$__rate_interval]))": Panel(
        {"grpc_service": GUEST},
        "sum by (grpc_service) (grpc_server_handled_total)",
        10,
        "five GetReport and five SendPacket",
    ),
    RPC_ERRORS: Panel(
        {"grpc_service": GUEST, "grpc_code": "InvalidArgument"},
        'sum by (grpc_service, grpc_code) (grpc_server_handled_total{grpc_code!="OK"})',
        1,
        "a GetReport with 65 bytes of report data",
    ),
    "histogram_quantile(0.99, sum by (grpc_service, le) "
    "(rate(grpc_server_handling_seconds_bucket[$__rate_interval])))": Panel(
        {"grpc_service": GUEST},
        "sum by (grpc_service) (grpc_server_handling_seconds_count)",
        10,
        "five GetReport and five SendPacket",
    ),
    "sum by (grpc_service, grpc_type) (rate(grpc_server_started_total[$__rate_interval]))": Panel(
        {"grpc_service": GUEST, "grpc_type": "unary"},
        "sum by (grpc_service, grpc_type) (grpc_server_started_total)",
        10,
        "five GetReport and five SendPacket",
    ),
}
# the panels the host panic shows; every other panel is checked before it
AFTER_PANIC = {"sum(snp_host_panics_total)"}
WINDOW = "3m"  # for $__rate_interval: keeps the workload in view for the whole test


def values(cluster: Cluster, expr: str) -> dict[tuple[tuple[str, str], ...], float]:
    """{labels: value} of an instant query."""
    return {
        tuple(sorted(r["metric"].items())): float(r["value"][1])
        for r in cluster.query(expr.replace("$__rate_interval", WINDOW))
    }


def of(series: dict[str, str], result: dict[tuple[tuple[str, str], ...], float]) -> list[float]:
    """The values of the result's series that carry the given labels."""
    return [v for labels, v in result.items() if series.items() <= dict(labels).items()]


def shortfall(
    cluster: Cluster, expr: str, panel: Panel, before: dict[str, dict[Any, float]]
) -> str:
    """Why the panel does not yet show the workload, or "" when it does."""
    shown = of(panel.series, values(cluster, expr))
    if not shown:
        return f"no series {panel.series}"
    if any(math.isnan(v) for v in shown):
        return f"NaN for {panel.series}: {shown}"
    if panel.counter is None:
        low = [v for v in shown if v < panel.least]
        return f"{panel.series} at {low}, want >= {panel.least}" if low else ""
    if not all(v > 0 for v in shown):
        return f"{panel.series} at {shown}, want > 0"
    was = sum(of(panel.series, before[panel.counter]))
    now = sum(of(panel.series, values(cluster, panel.counter)))
    if now - was < panel.least:
        return f"counter {panel.counter} {panel.series} went {was} -> {now}, want +{panel.least}"
    return ""


def wait_for_panels(
    cluster: Cluster, exprs: list[str], before: dict[str, dict[Any, float]]
) -> None:
    """Poll until every one of the panels shows the workload (Prometheus scrapes every 5 s and
    a rate needs two samples in its window), or fail with what each still lacks."""
    deadline = time.monotonic() + 90
    while True:
        missing = {e: why for e in exprs if (why := shortfall(cluster, e, PANELS[e], before))}
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert not missing, "panels without the workload's data:\n" + "\n".join(
        f"  {e}: {why} ({PANELS[e].why})" for e, why in missing.items()
    )


def test_every_panel_query_has_an_expectation() -> None:
    from tests.style.test_deploy import dashboard_exprs

    assert {expr for _, expr in dashboard_exprs()} == set(PANELS)


def test_after_a_workload_every_panel_shows_it_and_top_sees_it(own_cluster: Cluster) -> None:
    """A workload that moves every panel (PANELS says what moves which), on a launch of the
    test's own: its last step panics the host."""
    from tests.cluster.test_guest import grpcurl, wait_running
    from tests.cluster.test_rmp import new_private_page, run_writer

    cluster = own_cluster
    cluster.require_prometheus()
    for g in ("guest-0", "guest-1"):
        wait_running(cluster, g)
    # the snapshot before the workload: wait until Prometheus has scraped every target since
    # the guests came up (and twice in all, so that a rate has a sample from before)
    idle = time.time()
    deadline = time.monotonic() + 60
    while not cluster.query(f"min(timestamp(up)) > {idle} and min(count_over_time(up[1m])) >= 2"):
        assert time.monotonic() < deadline, "Prometheus is not scraping"
        time.sleep(1)
    before = {p.counter: values(cluster, p.counter) for p in PANELS.values() if p.counter}

    # netd dies and comes back (before the packets: a new netd counts from zero)
    netd = {c["name"]: c for c in cluster.state()["children"]}["netd"]
    os.kill(netd["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 60
    while not (
        {c["name"]: c for c in cluster.state()["children"]}["netd"]["restarts"] == 1
        and grpc_health(cluster.address("netd"), "snp.netd.v1.NetdService") == "SERVING"
    ):
        assert time.monotonic() < deadline, "netd was not restarted"
        time.sleep(0.2)
    for g in ("guest-0", "guest-1"):
        grpcurl(cluster, g, "AttachNetDevice", {})
    for i in range(5):
        grpcurl(
            cluster, "guest-0", "GetReport", {"report_data": base64.b64encode(b"%d" % i).decode()}
        )
        sent = grpcurl(
            cluster,
            "guest-0",
            "SendPacket",
            {"destination_mac": "02:00:00:00:00:02", "payload": "aGk="},
        )
        assert sent == {"result": "delivered"}

    # a refused RPC and a refused firmware command, for the error panels
    def refused_rpc() -> None:
        bad = cluster.grpcurl(
            "-d",
            json.dumps({"report_data": base64.b64encode(bytes(65)).decode()}),
            cluster.address("guest-0"),
            f"{GUEST}/GetReport",
            host=False,
        )
        assert bad.returncode != 0 and "InvalidArgument" in bad.stderr, bad.stderr

    def refused_command() -> None:
        again = cluster.grpcurl(cluster.address("psp"), "snp.psp.v1.PspService/SnpInit")
        assert again.returncode != 0 and "INVALID_PLATFORM_STATE" in again.stderr, again.stderr

    # once each: every error's series exists at zero from start-up, so the first error is a
    # step the error panels' rate() sees
    refused_rpc()
    refused_command()
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
    # rmp: a page leaked, a user-mode write to a guest page refused (gmem, the default)
    host = credential_metadata(read_credential(cluster.state_dir))
    with grpc.insecure_channel(cluster.address("rmp")) as ch:
        rmp = rmp_pb2_grpc.RmpServiceStub(ch)
        (pfn,) = rmp.AllocatePages(
            rmp_pb2.AllocatePagesRequest(count=1, placement=rmp_pb2.PLACEMENT_ANY), metadata=host
        ).pfns
        rmp.LeakPages(rmp_pb2.LeakPagesRequest(pfns=[pfn], reason="test"), metadata=host)
        victim = new_private_page(rmp, host)
        refused = run_writer(cluster, victim)
        assert refused.returncode == 0 and refused.stdout.startswith("refused"), refused

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

        wait_for_panels(cluster, [e for e in PANELS if e not in AFTER_PANIC], before)

        # last, the host panics: a kernel write to a guest page (fatal under gmem)
        page = new_private_page(rmp, host)
        r = rmp.HostWrite(
            rmp_pb2.HostWriteRequest(
                spa=page.spa, data=b"kvm", origin=rmp_pb2.ACCESS_ORIGIN_KERNEL, writer="kvm"
            ),
            metadata=host,
        )
        assert r.outcome == rmp_pb2.VIOLATION_OUTCOME_PANIC
    wait_for_panels(cluster, sorted(AFTER_PANIC), before)

    rules = json.loads(
        urllib.request.urlopen(f"{cluster.prometheus_url}/api/v1/rules", timeout=10).read()
    )["data"]["groups"]
    loaded = [r for g in rules for r in g["rules"]]
    assert len(loaded) == 7 and all(r["health"] == "ok" for r in loaded), loaded
