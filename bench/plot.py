"""``metric_vs_bytes.png``: every method's metric against the cumulative bytes its run sent,
the mean over seeds as a line and the spread (min to max) as a band, from a bench report."""

from __future__ import annotations

from pathlib import Path

from .report import points


def plot(report: dict, path: Path) -> None:
    """Write the plot of ``report`` to ``path``. matplotlib is imported here, not at the top: it
    comes with the optional ``bench`` extra, which ``--report-only``'s table does not need. A
    ``Figure`` of its own, not pyplot's global state: a protocol's blocks plot from threads."""
    from matplotlib.figure import Figure

    metric, scale = report["metric"], points(report["metric"])
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    for name, entry in report["results"].items():
        curves = [s["curve"] for s in entry["seeds"].values()]
        rounds = min(len(c) for c in curves) if curves else 0
        xs, mid, low, high = [], [], [], []
        for i in range(rounds):
            values = [c[i]["metric"] for c in curves if c[i]["metric"] is not None]
            if not values:
                continue
            xs.append(sum(c[i]["cumulative_bytes"] for c in curves) / len(curves))
            mid.append(scale * sum(values) / len(values))
            low.append(scale * min(values))
            high.append(scale * max(values))
        if xs:
            line, = ax.plot(xs, mid, marker="o", markersize=3, label=f"{name} (lr {entry['lr']:g})")
            ax.fill_between(xs, low, high, color=line.get_color(), alpha=0.15)
    ax.set_xscale("log")
    ax.set_xlabel("cumulative bytes sent (payload, uplink + downlink, all clients)")
    ax.set_ylabel(f"{metric}" + (" (x100)" if scale == 100 else ""))
    ax.set_title(f"{report['name']}: {report['data_source']}, {report['model']}, seeds {report['seeds']}")
    ax.grid(True, which="both", alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
