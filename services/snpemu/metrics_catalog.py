"""Every metric family snpemu exports, in one place (docs/design.md#metrics).

The catalog is the contract that dashboards, alert rules and users read: docs/metrics.md is
rendered from it (`python -m snpemu.metrics_catalog > docs/metrics.md`), and the tests hold
every service's /metrics to it (same families, types and label names; every labelled family
present from the start) and every dashboard query and alert rule to the names it lists.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

ALL = ("rmp", "psp", "kvm", "netd", "guest")
# Labels that would be unbounded (one series per guest, page or device) are never allowed.
FORBIDDEN_LABELS = frozenset(
    {"guest", "vm", "vm_id", "asid", "gpa", "spa", "pfn", "address", "mac", "device", "name"}
)


@dataclass(frozen=True)
class Family:
    name: str  # as exposed; counters end in _total
    type: str  # counter | gauge | histogram
    labels: tuple[str, ...]
    help: str
    services: tuple[str, ...]
    unit: str = ""  # base unit, when the name carries one (seconds, bytes)


GRPC = ("grpc_type", "grpc_service", "grpc_method")

CATALOG: tuple[Family, ...] = (
    # --- every service: go-grpc-prometheus's families ------------------------------------------
    Family("grpc_server_started_total", "counter", GRPC, "RPCs started.", ALL),
    Family(
        "grpc_server_handled_total",
        "counter",
        (*GRPC, "grpc_code"),
        "RPCs completed, by status code (go-grpc-prometheus spelling: OK, Unimplemented, ...).",
        ALL,
    ),
    Family("grpc_server_handling_seconds", "histogram", GRPC, "RPC latency.", ALL, unit="seconds"),
    # --- rmp ---------------------------------------------------------------------------------
    Family("snp_rmp_pages", "gauge", ("state",), "Pages per RMP page state.", ("rmp",)),
    Family(
        "snp_rmp_updates_total",
        "counter",
        ("instruction", "result"),
        "RMP instructions (rmpupdate, psmash, pvalidate, rmpadjust) per page, by return code.",
        ("rmp",),
    ),
    Family(
        "snp_rmp_violations_total",
        "counter",
        ("origin", "policy", "outcome"),
        "Host writes to guest-assigned pages: user or kernel, the policy, what it did.",
        ("rmp",),
    ),
    Family(
        "snp_rmp_leaked_pages_total",
        "counter",
        (),
        "Pages that failed to return to hypervisor state; never reused.",
        ("rmp",),
    ),
    Family(
        "snp_host_panics_total",
        "counter",
        (),
        "Virtual host panics (a fatal kernel-mode RMP fault).",
        ("rmp",),
    ),
    Family(
        "snp_rmp_violation_policy",
        "gauge",
        ("policy",),
        "1 for the RMP-violation policy in force.",
        ("rmp",),
    ),
    Family("snp_rmp_host_maps", "gauge", (), "Host maps of guest pages held.", ("rmp",)),
    Family(
        "snp_rmp_stale_host_maps",
        "gauge",
        (),
        "Host maps held longer than SNPEMU_RMP_MAP_LEAK_S.",
        ("rmp",),
    ),
    Family("snp_rmp_memory_bytes", "gauge", (), "Configured host memory.", ("rmp",), unit="bytes"),
    Family(
        "snp_rmp_resident_bytes",
        "gauge",
        (),
        "Host memory actually written (frames are sparse).",
        ("rmp",),
        unit="bytes",
    ),
    # --- psp -------------------------------------------------------------------------------
    Family(
        "snp_psp_commands_total",
        "counter",
        ("command", "status"),
        "Firmware commands by SEV status name (SUCCESS, INVALID_PARAM, ...).",
        ("psp",),
    ),
    Family(
        "snp_psp_command_duration_seconds",
        "histogram",
        ("command",),
        "Time per firmware command.",
        ("psp",),
        unit="seconds",
    ),
    Family(
        "snp_psp_platform_state",
        "gauge",
        (),
        "Platform state: 0 UNINIT, 1 INIT, 2 WORKING (enum sev_state).",
        ("psp",),
    ),
    Family("snp_guests", "gauge", ("state",), "Guest contexts by firmware state.", ("psp",)),
    Family(
        "snp_psp_vcek_cache_evictions_total",
        "counter",
        (),
        "VCEK certificates dropped from psp's bounded cache (memory and disk), least recently "
        "used first.",
        ("psp",),
    ),
    # --- kvm -------------------------------------------------------------------------------
    Family(
        "snp_vmgexit_total",
        "counter",
        ("exit_code",),
        "VMGEXITs by NAE event (msr_protocol, psc, guest_request, ...).",
        ("kvm",),
    ),
    Family(
        "snp_psc_requests_total",
        "counter",
        ("protocol", "result"),
        "Page-state-change requests by protocol (ghcb, msr) and result.",
        ("kvm",),
    ),
    Family(
        "snp_psc_pages_total",
        "counter",
        ("operation", "page_size"),
        "Pages a PSC changed, by operation (private, shared, psmash, unsmash) and size.",
        ("kvm",),
    ),
    Family(
        "snp_kvm_exits_to_vmm_total",
        "counter",
        ("exit_reason",),
        "Exits kvm handed to the VMM (KVM_RUN returned), by kvm_run exit reason (hypercall: a "
        "gmem VM's page-state change as KVM_HC_MAP_GPA_RANGE).",
        ("kvm",),
    ),
    Family(
        "snp_guest_requests_total",
        "counter",
        ("msg_type", "result"),
        "Guest requests kvm handled, by message type and result.",
        ("kvm",),
    ),
    Family(
        "snp_guest_request_duration_seconds",
        "histogram",
        (),
        "Time kvm took for a successful guest request (copy in, firmware, copy out).",
        ("kvm",),
        unit="seconds",
    ),
    Family(
        "snp_guest_request_throttled_total",
        "counter",
        (),
        "Guest requests answered VMM BUSY by the per-VM throttle.",
        ("kvm",),
    ),
    Family("snp_kvm_vms", "gauge", ("state",), "VMs by state.", ("kvm",)),
    Family(
        "snp_kvm_trace_events_dropped_total",
        "counter",
        (),
        "Trace events a slow StreamTraceEvents subscriber missed.",
        ("kvm",),
    ),
    # --- netd ------------------------------------------------------------------------------
    Family(
        "snp_netd_packets_total",
        "counter",
        ("result",),
        "TX packets by what became of them (delivered, converted, no_route, no_buffer, "
        "refused, bad_frame).",
        ("netd",),
    ),
    Family(
        "snp_netd_restarts_total",
        "counter",
        (),
        "Times netd started again after dying (counted in its data directory).",
        ("netd",),
    ),
    Family("snp_netd_devices", "gauge", (), "Guest devices registered.", ("netd",)),
    # --- guest agents -----------------------------------------------------------------------
    Family(
        "snp_guest_agent_requests_total",
        "counter",
        ("msg_type", "result"),
        "Guest messages the agent sent, by type and result.",
        ("guest",),
    ),
    Family("snp_guest_agent_vc_total", "counter", (), "#VC exceptions taken.", ("guest",)),
    Family("snp_guest_agent_boots_total", "counter", (), "Boots completed.", ("guest",)),
    Family(
        "snp_guest_agent_packets_total",
        "counter",
        ("direction", "result"),
        "Network packets by direction (sent, received) and what became of them.",
        ("guest",),
    ),
    Family(
        "snp_guest_agent_state", "gauge", ("state",), "1 for the guest's boot state.", ("guest",)
    ),
)


def by_service(service: str) -> dict[str, Family]:
    return {f.name: f for f in CATALOG if service in f.services}


def names() -> set[str]:
    """Every series name a query may use (histograms with their _bucket/_sum/_count)."""
    out = set()
    for f in CATALOG:
        if f.type == "histogram":
            out |= {f"{f.name}_bucket", f"{f.name}_sum", f"{f.name}_count"}
        else:
            out.add(f.name)
    return out


def markdown() -> str:
    lines = [
        "# Metrics catalog",
        "",
        "Every family snpemu's services export on their `/metrics` port (Prometheus text",
        "format). Generated from `services/snpemu/metrics_catalog.py`",
        "(`python -m snpemu.metrics_catalog > docs/metrics.md`); a test holds every service to",
        "it. Label values are bounded (never a guest name, ASID or address) and every labelled",
        "series exists from the start, at zero. Units are base units (seconds, bytes).",
        "",
        "| name | type | labels | services | meaning |",
        "|---|---|---|---|---|",
    ]
    for f in CATALOG:
        labels = ", ".join(f"`{x}`" for x in f.labels) or "-"
        services = "all" if f.services == ALL else ", ".join(f.services)
        lines.append(f"| `{f.name}` | {f.type} | {labels} | {services} | {f.help} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(markdown())
