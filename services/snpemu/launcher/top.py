"""`snpemu top`: a kvm_stat-like live view of a running virtual host.

It scrapes every service's /metrics itself (no Prometheus needed), as kvm_stat reads debugfs,
and shows per-second rates between two scrapes: VMGEXITs by exit code, PSC pages, guest
requests and their latency, netd packets, and the RMP's pages by state.

    snpemu top                 # refresh in place every second; Ctrl-C quits
    snpemu top --once          # one sample (two scrapes a second apart), for scripts
    snpemu top --once --json   # the same as JSON
    snpemu top --record 30 --png view.png   # 30 one-second samples drawn as a chart
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from snpemu.hostconfig import ConfigError, HostConfig

Series = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str, timeout: float = 2.0) -> Series:
    """Every sample of one /metrics page; {} when it does not answer."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            text = r.read().decode()
    except OSError:
        return {}
    out: Series = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def total(series: Series, name: str, by: str | None = None, **match: str) -> dict[str, float]:
    """Sum of a metric's samples, grouped by one label (key "" when by is None)."""
    out: dict[str, float] = {}
    for (n, labels), v in series.items():
        d = dict(labels)
        if n != name or any(d.get(k) != want for k, want in match.items()):
            continue
        key = d.get(by, "") if by else ""
        out[key] = out.get(key, 0.0) + v
    return out


@dataclass
class Sample:
    at: float
    series: Series = field(default_factory=dict)


def rates(a: Sample, b: Sample, name: str, by: str | None = None, **match: str) -> dict[str, float]:
    dt = max(b.at - a.at, 1e-9)
    before = total(a.series, name, by, **match)
    after = total(b.series, name, by, **match)
    out = {}
    for k, v in after.items():
        prev = before.get(k, 0.0)
        # a counter that went down belongs to a restarted process: count from zero
        out[k] = (v - prev if v >= prev else v) / dt
    return out


def quantile(a: Sample, b: Sample, name: str, q: float) -> float:
    """A quantile of the observations made between two scrapes of a histogram."""
    buckets: dict[float, float] = {}
    for (n, labels), v in b.series.items():
        if n != f"{name}_bucket":
            continue
        le = float(dict(labels)["le"])
        buckets[le] = buckets.get(le, 0.0) + v - a.series.get((n, labels), 0.0)
    if not buckets:
        return math.nan
    edges = sorted(buckets)
    count = buckets[edges[-1]]
    if count <= 0:
        return math.nan
    rank, lower, below = q * count, 0.0, 0.0
    for le in edges:
        if buckets[le] >= rank:
            if math.isinf(le):
                return lower
            width = buckets[le] - below
            return lower + (le - lower) * ((rank - below) / width if width else 1.0)
        lower, below = le, buckets[le]
    return lower


def view(a: Sample, b: Sample) -> dict[str, Any]:
    """The live view's numbers: what the terminal shows, and what --json prints."""
    p50 = quantile(a, b, "snp_guest_request_duration_seconds", 0.5)
    p99 = quantile(a, b, "snp_guest_request_duration_seconds", 0.99)
    return {
        "interval_s": round(b.at - a.at, 3),
        "exits_per_s": rates(a, b, "snp_vmgexit_total", "exit_code"),
        "psc_pages_per_s": rates(a, b, "snp_psc_pages_total", "operation"),
        "psc_requests_per_s": rates(a, b, "snp_psc_requests_total", "result"),
        "guest_requests_per_s": rates(a, b, "snp_guest_requests_total", "result"),
        "guest_request_p50_s": None if math.isnan(p50) else p50,
        "guest_request_p99_s": None if math.isnan(p99) else p99,
        "netd_packets_per_s": rates(a, b, "snp_netd_packets_total", "result"),
        "rmp_pages": total(b.series, "snp_rmp_pages", "state"),
        "rmp_violations": total(b.series, "snp_rmp_violations_total", "outcome"),
        "host_panics": total(b.series, "snp_host_panics_total").get("", 0.0),
    }


class Host:
    def __init__(self, config: HostConfig) -> None:
        self.urls = {e.name: f"http://127.0.0.1:{e.metrics_port}/metrics" for e in config.endpoints}

    def sample(self) -> tuple[Sample, list[str]]:
        s = Sample(time.monotonic())
        up = []
        for name, url in self.urls.items():
            got = scrape(url)
            if got:
                up.append(name)
            for (n, labels), v in got.items():
                key = (n, labels)
                s.series[key] = s.series.get(key, 0.0) + v
        return s, up


def _rows(title: str, values: dict[str, float], unit: str = "/s") -> Iterator[str]:
    shown = {k: v for k, v in sorted(values.items()) if v}
    yield f"{title:<28}{sum(values.values()):>12.1f} {unit}"
    for k, v in shown.items():
        yield f"  {k or '-':<26}{v:>12.1f}"


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.2f} ms"


def render(v: dict[str, Any], up: list[str]) -> str:
    lines = [
        f"snpemu top   {time.strftime('%H:%M:%S')}   interval {v['interval_s']:.1f} s   "
        f"up: {', '.join(up) or 'nothing'}",
        "",
        *_rows("VMGEXITs by exit code", v["exits_per_s"]),
        *_rows("PSC pages by operation", v["psc_pages_per_s"]),
        *_rows("PSC requests by result", v["psc_requests_per_s"]),
        *_rows("Guest requests by result", v["guest_requests_per_s"]),
        f"  {'latency p50 / p99':<26}{_ms(v['guest_request_p50_s']):>12} / "
        f"{_ms(v['guest_request_p99_s'])}",
        *_rows("netd packets by result", v["netd_packets_per_s"]),
        *_rows("RMP pages by state", v["rmp_pages"], "pages"),
        *_rows("RMP violations by outcome", v["rmp_violations"], "total"),
        f"{'Host panics':<28}{v['host_panics']:>12.0f}",
    ]
    return "\n".join(lines)


def chart(samples: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [i * samples[0]["interval_s"] for i in range(len(samples))]
    panels = [
        ("VMGEXITs/s by exit code", "exits_per_s"),
        ("PSC pages/s by operation", "psc_pages_per_s"),
        ("Guest requests/s by result", "guest_requests_per_s"),
        ("netd packets/s by result", "netd_packets_per_s"),
    ]
    fig, axes = plt.subplots(2, 2, figsize=(11, 6.5), sharex=True)
    for ax, (title, key) in zip(axes.flat, panels, strict=True):
        keys = sorted({k for s in samples for k, v in s[key].items() if v})
        for k in keys:
            ax.plot(t, [s[key].get(k, 0.0) for s in samples], label=k or "all")
        ax.set_title(title, fontsize=10)
        if keys:
            ax.legend(fontsize=7, loc="upper left")
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("seconds")
    fig.suptitle("snpemu top: a live virtual host", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="snpemu top", description=__doc__.splitlines()[0])
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between scrapes")
    parser.add_argument("--once", action="store_true", help="print one sample and exit")
    parser.add_argument("--json", action="store_true", help="with --once: JSON")
    parser.add_argument("--record", type=int, metavar="N", help="take N samples, then stop")
    parser.add_argument("--png", type=Path, help="with --record: draw the samples here")
    args = parser.parse_args(argv)
    try:
        host = Host(HostConfig.load())
    except ConfigError as e:
        print(f"snpemu top: {e.message}", file=sys.stderr)
        return 2
    prev, _ = host.sample()
    recorded: list[dict[str, Any]] = []
    try:
        while True:
            time.sleep(args.interval)
            cur, up = host.sample()
            v = view(prev, cur)
            v["services_up"] = up
            prev = cur
            if args.once:
                print(json.dumps(v, indent=2) if args.json else render(v, up))
                return 0 if up else 1
            if args.record:
                recorded.append(v)
                print(f"\rsample {len(recorded)}/{args.record}", end="", flush=True)
                if len(recorded) >= args.record:
                    print()
                    if args.png:
                        chart(recorded, args.png)
                        print(f"wrote {args.png}")
                    else:
                        print(json.dumps(recorded))
                    return 0
                continue
            # refresh in place: home the cursor, clear the screen (as top and kvm_stat do)
            sys.stdout.write("\x1b[H\x1b[2J" + render(v, up) + "\n")
            sys.stdout.flush()
    except KeyboardInterrupt:
        return 0
