"""From a run's metrics rows to the bench report: per-method summaries, the three targets,
and ``results.md``.

Everything here reads plain dicts (metrics.jsonl rows, results.json), never a model or a
process, so ``fedkrso-bench --report-only`` can rewrite a report without running anything.
"""

from __future__ import annotations

import math

SWEEP_KEYS = ("method", "lr", "rounds", "final_accuracy", "final_eval_loss")


def cumulative_wire(rows: list[dict]) -> list[int]:
    acc, out = 0, []
    for r in rows:
        acc += (r.get("uplink_wire_bytes") or 0) + (r.get("downlink_wire_bytes") or 0)
        out.append(acc)
    return out


def score(rows: list[dict], causal: bool) -> float:
    """What the lr sweep maximises: final eval accuracy, or minus the final eval loss for a
    causal LM (which has no accuracy)."""
    if not rows:
        return -math.inf
    last = rows[-1]
    if causal:
        loss = last.get("eval_loss")
        return -loss if loss is not None and math.isfinite(loss) else -math.inf
    acc = last.get("eval_accuracy")
    return acc if acc is not None else -math.inf


def mean(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def summarise(name: str, lr: float | None, rows: list[dict], state: dict, target: float | None) -> dict:
    """One results row from a run's metrics rows; ``state`` is the method's analytic entry
    (trainable parameters, state bytes, local steps), used where the clients measured none."""
    accs = [r.get("eval_accuracy") for r in rows]
    cum = cumulative_wire(rows)
    to_target = None
    if target is not None:
        for a, c in zip(accs, cum):
            if a is not None and a >= target:
                to_target = c
                break
    measured_state = max((r.get("client_train_state_bytes") or 0 for r in rows), default=0)
    steps = state.get("local_steps") or 1
    step_s = mean([r.get("client_train_seconds") for r in rows])
    last = rows[-1] if rows else {}
    return {
        "method": name, "lr": lr, "rounds": len(rows),
        "final_accuracy": accs[-1] if accs else None,
        "best_accuracy": max((a for a in accs if a is not None), default=None),
        "final_eval_loss": last.get("eval_loss"),
        "final_perplexity": math.exp(last["eval_loss"]) if last.get("eval_loss") is not None
        and last["eval_loss"] < 50 else None,
        "uplink_payload_per_client_round": mean([r.get("uplink_payload_bytes_per_client") for r in rows]),
        "uplink_wire_per_client_round": mean([r.get("uplink_wire_bytes_per_client") for r in rows]),
        "downlink_payload_per_client_round": mean([r.get("downlink_payload_bytes_per_client") for r in rows]),
        "downlink_wire_per_client_round": mean([r.get("downlink_wire_bytes_per_client") for r in rows]),
        "total_wire_bytes": cum[-1] if cum else 0,
        "wire_bytes_to_target": to_target,
        "client_peak_rss_bytes": max((r.get("client_peak_rss_bytes") or 0 for r in rows), default=0),
        "client_accelerator_peak_bytes": max((r.get("client_accelerator_peak_bytes") or 0 for r in rows),
                                             default=0),
        "train_state_bytes": measured_state or state.get("state_bytes"),
        "train_state_source": "measured" if measured_state else "analytic",
        "trainable_parameters": state.get("trainable_parameters"),
        "local_steps": steps,
        "mean_step_seconds": step_s / steps if step_s is not None else None,
        "mean_round_seconds": mean([r.get("round_seconds") for r in rows]),
        "curve": [{"round": r["round"], "eval_accuracy": r.get("eval_accuracy"),
                   "eval_loss": r.get("eval_loss"), "cumulative_wire_bytes": c}
                  for r, c in zip(rows, cum)],
    }


def sweep_entry(summary: dict, chosen: bool) -> dict:
    """A row of the learning-rate sweep table."""
    return {k: summary[k] for k in SWEEP_KEYS} | {"chosen": chosen}


def targets(summaries: dict[str, dict]) -> list[dict]:
    """The three targets for every FedKRSO row (default and labelled variants), computed from
    the measured summaries (pass None: a method is missing)."""
    a, f = summaries.get("fedavg"), summaries.get("fedit")
    rows = [dict(s, method=key) for key, s in summaries.items()
            if s.get("base_method", key) == "fedkrso"] or [None]
    out = []

    def acc_pt(s):
        return None if s is None or s.get("final_accuracy") is None else 100 * s["final_accuracy"]

    for k in rows:
        who = "FedKRSO" if k is None or k["method"] == "fedkrso" else f"FedKRSO ({k['method']})"
        ka, aa, fa = acc_pt(k), acc_pt(a), acc_pt(f)
        if ka is not None and aa is not None and fa is not None:
            ok = ka >= aa - 1.0 and ka >= fa
            detail = (f"{who} {ka:.2f} vs FedAvg {aa:.2f} (diff {ka - aa:+.2f} pt) and FedIT {fa:.2f} "
                      f"after {k['rounds']}/{a['rounds']}/{f['rounds']} rounds")
        else:
            ok, detail = None, "needs fedkrso, fedavg and fedit results"
        out.append({"target": f"{who} final accuracy within 1.0 pt of FedAvg and not below FedIT",
                    "pass": ok, "detail": detail})
        name = f"{who} uplink >= 30x smaller than FedAvg (float32)"
        if k and a and k.get("uplink_payload_per_client_round") and a.get("uplink_payload_per_client_round"):
            ratio = a["uplink_payload_per_client_round"] / k["uplink_payload_per_client_round"]
            wratio = (a["uplink_wire_per_client_round"] or 0) / (k["uplink_wire_per_client_round"] or 1)
            out.append({"target": name, "pass": ratio >= 30,
                        "detail": f"payload ratio {ratio:.1f}x (wire {wratio:.1f}x)"})
        else:
            out.append({"target": name, "pass": None, "detail": "needs fedkrso and fedavg results"})
        name = f"{who} gradient+optimizer state <= 5% of FedAvg"
        if k and a and k.get("train_state_bytes") and a.get("train_state_bytes"):
            share = k["train_state_bytes"] / a["train_state_bytes"]
            out.append({"target": name, "pass": share <= 0.05,
                        "detail": f"{share * 100:.2f}% ({k['train_state_source']} {fmt_bytes(k['train_state_bytes'])}"
                                  f" vs {a['train_state_source']} {fmt_bytes(a['train_state_bytes'])})"})
        else:
            out.append({"target": name, "pass": None, "detail": "needs fedkrso and fedavg results"})
    return out


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def fmt_acc(a: float | None) -> str:
    return "n/a" if a is None else f"{100 * a:.2f}"


def last_mean_accuracy(summary: dict, n: int = 3) -> float | None:
    """Mean eval accuracy of the last ``n`` rounds: under strong label skew the global model
    swings from round to round, and one final value says less than this."""
    return mean([c["eval_accuracy"] for c in summary["curve"][-n:]])


def render(report: dict) -> str:
    causal = report["causal"]
    target = report.get("target_accuracy")
    lines = [f"# Benchmark `{report['name']}`", "",
             f"Command: `{report['command']}`  ", f"Runtime: {report['runtime_s']:.0f} s  ",
             f"Data: {report['data_source']}, {report['clients']} clients (Dirichlet alpha "
             f"{report['alpha']}), {report['clients_per_round']} per round, "
             f"{report['train_rows']} training rows, {report['eval_rows']} eval rows  ",
             f"Model: {report['model']} ({report['task']}, max_length {report['max_length']}), "
             f"batch {report['batch_size']}, {report['rounds']} rounds (sweep: {report['sweep_rounds']})",
             ""]
    lines.append("| method | lr | rounds | " + ("final eval loss | final ppl" if causal else
                 "final acc | best acc | last-3 mean acc") + " | up payload/client/round | up wire | down payload/client/round"
                 " | down wire | wire bytes to " + (f"acc {fmt_acc(target)}" if target else "target")
                 + " | client peak RSS | grad+opt state | mean local step |")
    lines.append("|" + "---|" * (13 if causal else 14))
    for s in report["results"]:
        quality = ((f"{s['final_eval_loss']:.4f} | {s['final_perplexity']:.2f}" if s["final_perplexity"]
                    else "n/a | n/a") if causal else f"{fmt_acc(s['final_accuracy'])} | {fmt_acc(s['best_accuracy'])} | "
                   f"{fmt_acc(last_mean_accuracy(s))}")
        reach = ("n/a" if target is None else
                 fmt_bytes(s["wire_bytes_to_target"]) if s["wire_bytes_to_target"] is not None else "not reached")
        step = "n/a" if s["mean_step_seconds"] is None else f"{1000 * s['mean_step_seconds']:.0f} ms"
        lines.append(
            f"| {s['method']} | {s['lr']:g} | {s['rounds']} | {quality} | "
            f"{fmt_bytes(s['uplink_payload_per_client_round'])} | {fmt_bytes(s['uplink_wire_per_client_round'])} | "
            f"{fmt_bytes(s['downlink_payload_per_client_round'])} | {fmt_bytes(s['downlink_wire_per_client_round'])} | "
            f"{reach} | {fmt_bytes(s['client_peak_rss_bytes'])} | "
            f"{fmt_bytes(s['train_state_bytes'])} ({s['train_state_source']}) | {step} |")
    lines += ["", "## Targets", ""]
    for t in report["targets"]:
        mark = {True: "PASS", False: "FAIL", None: "n/a"}[t["pass"]]
        lines.append(f"- **{mark}** {t['target']}: {t['detail']}")
    lines += ["", "## Learning-rate sweep", "",
              "| method | lr | rounds | final " + ("eval loss" if causal else "acc") + " | chosen |",
              "|---|---|---|---|---|"]
    for s in report["sweep"]:
        val = (f"{s['final_eval_loss']:.4f}" if s["final_eval_loss"] is not None else "n/a") if causal \
            else fmt_acc(s["final_accuracy"])
        lines.append(f"| {s['method']} | {s['lr']:g} | {s['rounds']} | {val} | {'yes' if s['chosen'] else ''} |")
    lines += ["", "## Notes", "",
              "- Bytes per client per round are means over rounds of the server's per-round means over the "
              "clients it aggregated; *payload* is the tensor bytes, *wire* the TCP bytes counted on the "
              "loopback connection (gRPC framing, headers, control messages included).",
              "- *Wire bytes to target*: cumulative uplink + downlink wire bytes of all selected clients "
              "until the first round whose eval accuracy reaches the target.",
              "- *grad+opt state*: the client's own count when it reports one (measured); otherwise analytic: "
              "gradient + Adam exp_avg + exp_avg_sq = 3 x trainable parameters x 4 bytes, where FedKRSO's "
              "trainables are one subspace's B (r x sum d_m over target Linears) plus the dense-trainables, "
              "the LoRA/TT methods' their adapters plus dense-trainables, FedAvg every trained weight, and "
              "FedKSeed 0 (zeroth order: no gradient, no optimizer state).",
              "- *Mean local step*: mean over rounds of the slowest selected client's training seconds "
              "divided by the method's local steps per round (includes data loading, interval ends).",
              "- *Client peak RSS*: the largest peak RSS any client reported (whole process: Python, torch, "
              "model, data).", f"- Plot: `{report['plot']}` (eval accuracy vs cumulative wire bytes, log x).",
              ""]
    return "\n".join(lines)
