"""Write the Grafana dashboards in deploy/grafana/dashboards from the panel lists below.

    python scripts/gen_dashboards.py           # rewrite them
    python scripts/gen_dashboards.py --check   # exit 1 if a committed file differs

Every panel names its unit and says what it shows; every query uses the fixed datasource and
$__rate_interval; the tests parse every query and hold its metric names to the catalog.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parents[1] / "deploy/grafana/dashboards"
DS = {"type": "prometheus", "uid": "snpemu-prometheus"}
R = "[$__rate_interval]"

# (type, title, description, unit, [(expr, legend)], width)
Panel = tuple[str, str, str, str, list[tuple[str, str]], int]

HOST: list[Panel] = [
    (
        "stat",
        "Host health",
        "Host panics (a fatal kernel-mode RMP fault), leaked pages and netd restarts since start.",
        "none",
        [
            ("sum(snp_host_panics_total)", "host panics"),
            ("sum(snp_rmp_leaked_pages_total)", "leaked pages"),
            ("sum(snp_netd_restarts_total)", "netd restarts"),
        ],
        12,
    ),
    (
        "stat",
        "Guests",
        "VMs kvm holds by state, and guest agents that are running.",
        "none",
        [
            ("sum by (state) (snp_kvm_vms)", "VMs {{state}}"),
            ('sum(snp_guest_agent_state{state="running"})', "agents running"),
        ],
        12,
    ),
    (
        "timeseries",
        "PSC pages per second",
        "Pages whose RMP state a page-state change altered, by operation and page size.",
        "ops",
        [
            (
                f"sum by (operation, page_size) (rate(snp_psc_pages_total{R}))",
                "{{operation}} {{page_size}}",
            )
        ],
        12,
    ),
    (
        "timeseries",
        "PSC requests per second",
        "Page-state-change requests by protocol (GHCB or MSR) and result.",
        "reqps",
        [
            (
                f"sum by (protocol, result) (rate(snp_psc_requests_total{R}))",
                "{{protocol}} {{result}}",
            )
        ],
        12,
    ),
    (
        "timeseries",
        "Guest requests per second",
        "SNP guest requests (attestation reports, derived keys) kvm handled, by type and result.",
        "reqps",
        [
            (
                f"sum by (msg_type, result) (rate(snp_guest_requests_total{R}))",
                "{{msg_type}} {{result}}",
            )
        ],
        12,
    ),
    (
        "timeseries",
        "Guest request latency",
        "Median and 99th percentile time kvm took per successful guest request.",
        "s",
        [
            (
                "histogram_quantile(0.5, sum by (le) "
                f"(rate(snp_guest_request_duration_seconds_bucket{R})))",
                "p50",
            ),
            (
                "histogram_quantile(0.99, sum by (le) "
                f"(rate(snp_guest_request_duration_seconds_bucket{R})))",
                "p99",
            ),
        ],
        12,
    ),
    (
        "timeseries",
        "VMGEXITs per second",
        "Guest exits to the hypervisor by NAE event (msr_protocol, psc, guest_request, ...).",
        "ops",
        [(f"sum by (exit_code) (rate(snp_vmgexit_total{R}))", "{{exit_code}}")],
        12,
    ),
    (
        "timeseries",
        "RMP pages by state",
        "Host pages per RMP state (hypervisor, guest-invalid, guest-valid, firmware, ...).",
        "short",
        [("sum by (state) (snp_rmp_pages)", "{{state}}")],
        12,
    ),
    (
        "timeseries",
        "RMP violations",
        "Host writes that hit guest-assigned pages, by writer (user, kernel), policy and outcome.",
        "short",
        [
            (
                f"sum by (origin, policy, outcome) (increase(snp_rmp_violations_total{R}))",
                "{{origin}} {{policy}} {{outcome}}",
            )
        ],
        12,
    ),
    (
        "timeseries",
        "PSP commands per second",
        "Firmware commands by command and SEV status; anything but SUCCESS is an error.",
        "reqps",
        [(f"sum by (command, status) (rate(snp_psp_commands_total{R}))", "{{command}} {{status}}")],
        12,
    ),
    (
        "timeseries",
        "PSP errors per second",
        "Firmware commands that answered a status other than SUCCESS.",
        "reqps",
        [
            (
                f'sum by (command, status) (rate(snp_psp_commands_total{{status!="SUCCESS"}}{R}))',
                "{{command}} {{status}}",
            )
        ],
        12,
    ),
    (
        "timeseries",
        "netd packets per second",
        "Packets netd moved between guests, by result (delivered, converted, refused, ...).",
        "pps",
        [(f"sum by (result) (rate(snp_netd_packets_total{R}))", "{{result}}")],
        12,
    ),
]

SERVICES: list[Panel] = [
    (
        "stat",
        "Services up",
        "1 when Prometheus scraped the service's /metrics at the last attempt (per job and "
        "target).",
        "none",
        [("up", "{{job}} {{instance}}")],
        24,
    ),
    (
        "timeseries",
        "RPCs handled per second",
        "Completed RPCs per service, any status.",
        "reqps",
        [(f"sum by (grpc_service) (rate(grpc_server_handled_total{R}))", "{{grpc_service}}")],
        12,
    ),
    (
        "timeseries",
        "RPC errors per second",
        "Completed RPCs whose status was not OK, per service and code.",
        "reqps",
        [
            (
                "sum by (grpc_service, grpc_code) "
                f'(rate(grpc_server_handled_total{{grpc_code!="OK"}}{R}))',
                "{{grpc_service}} {{grpc_code}}",
            )
        ],
        12,
    ),
    (
        "timeseries",
        "RPC latency p99",
        "99th percentile time to handle an RPC, per service.",
        "s",
        [
            (
                "histogram_quantile(0.99, sum by (grpc_service, le) "
                f"(rate(grpc_server_handling_seconds_bucket{R})))",
                "{{grpc_service}}",
            )
        ],
        12,
    ),
    (
        "timeseries",
        "RPCs started per second",
        "RPCs started per service and kind (unary, server_stream, bidi_stream).",
        "reqps",
        [
            (
                f"sum by (grpc_service, grpc_type) (rate(grpc_server_started_total{R}))",
                "{{grpc_service}} {{grpc_type}}",
            )
        ],
        12,
    ),
]


def dashboard(uid: str, title: str, description: str, panels: list[Panel]) -> dict[str, Any]:
    out, x, y, row_h = [], 0, 0, 0
    for i, (kind, ptitle, pdesc, unit, targets, width) in enumerate(panels, start=1):
        height = 4 if kind == "stat" else 8
        if x + width > 24:
            x, y = 0, y + row_h
        out.append(
            {
                "id": i,
                "type": kind,
                "title": ptitle,
                "description": pdesc,
                "datasource": DS,
                "gridPos": {"x": x, "y": y, "w": width, "h": height},
                "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
                "targets": [
                    {"refId": chr(65 + j), "datasource": DS, "expr": e, "legendFormat": legend}
                    for j, (e, legend) in enumerate(targets)
                ],
            }
        )
        x, row_h = x + width, max(row_h if x else 0, height)
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": ["snpemu"],
        "timezone": "utc",
        "schemaVersion": 39,
        "version": 1,
        "refresh": "10s",
        "time": {"from": "now-15m", "to": "now"},
        "panels": out,
        "templating": {"list": []},
        "annotations": {"list": []},
    }


DASHBOARDS = {
    "host-overview.json": dashboard(
        "snpemu-host",
        "snpemu / Host overview",
        "Page-state changes, guest requests, exits, RMP state and violations, the firmware and "
        "netd on one virtual host.",
        HOST,
    ),
    "services.json": dashboard(
        "snpemu-services",
        "snpemu / Services",
        "Health, rate, errors and latency of every snpemu gRPC service.",
        SERVICES,
    ),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args(argv)
    stale = []
    for name, dash in DASHBOARDS.items():
        text = json.dumps(dash, indent=2) + "\n"
        path = OUT / name
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
    if stale:
        print(f"stale: {', '.join(stale)}; run python scripts/gen_dashboards.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
