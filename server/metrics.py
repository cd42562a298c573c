"""metrics.jsonl (one JSON object per round) and the end-of-run table."""

from __future__ import annotations

import json
import os
from pathlib import Path

COLUMNS = [
    ("round", "round", "{}"),
    ("clients", "clients", "{}"),
    ("up payload/client", "uplink_payload_bytes_per_client", "{:,.0f}"),
    ("up wire/client", "uplink_wire_bytes_per_client", "{:,.0f}"),
    ("down payload/client", "downlink_payload_bytes_per_client", "{:,.0f}"),
    ("down wire/client", "downlink_wire_bytes_per_client", "{:,.0f}"),
    ("wire eff", "wire_efficiency", "{:.4f}"),
    ("fedavg bytes", "fedavg_equivalent_bytes", "{:,.0f}"),
    ("train loss", "train_loss", "{:.4f}"),
    ("eval loss", "eval_loss", "{:.4f}"),
    ("eval acc", "eval_accuracy", "{:.4f}"),
    ("secs", "round_seconds", "{:.1f}"),
]


class MetricsWriter:
    """Appends one row per round. A resumed run appends to the rows already on disk, so a
    round's row is written at most once: ``write`` skips a round that is already there."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.rounds = {r["round"] for r in self.rows()}

    def has(self, round_id: int) -> bool:
        return round_id in self.rounds

    def write(self, row: dict) -> None:
        if self.has(row["round"]):
            return
        with self.path.open("a") as f:
            f.write(json.dumps(row, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.rounds.add(row["round"])

    def rows(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


def format_table(rows: list[dict]) -> str:
    """A fixed-width table of the per-round metrics."""
    cols = [(h, k, f) for h, k, f in COLUMNS if any(k in r for r in rows)]
    cells = [[h for h, _, _ in cols]]
    for r in rows:
        line = []
        for _, key, fmt in cols:
            v = r.get(key)
            if key == "clients" and isinstance(v, list):
                v = len(v)
            line.append("-" if v is None else fmt.format(v))
        cells.append(line)
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    out = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)
