"""psp's Prometheus families.

snp_psp_commands_total{command,status}      counter  firmware commands by SEV status name
snp_psp_command_duration_seconds{command}   histogram time per command
snp_psp_platform_state                      gauge    enum sev_state: 0 UNINIT, 1 INIT, 2 WORKING
snp_guests{state}                           gauge    guest contexts by state (init, launch, running)
snp_psp_vcek_cache_evictions_total          counter  VCEKs dropped to stay within the cap
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from snpemu.psp.firmware import Firmware
from snpemu.psp.guest import GuestState
from snpemu.psp.status import COMMAND_ERROR, SevStatus

COMMANDS = (
    "SNP_INIT",
    "SNP_INIT_EX",
    "SNP_DF_FLUSH",
    "SNP_SHUTDOWN",
    "SNP_SHUTDOWN_EX",
    "SNP_PLATFORM_STATUS",
    "SNP_CONFIG",
    "SNP_COMMIT",
    "SNP_FEATURE_INFO",
    "SNP_SET_EXT_CONFIG",
    "SEV_INIT",
    "SEV_SHUTDOWN",
    "SNP_GCTX_CREATE",
    "SNP_LAUNCH_START",
    "SNP_ACTIVATE",
    "SNP_LAUNCH_UPDATE",
    "SNP_LAUNCH_FINISH",
    "SNP_GUEST_STATUS",
    "SNP_DECOMMISSION",
    "SNP_PAGE_RECLAIM",
    "SNP_PAGE_UNSMASH",
    "SNP_DBG_DECRYPT",
    "SNP_DBG_ENCRYPT",
    "SNP_GUEST_REQUEST",
)
BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0)


class PspCollector(Collector):
    def __init__(self, fw: Firmware) -> None:
        self.fw = fw

    def collect(self) -> Iterator[Metric]:
        commands = CounterMetricFamily(
            "snp_psp_commands",
            "Firmware commands completed, by command and SEV status name.",
            labels=["command", "status"],
        )
        # every (command, status) from the start, at zero, so that a command's first failure
        # is a step a rate() sees (as runtime/metrics.py does for gRPC codes); COMMAND_ERROR is
        # mailbox.command()'s name for an exception that is not a firmware status
        seen = dict(self.fw.stats.commands)
        for c in COMMANDS:
            for status in (*(s.name for s in SevStatus), COMMAND_ERROR):
                seen.setdefault((c, status), 0)
        for (c, s), n in sorted(seen.items()):
            commands.add_metric([c, s], float(n))
        yield commands
        yield GaugeMetricFamily(
            "snp_psp_platform_state",
            "Platform state as enum sev_state: 0 UNINIT, 1 INIT, 2 WORKING.",
            value=float(int(self.fw.platform_state) - 1),
        )
        guests = GaugeMetricFamily("snp_guests", "Guest contexts by state.", labels=["state"])
        for state in GuestState:
            n = sum(1 for g in self.fw.guests.values() if g.state == state)
            guests.add_metric([state.name.lower()], float(n))
        yield guests
        yield CounterMetricFamily(
            "snp_psp_vcek_cache_evictions",
            "VCEK certificates dropped from the bounded cache (memory and disk), least recently "
            "used first.",
            value=float(self.fw.id.vceks.evictions),
        )


def register(fw: Firmware, registry: CollectorRegistry) -> None:
    registry.register(PspCollector(fw))
    duration = Histogram(
        "snp_psp_command_duration_seconds",
        "Time the firmware took per command.",
        ["command"],
        buckets=BUCKETS,
        registry=registry,
    )
    for c in COMMANDS:
        duration.labels(c)
    fw.on_command = lambda name, _status, seconds: duration.labels(name).observe(seconds)
