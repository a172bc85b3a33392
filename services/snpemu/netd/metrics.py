"""netd's Prometheus families (docs/design.md#metrics): packets by result, restarts, devices.

snp_netd_packets_total{result}  counter  TX packets by what became of them (netd PacketResult)
snp_netd_restarts_total         counter  times netd came back after dying (SIGBUS, crash)
snp_netd_devices                gauge    devices registered now
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from snpemu.netd.daemon import NetDaemon, Result


class NetdCollector(Collector):
    def __init__(self, daemon: NetDaemon, restarts: int) -> None:
        self.d, self.restarts = daemon, restarts

    def collect(self) -> Iterator[Metric]:
        packets = CounterMetricFamily(
            "snp_netd_packets", "TX packets by what became of them.", labels=["result"]
        )
        for r in Result:
            packets.add_metric([r.label], float(self.d.results[r]))
        yield packets
        yield CounterMetricFamily(
            "snp_netd_restarts",
            "Times netd started again after dying (counted in its data directory).",
            value=float(self.restarts),
        )
        yield GaugeMetricFamily(
            "snp_netd_devices", "Guest devices registered.", value=float(len(self.d.devices))
        )


def register(daemon: NetDaemon, restarts: int, registry: CollectorRegistry) -> None:
    registry.register(NetdCollector(daemon, restarts))
