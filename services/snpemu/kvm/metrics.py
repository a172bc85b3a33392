"""kvm's Prometheus families.

snp_vmgexit_total{exit_code}                      VMGEXITs by NAE event (msr_protocol, psc, ...)
snp_psc_requests_total{protocol,result}           page-state-change requests (ghcb, msr)
snp_psc_pages_total{operation,page_size}          pages changed (private/shared, 4k/2m)
snp_kvm_exits_to_vmm_total{exit_reason}           exits handed to the VMM (hypercall)
snp_guest_requests_total{msg_type,result}         guest requests (report, key, other)
snp_guest_request_duration_seconds                histogram, successful guest requests
snp_guest_request_throttled_total                 answered VMM BUSY by the per-VM throttle
snp_kvm_vms{state}                                VMs by state
snp_kvm_trace_events_dropped_total                trace events a slow subscriber missed
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from snpemu.abi.ghcb import EXIT_NAMES
from snpemu.kvm.machine import Kvm
from snpemu.kvm.vm import VmState

EXITS = ("msr_protocol", *sorted(set(EXIT_NAMES.values())), "unknown")
PSC_RESULTS = ("success", "invalid_hdr", "invalid_entry", "generic")
MSG_TYPES = ("report", "key", "other")
REQUEST_RESULTS = ("success", "busy", "invalid_len", "firmware_error")


class KvmCollector(Collector):
    def __init__(self, kvm: Kvm) -> None:
        self.kvm = kvm

    def collect(self) -> Iterator[Metric]:
        c = self.kvm.counters
        exits = CounterMetricFamily("snp_vmgexit", "VMGEXITs by NAE event.", labels=["exit_code"])
        for name in EXITS:
            exits.add_metric([name], float(c.vmgexits[name]))
        yield exits
        reqs = CounterMetricFamily(
            "snp_psc_requests", "Page state change requests.", labels=["protocol", "result"]
        )
        for proto in ("ghcb", "msr"):
            for result in PSC_RESULTS:
                reqs.add_metric([proto, result], float(c.psc_requests[(proto, result)]))
        yield reqs
        pages = CounterMetricFamily(
            "snp_psc_pages", "Pages whose state a PSC changed.", labels=["operation", "page_size"]
        )
        for op in ("private", "shared"):
            for size in ("4k", "2m"):
                pages.add_metric([op, size], float(c.psc_pages[(op, size)]))
        yield pages
        user = CounterMetricFamily(
            "snp_kvm_exits_to_vmm",
            "Exits kvm handed to the VMM (KVM_RUN returned).",
            labels=["exit_reason"],
        )
        user.add_metric(["hypercall"], float(c.vmm_exits["hypercall"]))
        yield user
        gr = CounterMetricFamily(
            "snp_guest_requests",
            "Guest requests (SNP_GUEST_REQUEST NAE).",
            labels=["msg_type", "result"],
        )
        for t in MSG_TYPES:
            for r in REQUEST_RESULTS:
                gr.add_metric([t, r], float(c.guest_requests[(t, r)]))
        yield gr
        yield CounterMetricFamily(
            "snp_guest_request_throttled",
            "Guest requests answered VMM BUSY by the throttle.",
            value=float(c.throttled),
        )
        vms = GaugeMetricFamily("snp_kvm_vms", "VMs by state.", labels=["state"])
        for state in VmState:
            vms.add_metric(
                [state.name.lower()],
                float(sum(1 for v in self.kvm.vms.values() if v.state == state)),
            )
        yield vms
        yield CounterMetricFamily(
            "snp_kvm_trace_events_dropped",
            "Trace events not delivered to a subscriber that fell behind.",
            value=float(self.kvm.trace.dropped),
        )


def register(kvm: Kvm, registry: CollectorRegistry) -> None:
    registry.register(KvmCollector(kvm))
    duration = Histogram(
        "snp_guest_request_duration_seconds",
        "Time kvm took for a guest request (copy in, firmware, copy out).",
        buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
        registry=registry,
    )
    kvm.counters.observe_request = duration.observe
