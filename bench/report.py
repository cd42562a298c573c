"""From result cells to the bench report: per-seed summaries, their mean and spread, paired
differences between methods with 95% intervals, the answers, and ``results.md``.

Everything here reads plain dicts (cell.json, results.json), never a model or a process, so
``fedkrso-bench --report-only`` can rewrite a report without running anything. Metrics are the
task's own (``common/metrics.py``: accuracy, F1, MCC, Pearson, ...) and are shown in points
(x100); a causal LM is scored by its eval loss (lower is better).
"""

from __future__ import annotations

import math

from .stats import mean_std, paired_interval, verdict

PEERS = ("fedavg", "fedit")  # every row's paired difference is taken against these


def mean(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def higher_is_better(metric: str) -> bool:
    return metric not in ("loss", "perplexity")


def curve(rows: list[dict], metric: str) -> list[dict]:
    """Per round: the metric, the eval loss and the cumulative payload bytes (uplink plus
    downlink, all clients: what a run has sent by then)."""
    total, out = 0, []
    for r in rows:
        total += (r.get("uplink_payload_bytes") or 0) + (r.get("downlink_payload_bytes") or 0)
        out.append({"round": r["round"], "metric": r.get(f"eval_{metric}"), "eval_loss": r.get("eval_loss"),
                    "cumulative_bytes": total})
    return out


def summarise(cell: dict, metric: str) -> dict:
    """One cell's figures: the metric's final, best and last-3 mean, bytes, state, time."""
    rows = cell["rows"]
    c = curve(rows, metric)
    values = [p["metric"] for p in c]
    good = [v for v in values if v is not None]
    best = (max if higher_is_better(metric) else min)(good) if good else None
    return {
        "seed": cell["seed"], "lr": cell["lr"], "rounds": len(rows),
        "final": values[-1] if values else None, "best": best, "last3": mean(values[-3:]),
        "final_eval_loss": rows[-1].get("eval_loss") if rows else None,
        "uplink_payload_per_client_round": mean([r.get("uplink_payload_bytes_per_client") for r in rows]),
        "downlink_payload_per_client_round": mean([r.get("downlink_payload_bytes_per_client") for r in rows]),
        "uplink_wire_per_client_round": mean([r.get("uplink_wire_bytes_per_client") for r in rows]),
        "train_state_bytes": max((r.get("client_train_state_bytes") or 0 for r in rows), default=0),
        "peak_rss_bytes": cell.get("peak_rss_bytes"),
        "accelerator_peak_bytes": max((r.get("client_accelerator_peak_bytes") or 0 for r in rows), default=0),
        "seconds": cell.get("seconds"),
        "curve": c,
        **({"replayed_from": cell["replayed_from"]} if cell.get("replayed_from") else {}),
    }


def sweep_score(summary: dict, select_by: str, metric: str) -> float:
    value = summary["last3"] if select_by == "last3" else summary["final"]
    if value is None or not math.isfinite(value):
        return -math.inf
    return value if higher_is_better(metric) else -value


def aggregate(entry: dict) -> dict:
    """Mean and standard deviation over the seeds of a method's reported runs."""
    seeds = entry["seeds"].values()
    return {key: mean_std([s[key] for s in seeds]) for key in ("final", "best", "last3")} | {
        "uplink_payload_per_client_round": mean([s["uplink_payload_per_client_round"] for s in seeds]),
        "downlink_payload_per_client_round": mean([s["downlink_payload_per_client_round"] for s in seeds]),
        "train_state_bytes": max((s["train_state_bytes"] for s in seeds), default=0),
        "seconds": mean([s["seconds"] for s in seeds]),
    }


# What two benches must share for their seeds of a method to be pooled: everything that makes
# one seed's run, but the seed (and the lr and knobs, checked per method).
POOLED_SETTINGS = ("metric", "data_source", "clients", "alpha", "clients_per_round", "train_rows", "val_rows",
                   "eval_rows", "model", "task", "max_length", "batch_size", "rounds", "runner", "optimizer")


def pool(report: dict, source: dict, methods: list[str] | None = None) -> dict:
    """``report`` with the seeds of ``source`` pooled in: a bench of the same settings run
    earlier, e.g. the grid's block whose seeds a follow-up extends. A method both ran must be
    the same configuration (lr, knobs where both record them, gradient+optimizer bytes) on
    disjoint seeds; ``source``'s other methods (``methods``: those to bring) join as they are.
    Differences and answers are taken again over the pooled seeds. ValueError names what differs."""
    for key in POOLED_SETTINGS:
        if report.get(key) != source.get(key):
            raise ValueError(f"cannot pool: {key} differs ({report.get(key)!r} against {source.get(key)!r})")
    missing = sorted(set(methods or ()) - set(source["results"]))
    if missing:
        raise ValueError(f"cannot pool: the source has no method {', '.join(missing)}")
    results = {tag: {**e, "seeds": dict(e["seeds"])} for tag, e in report["results"].items()}
    for tag, theirs in source["results"].items():
        if methods is not None and tag not in methods:
            continue
        mine = results.setdefault(tag, {**theirs, "seeds": {}})
        if mine["seeds"]:
            _same_method(tag, mine, theirs)
        overlap = sorted({int(s) for s in mine["seeds"]} & {int(s) for s in theirs["seeds"]})
        if overlap:
            raise ValueError(f"cannot pool {tag}: both ran seeds {overlap}")
        seeds = {str(s): v for s, v in (*theirs["seeds"].items(), *mine["seeds"].items())}
        mine["seeds"] = dict(sorted(seeds.items(), key=lambda kv: int(kv[0])))
        mine["aggregate"] = aggregate(mine)
    pooled = {**report, "results": results,
              "seeds": sorted({int(s) for e in results.values() for s in e["seeds"]}),
              "pooled_seeds": {tag: [int(s) for s in e["seeds"]] for tag, e in results.items()}}
    pooled["differences"] = differences(results, report["metric"])
    pooled["answers"] = answers(results, pooled["differences"], report["metric"])
    return pooled


def _same_method(tag: str, mine: dict, theirs: dict) -> None:
    if mine["lr"] != theirs["lr"]:
        raise ValueError(f"cannot pool {tag}: lr {mine['lr']:g} against {theirs['lr']:g}")
    if "knobs" in mine and "knobs" in theirs and mine["knobs"] != theirs["knobs"]:
        raise ValueError(f"cannot pool {tag}: knobs {mine['knobs']} against {theirs['knobs']}")
    # reports written before they recorded knobs: a changed set of trainables shows in the state
    state = {s["train_state_bytes"] for e in (mine, theirs) for s in e["seeds"].values()}
    if len(state) > 1:
        raise ValueError(f"cannot pool {tag}: gradient+optimizer bytes differ ({sorted(state)}): "
                         "not the same configuration")


def points(metric: str) -> float:
    """Scale at which differences are read: points (x100) for scores in [0, 1] or [-1, 1]."""
    return 1.0 if not higher_is_better(metric) else 100.0


def differences(results: dict[str, dict], metric: str, key: str = "final") -> dict[str, dict]:
    """For every method, its paired difference (per seed, in points) to each present peer."""
    scale = points(metric)
    out: dict[str, dict] = {}
    for name, entry in results.items():
        mine = {int(s): v[key] * scale if v[key] is not None else None for s, v in entry["seeds"].items()}
        for peer in (*PEERS, "ffa-lora"):
            if peer in results and peer != name:
                theirs = {int(s): v[key] * scale if v[key] is not None else None
                          for s, v in results[peer]["seeds"].items()}
                out.setdefault(name, {})[peer] = paired_interval(mine, theirs)
    return out


def _same_scores(a: dict, b: dict) -> str | None:
    """Why two methods' runs (seed -> summary) say nothing of each other, or None: both scored
    the same on every seed they share (a zero-width interval that would read as "yes"); for a
    classifier that learned nothing, each seed's majority-class rate."""
    seeds = sorted(set(a) & set(b))
    if not seeds or any(a[s]["final"] != b[s]["final"] for s in seeds):
        return None
    finals = sorted({a[s]["final"] for s in seeds})
    return (f"every run of both scored {finals[0]}" if len(finals) == 1
            else f"both scored the same on every seed ({', '.join(f'{v:g}' for v in finals)})")


def answers(results: dict[str, dict], diffs: dict[str, dict], metric: str) -> list[dict]:
    """The questions the bench exists to answer, each with its interval and a verdict: the
    interval above the threshold (yes), below it (no), or across it (inconclusive); "no
    signal" where both methods scored the same on every seed (a task neither learned)."""
    out = []
    sign = 1.0 if higher_is_better(metric) else -1.0  # for a loss, "at least as good" is lower

    def ask(question: str, method: str, b: str, threshold: float) -> None:
        # the method's own row and every labelled variant of it (e.g. fedkrso-r16), named as such
        for a in [t for t, e in results.items() if (e.get("base_method") or t) == method]:
            interval = diffs.get(a, {}).get(b)
            if interval is None:
                continue
            asked = question if a == method else question.replace(" ", f" ({a}) ", 1)
            note = _same_scores(results[a]["seeds"], results[b]["seeds"])
            if note:  # e.g. every run at its seed's majority class: nothing to compare
                out.append({"question": asked, "interval": interval, "verdict": "no signal", "note": note})
                continue
            oriented = {k: (sign * v if isinstance(v, float) else v) for k, v in interval.items()}
            if sign < 0:
                oriented["low"], oriented["high"] = oriented["high"], oriented["low"]
            out.append({"question": asked, "interval": interval, "verdict": verdict(oriented, threshold)})

    ask("FedKRSO within 1.0 point of FedAvg (full fine-tuning)", "fedkrso", "fedavg", -1.0)
    ask("FedKRSO at least as good as FedIT", "fedkrso", "fedit", 0.0)
    ask("FedKRSO at least as good as FFA-LoRA", "fedkrso", "ffa-lora", 0.0)
    ask("FedTT+ within 1 point of FedIT", "fedtt+", "fedit", -1.0)
    for tag in [t for t, e in results.items() if (e.get("base_method") or t) == "fedtt+"] if "fedit" in results else []:
        a = results[tag]["aggregate"]["uplink_payload_per_client_round"]
        b = results["fedit"]["aggregate"]["uplink_payload_per_client_round"]
        if a and b:
            name = "FedTT+" if tag == "fedtt+" else f"FedTT+ ({tag})"
            out.append({"question": f"{name} uploads at least 5x fewer bytes than FedIT",
                        "ratio": b / a, "verdict": "yes" if b / a >= 5 else "no"})
    return out


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def fmt_stat(stat: dict, scale: float) -> str:
    if stat.get("mean") is None:
        return "n/a"
    return f"{scale * stat['mean']:.2f} ± {scale * stat['std']:.2f}"


def fmt_interval(interval: dict | None) -> str:
    if not interval or interval.get("mean") is None:
        return "n/a"
    if interval.get("low") is None:
        return f"{interval['mean']:+.2f} (1 seed)"
    return f"{interval['mean']:+.2f} [{interval['low']:+.2f}, {interval['high']:+.2f}]"


def render_answers(report: dict) -> list[str]:
    """The report's answers, one markdown line each: verdict, question, interval or ratio."""
    lines = []
    for a in report["answers"]:
        detail = fmt_interval(a.get("interval")) if "interval" in a else f"{a['ratio']:.1f}x"
        note = f"; {a['note']}" if a.get("note") else ""
        lines.append(f"- **{a['verdict']}**: {a['question']} ({detail}{note})")
    return lines


def render_table(report: dict) -> list[str]:
    """The results table of one bench report (markdown lines)."""
    metric, scale = report["metric"], points(report["metric"])
    peers = [p for p in PEERS if p in report["results"]]
    head = (["method", "lr", f"final {metric}", f"best {metric}", f"last-3 {metric}"]
            + [f"Δ final vs {p} [95% CI]" for p in peers]
            + ["uplink/client/round", "grad+opt state", "s per run"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, entry in report["results"].items():
        agg, diff = entry["aggregate"], report["differences"].get(name, {})
        cells = [name, f"{entry['lr']:g}", fmt_stat(agg["final"], scale), fmt_stat(agg["best"], scale),
                 fmt_stat(agg["last3"], scale)]
        cells += ["—" if p == name else fmt_interval(diff.get(p)) for p in peers]
        cells += [fmt_bytes(agg["uplink_payload_per_client_round"]), fmt_bytes(agg["train_state_bytes"]),
                  f"{agg['seconds']:.0f}" if agg["seconds"] else "n/a"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def render(report: dict) -> str:
    metric, scale = report["metric"], points(report["metric"])
    lines = [f"# Benchmark `{report['name']}`", "",
             f"Command: `{report['command']}`  ", f"Runtime: {report['runtime_s']:.0f} s  ",
             f"Data: {report['data_source']}, {report['clients']} clients ("
             + ("IID" if report["alpha"] is None else f"Dirichlet alpha {report['alpha']}")
             + f"), {report['clients_per_round']} per round, {report['train_rows']} training rows, "
             f"{report['val_rows']} validation rows (lr selection), {report['eval_rows']} eval rows (reported)  ",
             f"Model: {report['model']} ({report['task']}, max_length {report['max_length']}), batch "
             f"{report['batch_size']}, {report['rounds']} rounds, seeds {report['seeds']} "
             f"(run and partition seed), runner: {report['runner']}  ",
             f"Metric: {metric} ({'x100, ' if scale == 100 else ''}mean ± std over seeds); Δ: paired "
             "difference per seed, mean and 95% t-interval", ""]
    lines += render_table(report)
    if report["answers"]:
        lines += ["", "## Answers", ""] + render_answers(report)
    lines += ["", "## Learning-rate selection (validation split)", "",
              f"| method | lr | seeds | score ({report['select_by']} {metric}) | chosen |", "|---|---|---|---|---|"]
    for s in report["sweep"]:
        score = "n/a" if s["score"] is None else f"{scale * s['score']:.2f}"
        lines.append(f"| {s['method']} | {s['lr']:g} | {s['seeds']} | {score} | {'yes' if s['chosen'] else ''} |")
    lines += ["", "## Notes", "",
              "- Bytes per client per round: payload (tensor bytes) means over rounds of the server's per-round "
              "means over the clients it aggregated. The plot's x axis is the cumulative payload, uplink plus "
              "downlink, of all clients.",
              "- *grad+opt state*: the largest gradient + optimizer-state bytes a client measured while training.",
              "- *s per run*: mean wall time of one reported run (all its rounds, clients and evaluations).",
              f"- Plot: `{report['plot']}` (mean over seeds, band: min to max).", ""]
    return "\n".join(lines)
