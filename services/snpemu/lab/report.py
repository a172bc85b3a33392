"""The lab's outputs: a terminal table, JSON, a PNG chart and the docs results page."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

from snpemu.lab.scenarios import POLICIES, SCENARIOS

COLUMNS = [
    ("scenario", "scenario"),
    ("policy", "policy"),
    ("daemon_deaths", "netd deaths"),
    ("host_panics", "host panics"),
    ("guests_terminated", "terminated"),
    ("guests_with_vc", "saw #VC"),
    ("innocent_guests_losing_packets", "innocents losing"),
    ("packets_delivered", "delivered"),
    ("packets_lost_counted", "lost (counted)"),
    ("packets_lost_with_host", "lost with host"),
    ("recovery_s", "recovery s"),
    ("silent_corruptions", "silent corruptions"),
    ("silently_lost", "silently lost"),
]

POLICY_TEXT = {
    "sigbus": "SNP host series v5 as posted: a user-mode writer of a guest-private page gets "
    "SIGBUS; a kernel-mode writer takes an unhandled RMP #PF and the host panics.",
    "convert": "The proposal from the v5 review: the fault handler RMPUPDATEs the page to "
    "shared (kicking the guest's vCPUs first when it is a VMSA page or an RMPADJUST holds it) "
    "and the write goes on; the guest takes #VC when it next touches the page privately.",
    "convert-kill": "As convert, and KVM terminates the guest whose page was converted.",
    "gmem": "What merged (guest_memfd): private memory is never mapped into host userspace, so "
    "a user-mode write fails cleanly; a kernel-mode RMP #PF is still fatal.",
}


def cell(row: dict[str, Any], key: str) -> str:
    v = row[key]
    if isinstance(v, list):
        return ",".join(v) if v else "-"
    if v is None:
        return "never"
    if isinstance(v, float):
        return f"{v:.2f}"
    return str(v)


def table(rows: list[dict[str, Any]], markdown: bool = False) -> str:
    heads = [h for _, h in COLUMNS]
    body = [[cell(r, k) for k, _ in COLUMNS] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
        lines += ["| " + " | ".join(b) + " |" for b in body]
        return "\n".join(lines)
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(heads)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join(
        [fmt.format(*heads), fmt.format(*("-" * w for w in widths))]
        + [fmt.format(*b) for b in body]
    )


def severity(row: dict[str, Any]) -> tuple[int, str]:
    """The worst thing that happened in a run, for the chart."""
    if row["silent_corruptions"] or row["silently_lost"]:
        return 5, "SILENT CORRUPTION"
    if row["host_panics"]:
        return 4, "host panic"
    if row["daemon_deaths"]:
        return 3, f"netd died x{row['daemon_deaths']}\n{row['packets_lost_counted']} pkts lost"
    if row["guests_terminated"]:
        return 2, "guest-0 killed" if row["guests_terminated"] == ["guest-0"] else "guests killed"
    if row["guests_with_vc"]:
        return 1, "#VC in " + ",".join(g.replace("guest-", "g") for g in row["guests_with_vc"])
    if any(": refused" in t for t in row["trigger"]):
        return 0, "guest-0's packet\nrefused (counted)"
    return 0, "nothing broke"


def chart(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    scenarios = [s.name for s in SCENARIOS if any(r["scenario"] == s.name for r in rows)]
    policies = [p for p in POLICIES if any(r["policy"] == p for r in rows)]
    grid = [[0] * len(policies) for _ in scenarios]
    labels = [[""] * len(policies) for _ in scenarios]
    for r in rows:
        i, j = scenarios.index(r["scenario"]), policies.index(r["policy"])
        grid[i][j], labels[i][j] = severity(r)
    colors = ListedColormap(["#cfe8cf", "#fff2b3", "#ffd59e", "#f6a26b", "#e0544b", "#7a0019"])
    fig, ax = plt.subplots(figsize=(2.3 * len(policies) + 2, 0.9 * len(scenarios) + 1.4))
    ax.imshow(grid, cmap=colors, vmin=0, vmax=5, aspect="auto")
    for i in range(len(scenarios)):
        for j in range(len(policies)):
            ax.text(j, i, labels[i][j], ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(policies)), policies)
    ax.set_yticks(range(len(scenarios)), scenarios)
    ax.xaxis.tick_top()
    ax.set_title("What broke: each scenario under each RMP-violation policy", pad=28, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(
    rows: list[dict[str, Any]], out: Path, meta: dict[str, Any] | None = None
) -> None:
    """results.json and results.png; meta (when and where) kept from an earlier run if given."""
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "generated": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()} "
        f"{platform.release()}, Python {platform.python_version()}",
        **{k: v for k, v in (meta or {}).items() if k in ("generated", "machine")},
    }
    (out / "results.json").write_text(json.dumps({**meta, "runs": rows}, indent=2) + "\n")
    chart(rows, out / "results.png")


def results_page(
    rows: list[dict[str, Any]], chart_rel: str, generated: str, machine: str = ""
) -> str:
    on = f" on {machine}" if machine else ""
    parts = [
        "# The RMP-policy lab: results",
        "",
        f"Generated by `make lab` (`python -m snpemu.lab`) at {generated}{on}. Each run starts"
        " a fresh virtual host (rmp, psp, kvm, netd and four guest agents as processes), has"
        " guests 1-3 exchange checksummed packets through netd, and lets guest-0 misbehave."
        " Guests run with `SNPEMU_GUEST_ON_VC=log`, so a #VC is reported instead of ending the"
        " guest: who saw one is part of the result. `python -m snpemu.lab --render-only"
        " --out docs/lab --doc docs/lab-results.md` rewrites this page from the JSON.",
        "",
        f"![What broke, per scenario and policy]({chart_rel})",
        "",
        "## The policies",
        "",
        *(f"- **{p}**: {t}" for p, t in POLICY_TEXT.items()),
        "",
        "## The scenarios",
        "",
        *(f"- **{s.name}**: {s.title}." for s in SCENARIOS),
        "",
        "## Every run",
        "",
        "Columns: netd deaths (restarts by the launcher), host panics, guests terminated (by"
        " kvm or by themselves), guests that took a #VC, innocent guests that lost a packet,"
        " innocent packets delivered, lost with a count (the sender was told) and lost with the"
        " host (netd reported them delivered, then the host panicked before the receiver looked"
        " at its ring again), time from the first failed innocent packet to traffic flowing"
        " again, and the two columns that must be zero everywhere: payloads that arrived"
        " corrupted, forged, at the wrong guest or twice without anyone being told, and packets"
        " netd reported delivered that a later look at the receiver's ring did not find. Every"
        " packet sent is in exactly one of delivered, lost (counted), lost with host and"
        " silently lost.",
        "",
        table(rows, markdown=True),
        "",
        "## What each run's trigger did",
        "",
    ]
    for r in rows:
        parts.append(f"- {r['scenario']} / {r['policy']}: " + "; ".join(r["trigger"]))
    parts += ["", "## Reading it", "", *(f"- {summary(rows, p)}" for p in POLICIES), ""]
    parts += [
        "The kernel-write row under gmem panics because the model applies the design's rule"
        " that a kernel-mode RMP #PF is fatal. In merged KVM a kernel write through the"
        " memslot's shared mapping lands in the shared alias instead of faulting; that path is"
        " not modelled.",
        "",
    ]
    return "\n".join(parts)


def summary(rows: list[dict[str, Any]], policy: str) -> str:
    """One sentence per policy, from the runs (never written by hand)."""
    mine = [r for r in rows if r["policy"] == policy]
    if not mine:
        return f"**{policy}**: not run."

    def where(pred: Any) -> str:
        names = [r["scenario"] for r in mine if pred(r)]
        return ", ".join(names) if names else "none"

    return (
        f"**{policy}**: netd died in {where(lambda r: r['daemon_deaths'])}; "
        f"the host panicked in {where(lambda r: r['host_panics'])}; "
        f"guests were terminated in {where(lambda r: r['guests_terminated'])}; "
        f"innocent guests lost packets in {where(lambda r: r['innocent_guests_losing_packets'])}; "
        f"only guest-0 saw #VC in {where(lambda r: r['guests_with_vc'] == ['guest-0'])}; "
        f"silent corruptions: {sum(r['silent_corruptions'] + r['silently_lost'] for r in mine)}."
    )
