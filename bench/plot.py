"""``accuracy_vs_bytes.png``: every method's eval accuracy (eval loss for a causal LM) against
the cumulative bytes on the wire, from a bench report (results.json)."""

from __future__ import annotations

from pathlib import Path


def plot(report: dict, path: Path) -> None:
    """Write the plot of ``report`` to ``path``. matplotlib is imported here, not at the top: it
    comes with the optional ``bench`` extra, which ``--report-only``'s table does not need."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    causal = report["causal"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for s in report["results"]:
        pts = [(c["cumulative_wire_bytes"], c["eval_loss"] if causal else c["eval_accuracy"])
               for c in s["curve"]]
        pts = [(x, y) for x, y in pts if x and y is not None]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] * (1 if causal else 100) for p in pts], marker="o",
                    label=f"{s['method']} (lr {s['lr']:g})")
    if report.get("target_accuracy") and not causal:
        ax.axhline(100 * report["target_accuracy"], color="grey", linestyle="--", linewidth=1, label="target")
    ax.set_xscale("log")
    ax.set_xlabel("cumulative bytes on the wire (uplink + downlink, all clients)")
    ax.set_ylabel("eval loss" if causal else "eval accuracy (%)")
    ax.set_title(f"{report['name']}: {report['data_source']}, {report['model']}")
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    else:  # fedkrso-bench --sim: no socket, so no wire bytes to plot against
        ax.text(0.5, 0.5, "no wire bytes measured (fedkrso-sim)", transform=ax.transAxes, ha="center")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
