"""The metrics catalog follows Prometheus naming and docs/metrics.md is its rendering."""

from __future__ import annotations

import re
from pathlib import Path

from snpemu.metrics_catalog import CATALOG, FORBIDDEN_LABELS, markdown

ROOT = Path(__file__).resolve().parents[2]


def test_names_follow_prometheus_conventions() -> None:
    seen = set()
    for f in CATALOG:
        assert f.name not in seen, f.name
        seen.add(f.name)
        assert re.fullmatch(r"(snp|grpc_server)_[a-z0-9_]+", f.name), f.name
        assert f.type in ("counter", "gauge", "histogram"), f.name
        assert f.name.endswith("_total") == (f.type == "counter"), f.name
        for unit in ("seconds", "bytes"):
            if unit in f.name:
                assert f.unit == unit and f.name.endswith(f"_{unit}"), f.name
        assert not re.search(r"_(ms|milliseconds|kb|mb|kib|mib|minutes)(_|$)", f.name), f.name
        assert f.help.endswith(".") and not f.help[0].islower(), f.name
        assert f.services, f.name


def test_labels_are_bounded() -> None:
    for f in CATALOG:
        assert not set(f.labels) & FORBIDDEN_LABELS, f.name
        for label in f.labels:
            assert re.fullmatch(r"[a-z][a-z_]*", label), (f.name, label)
            assert label != "le" and label != "quantile", f.name


def test_the_families_design_names_are_in_the_catalog() -> None:
    design = {
        "snp_psc_requests_total",
        "snp_psc_pages_total",
        "snp_guest_requests_total",
        "snp_guest_request_duration_seconds",
        "snp_vmgexit_total",
        "snp_rmp_violations_total",
        "snp_rmp_pages",
        "snp_rmp_leaked_pages_total",
        "snp_psp_commands_total",
        "snp_psp_command_duration_seconds",
        "snp_guests",
        "snp_netd_packets_total",
        "snp_host_panics_total",
    }
    assert design <= {f.name for f in CATALOG}


def test_docs_are_the_catalogs_rendering() -> None:
    assert (ROOT / "docs/metrics.md").read_text() == markdown(), (
        "regenerate with: python -m snpemu.metrics_catalog > docs/metrics.md"
    )
