"""rmp's Prometheus families, read from the model's own counters at scrape time.

snp_rmp_pages{state}                          gauge    pages per RMP page state
snp_rmp_updates_total{instruction,result}     counter  RMP instructions by result (per page)
snp_rmp_violations_total{origin,policy,outcome} counter host writes to assigned pages
snp_rmp_leaked_pages_total                    counter  pages that can never be reused
snp_host_panics_total                         counter  virtual host panics (0 or 1 per boot)
snp_rmp_violation_policy{policy}              gauge    1 for the policy in force
snp_rmp_host_maps / snp_rmp_stale_host_maps   gauge    host maps held / held too long
snp_rmp_memory_bytes, snp_rmp_resident_bytes  gauge    configured / written memory
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from snpemu.abi.addr import PAGE_SIZE
from snpemu.abi.rmp import AccessOrigin, Code, PageState
from snpemu.rmp.machine import RmpMachine
from snpemu.rmp.violations import Outcome, Policy

INSTRUCTIONS = ("rmpupdate", "psmash", "pvalidate", "rmpadjust")
# -1: the instruction faulted (#NPF/#VC) instead of returning a code
RESULTS = {**{int(c): c.name.lower() for c in Code}, -1: "fault"}


class RmpCollector(Collector):
    def __init__(self, machine: RmpMachine) -> None:
        self.m = machine

    def collect(self) -> Iterator[Metric]:
        m = self.m
        pages = GaugeMetricFamily("snp_rmp_pages", "Pages per RMP page state.", labels=["state"])
        for state in PageState:
            pages.add_metric([state.name.lower()], float(m.table.counts[state]))
        yield pages

        updates = CounterMetricFamily(
            "snp_rmp_updates_total",
            "RMP instructions executed, per page, by instruction and result.",
            labels=["instruction", "result"],
        )
        for insn in INSTRUCTIONS:
            for code, name in RESULTS.items():
                updates.add_metric([insn, name], float(m.counters.updates[(insn, code)]))
        yield updates

        violations = CounterMetricFamily(
            "snp_rmp_violations_total",
            "Host writes to pages the RMP assigns (RMP violations), by origin, policy, outcome.",
            labels=["origin", "policy", "outcome"],
        )
        for origin in AccessOrigin:
            for policy in Policy:
                for outcome in Outcome:
                    if outcome == Outcome.NONE:
                        continue
                    key = (origin.name.lower(), policy.label, outcome.name.lower())
                    violations.add_metric(list(key), float(m.counters.violations[key]))
        yield violations

        yield CounterMetricFamily(
            "snp_rmp_leaked_pages",
            "Pages marked leaked: they failed to return to hypervisor state and are never reused.",
            value=float(m.counters.leaked_pages),
        )
        yield CounterMetricFamily(
            "snp_host_panics",
            "Virtual host panics (a kernel-mode RMP fault).",
            value=float(m.counters.panics),
        )
        in_force = GaugeMetricFamily(
            "snp_rmp_violation_policy",
            "1 for the RMP-violation policy in force.",
            labels=["policy"],
        )
        for p in Policy:
            in_force.add_metric([p.label], 1.0 if m.policy == p else 0.0)
        yield in_force
        yield GaugeMetricFamily(
            "snp_rmp_host_maps", "Host maps of guest pages held now.", value=float(len(m.maps))
        )
        yield GaugeMetricFamily(
            "snp_rmp_stale_host_maps",
            "Host maps held longer than the leak threshold (a map without its unmap).",
            value=float(len(m.stale_maps())),
        )
        yield GaugeMetricFamily(
            "snp_rmp_memory_bytes", "Configured host memory.", value=float(m.memory_bytes)
        )
        yield GaugeMetricFamily(
            "snp_rmp_resident_bytes",
            "Host memory whose contents have been written.",
            value=float(m.frames.resident_frames * PAGE_SIZE),
        )
