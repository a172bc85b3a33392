"""The live view's arithmetic: rates across scrapes (with restarts) and histogram quantiles."""

from __future__ import annotations

import math

from snpemu.launcher.top import Sample, quantile, rates, render, view


def s(at: float, **values: float) -> Sample:
    series = {}
    for key, v in values.items():
        name, _, label = key.partition("__")
        labels = (("exit_code", label),) if label else ()
        series[(name, labels)] = v
    return Sample(at, series)


def test_rates_per_label_and_after_a_restart() -> None:
    a = s(0.0, snp_vmgexit_total__psc=10, snp_vmgexit_total__guest_request=4)
    b = s(2.0, snp_vmgexit_total__psc=30, snp_vmgexit_total__guest_request=2)
    got = rates(a, b, "snp_vmgexit_total", "exit_code")
    # psc: 20 in 2 s; guest_request went down (the process restarted): 2 new in 2 s
    assert got == {"psc": 10.0, "guest_request": 1.0}


def hist(at: float, counts: dict[str, float]) -> Sample:
    name = "snp_guest_request_duration_seconds_bucket"
    return Sample(at, {(name, (("le", le),)): v for le, v in counts.items()})


def test_quantile_interpolates_within_the_bucket() -> None:
    a = hist(0, {"0.001": 5, "0.002": 5, "0.005": 5, "+Inf": 5})
    b = hist(1, {"0.001": 5, "0.002": 15, "0.005": 25, "+Inf": 25})
    # 20 new observations: 10 in (1 ms, 2 ms], 10 in (2 ms, 5 ms]
    assert math.isclose(quantile(a, b, "snp_guest_request_duration_seconds", 0.5), 0.002)
    assert math.isclose(quantile(a, b, "snp_guest_request_duration_seconds", 0.25), 0.0015)
    assert math.isnan(quantile(a, a, "snp_guest_request_duration_seconds", 0.5))


def test_view_and_render_show_every_section() -> None:
    a = s(0.0, snp_vmgexit_total__psc=0)
    b = s(1.0, snp_vmgexit_total__psc=7)
    v = view(a, b)
    assert v["exits_per_s"] == {"psc": 7.0}
    assert v["guest_request_p50_s"] is None
    text = render(v, ["rmp", "kvm"])
    for title in ("VMGEXITs", "PSC pages", "Guest requests", "netd packets", "RMP pages"):
        assert title in text
    assert "psc" in text and "up: rmp, kvm" in text
