"""metrics.jsonl (one JSON object per round): the row of a closed round, its file, and the
end-of-run table."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import structlog

from ..common.accounting import Traffic, round_traffic
from .client_eval import combine as combine_client_eval
from .rounds import RoundState, Submission

log = structlog.get_logger("fedkrso.server")

COLUMNS = [
    ("round", "round", "{}"),
    ("clients", "num_clients", "{}"),
    ("up payload/client", "uplink_payload_bytes_per_client", "{:,.0f}"),
    ("up wire/client", "uplink_wire_bytes_per_client", "{:,.0f}"),
    ("down payload/client", "downlink_payload_bytes_per_client", "{:,.0f}"),
    ("down wire/client", "downlink_wire_bytes_per_client", "{:,.0f}"),
    ("wire eff", "wire_efficiency", "{:.4f}"),
    ("fedavg bytes", "fedavg_equivalent_bytes", "{:,.0f}"),
    ("train loss", "train_loss", "{:.4f}"),
    ("eval loss", "eval_loss", "{:.4f}"),
    ("eval acc", "eval_accuracy", "{:.4f}"),
    ("eval ppl", "eval_perplexity", "{:.2f}"),
    ("client loss", "client_eval_loss", "{:.4f}"),
    ("client acc", "client_eval_accuracy", "{:.4f}"),
    ("client ppl", "client_eval_perplexity", "{:.2f}"),
    ("secs", "round_seconds", "{:.1f}"),
]


def _client_figures(s: Submission) -> dict:
    figures = {"loss": s.loss}
    if s.eval_examples:  # its evaluation of W^round (client_eval.py)
        figures.update({f"eval_{k}": v for k, v in s.eval.items()}, eval_examples=s.eval_examples)
    return figures


def round_row(rs: RoundState, state_fingerprint: str, fedavg_bytes: int, private: bool = False,
              now: float | None = None) -> dict:
    """One metrics.jsonl object without the server's evaluation: traffic summed over the
    aggregated clients (``accounting.round_traffic``) and per client, losses, client figures,
    and the clients' own evaluation of W^round when they made one (``client_eval.combine``).

    ``private`` (any privacy mode): only what describes the round as a whole, the counts of
    clients and dropouts, the traffic sums, the round's time and the state fingerprint; no
    client is named and no client's own figure is written (docs/PRIVACY.md, "What each party
    can read"), so the file and the trackers it feeds can be shared with whoever may see the
    released model. ``now``: the run's clock (``clock.py``; default the host's)."""
    ids = sorted(rs.submissions)
    traffic = [rs.traffic.get(c, Traffic()) for c in ids]
    row = {
        "round": rs.round,
        "num_clients": len(ids),
        "num_dropped": len(rs.dropped),
        **round_traffic(traffic, fedavg_bytes),
        "round_seconds": (time.monotonic() if now is None else now) - rs.started,
        "state_fingerprint": state_fingerprint,
    }
    return row if private else {**row, **_client_fields(rs, ids, traffic)}


def _client_fields(rs: RoundState, ids: list[str], traffic: list[Traffic]) -> dict:
    """The row's fields that name clients or carry their own figures."""
    subs = [rs.submissions[c] for c in ids]
    samples = max(sum(s.num_samples for s in subs), 1)
    return {
        "clients": ids,
        "dropped": sorted(rs.dropped),
        "train_loss": sum(s.loss * s.num_samples for s in subs) / samples,
        "client_train_seconds": max((s.train_seconds for s in subs), default=0.0),
        "client_peak_rss_bytes": max((s.peak_rss_bytes for s in subs), default=0),
        "client_train_state_bytes": max((s.train_state_bytes for s in subs), default=0),
        "client_accelerator_peak_bytes": max((s.accelerator_peak_bytes for s in subs), default=0),
        **combine_client_eval(rs.round, subs),
        "per_client": {
            c: {"uplink_payload_bytes": t.up_payload, "uplink_wire_bytes": t.up_wire,
                "downlink_payload_bytes": t.down_payload, "downlink_wire_bytes": t.down_wire,
                "seeds_used": len(s.seeds_used), "accelerator_peak_bytes": s.accelerator_peak_bytes,
                "weight": s.weight, "update_norm": s.update_norm, **_client_figures(s)}
            for c, t, s in zip(ids, traffic, subs)
        },
    }


class MetricsWriter:
    """Appends one row per round. A resumed run appends to the rows already on disk, so a
    round's row is written at most once: ``write`` skips a round that is already there.

    A crash (power loss) can tear the last line of the file. Opening the file repairs it: an
    incomplete or unparsable last line is cut off (``metrics_repaired`` in the log), and the
    coordinator writes that round's row again from the state's manifest."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._repair()
        self.rounds = {r["round"] for r in self.rows()}

    def _repair(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        lines = data.split(b"\n")
        keep = len(data)
        tail = lines[-1]  # after the last newline: empty when the file ends cleanly
        if tail.strip():
            try:
                json.loads(tail)
            except ValueError:
                keep -= len(tail)
            else:  # a whole row that lost only its newline
                with self.path.open("ab") as f:
                    f.write(b"\n")
        elif len(lines) >= 2:
            try:
                json.loads(lines[-2])
            except ValueError:
                keep -= len(lines[-2]) + 1
        if keep < len(data):
            with self.path.open("r+b") as f:
                f.truncate(keep)
                f.flush()
                os.fsync(f.fileno())
            log.warning("metrics_repaired", path=str(self.path), cut_bytes=len(data) - keep)

    def has(self, round_id: int) -> bool:
        """Whether round ``round_id`` has a row already."""
        return round_id in self.rounds

    def write(self, row: dict) -> bool:
        """Append ``row``; False (and nothing written) when its round is already there."""
        if self.has(row["round"]):
            return False
        with self.path.open("a") as f:
            f.write(json.dumps(row, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.rounds.add(row["round"])
        return True

    def rows(self) -> list[dict]:
        """Every row written so far, in order."""
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


def _cell(row: dict, key: str, fmt: str) -> str:
    v = row.get(key)
    return "-" if v is None else fmt.format(v)


def format_table(rows: list[dict]) -> str:
    """A fixed-width table of the per-round metrics."""
    cols = [(h, k, f) for h, k, f in COLUMNS if any(k in r for r in rows)]
    cells = [[h for h, _, _ in cols]]
    cells += [[_cell(r, key, fmt) for _, key, fmt in cols] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    out = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


class RowPrinter:
    """``format_table``'s table one row at a time, for printing each round as it closes: the
    header comes with the first row, whose fields choose the columns and (with room to grow)
    their widths."""

    def __init__(self) -> None:
        self.cols: list[tuple[str, str, str]] = []
        self.widths: list[int] = []

    def lines(self, row: dict) -> list[str]:
        """The console lines for ``row``: the table's header before the first row, then the row's cells."""
        out = []
        if not self.cols:
            self.cols = [(h, k, f) for h, k, f in COLUMNS if k in row]
            self.widths = [max(len(h), len(_cell(row, k, f)) + 2) for h, k, f in self.cols]
            out.append("  ".join(h.rjust(w) for (h, _, _), w in zip(self.cols, self.widths)))
            out.append("  ".join("-" * w for w in self.widths))
        out.append("  ".join(_cell(row, k, f).rjust(w) for (_, k, f), w in zip(self.cols, self.widths)))
        return out
