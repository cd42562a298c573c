"""A LLaMA-shaped model of about a billion parameters, built from a config (random weights,
nothing to download), and what the large-model measurements share: the model on disk, plain
text shards for a causal LM, a real federated run of it, and the closed-form memory and byte
figures the measurements are set against.

Used by ``bench/large.py`` (the CPU measurement of docs/BENCH.md) and ``bench/gpu_check.py``
(the prepared GPU measurement).
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from ..common.config import parse_config
from .launch import Cluster
from .scale import RssSampler

WORDS = ("the model of a federated client trains on its own text while the server keeps one copy of the "
         "weights and every party agrees on the state after each round of training").split()


@dataclass(frozen=True)
class Shape:
    """LLaMA dimensions; the defaults are TinyLlama-1.1B's (1,100,048,384 parameters)."""

    hidden: int = 2048
    layers: int = 22
    intermediate: int = 5632
    heads: int = 32
    kv_heads: int = 4
    vocab: int = 32000

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def projected(self) -> int:
        """Parameters of the block Linears FedKRSO projects (q, k, v, o, gate, up, down)."""
        kv = self.kv_heads * self.head_dim
        return self.layers * (2 * self.hidden * self.hidden + 2 * self.hidden * kv + 3 * self.hidden * self.intermediate)

    @property
    def sum_dm(self) -> int:
        """sum over projected matrices of d_m (output rows): FedKRSO's accumulator height."""
        kv = self.kv_heads * self.head_dim
        return self.layers * (2 * self.hidden + 2 * kv + 2 * self.intermediate + self.hidden)

    @property
    def norms(self) -> int:
        return (2 * self.layers + 1) * self.hidden

    @property
    def embeddings(self) -> int:
        """Token embedding plus the untied LM head."""
        return 2 * self.vocab * self.hidden

    @property
    def total(self) -> int:
        return self.projected + self.norms + self.embeddings

    def tiny(self) -> Shape:
        return Shape(hidden=64, layers=2, intermediate=172, heads=4, kv_heads=2, vocab=32000)

    def with_layers(self, layers: int) -> Shape:
        return Shape(self.hidden, layers, self.intermediate, self.heads, self.kv_heads, self.vocab)


def llama_model(out: Path, shape: Shape, seed: int = 0) -> Path:
    """The model of ``shape`` under ``out`` (bfloat16 safetensors, like hub checkpoints), built
    once: a folder that already holds a model of that shape is reused."""
    from ..common.models import build_llama

    marker = out / "shape.json"
    if marker.exists() and json.loads(marker.read_text()) == asdict(shape):
        return out
    build_llama(out, hidden=shape.hidden, layers=shape.layers, intermediate=shape.intermediate,
                heads=shape.heads, kv_heads=shape.kv_heads, vocab=shape.vocab, seed=seed,
                tokenizer=word_tokenizer())
    marker.write_text(json.dumps(asdict(shape)))
    return out


def word_tokenizer():
    """A word-level tokenizer of ``WORDS`` (one id per word, whitespace split), built here:
    the generated text needs no more, and the measurement needs no tokenizer package."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    special = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]
    vocab = {w: i for i, w in enumerate(special + sorted(set(WORDS)))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                   bos_token="[BOS]", eos_token="[EOS]")


def text_shards(out: Path, clients: int, rows: int = 64, words: int = 600, seed: int = 0) -> Path:
    """``clients`` shards (and an eval split) of plain text for a causal LM, written by the
    partitioner's own code from a generated csv: long enough rows for any sequence length
    up to ``words`` tokens."""
    from ..common.data import load_source, make_partition, save_partition

    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    src = out / "text.csv"
    src.write_text("text\n" + "".join(" ".join(rng.choice(WORDS) for _ in range(words)) + "\n"
                                      for _ in range(rows)))
    part = make_partition(load_source(f"csv:{src}"), clients, source="csv", alpha=None, seed=seed,
                          min_size=4, max_eval=4)
    save_partition(part, out / "data")
    return out / "data"


@dataclass
class RunResult:
    rows: list[dict]
    server_peak_rss: int  # the server process's VmHWM, sampled until it exited
    server_peak_anon: int  # its largest anonymous RSS seen (sampled: file-backed pages left out)
    placed: dict[str, dict]  # process name -> its model_placed log event
    seconds: float


def write_round_yaml(workdir: Path, model: Path, method: dict, *, clients: int, rounds: int, batch: int,
                     max_length: int, timeout: float = 3600.0) -> Path:
    """``<workdir>/round.yaml`` of a causal-LM run of ``model``: every client in every round, no
    evaluation, no checkpoint before the end."""
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = {
        "run": {"name": "large", "seed": 0, "output_dir": str(workdir / "out")},
        "model": {"name": str(model), "task": "causal-lm", "max_length": max_length},
        "method": method,
        "rounds": {"total": rounds, "clients_per_round": clients, "min_clients": clients,
                   "deadline_s": timeout, "start_timeout_s": timeout},
        "training": {"batch_size": batch},
        "server": {"listen": "127.0.0.1:0", "checkpoint_every": rounds + 1},
    }
    parse_config(cfg, "generated round.yaml")
    config = workdir / "round.yaml"
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return config


def federated_run(workdir: Path, model: Path, data: Path, method: dict, *, clients: int, rounds: int,
                  batch: int, max_length: int, server_args: list[str], client_args: list[str],
                  timeout: float = 3600.0) -> RunResult:
    """A real run: one ``fedkrso-server`` and ``clients`` ``fedkrso-client`` processes on
    loopback, every client in every round, no evaluation; every process must exit 0 and
    every client end at the server's final state fingerprint."""
    config = write_round_yaml(workdir, model, method, clients=clients, rounds=rounds, batch=batch,
                              max_length=max_length, timeout=timeout)
    cluster = Cluster(workdir)
    started = time.monotonic()
    try:
        cluster.start_server(config, ["--fresh", "--log-json", *server_args], timeout=timeout)
        sampler = RssSampler(cluster.server.popen.pid, every=0.2)
        sampler.start()
        for i in range(clients):
            cluster.start_client(data / f"shard{i}", f"shard{i}", ["--log-json", *client_args])
        code = cluster.wait(timeout)
        sampler.stop()
        if code != 0:
            raise RuntimeError(f"server exited {code}:\n{cluster.server.text()[-3000:]}")
        final = (workdir / "out" / "final_state_fingerprint.txt").read_text().strip()
        for c in cluster.clients:
            if c.wait(120) != 0:
                raise RuntimeError(f"{c.name} failed:\n{c.text()[-3000:]}")
            report = json.loads((workdir / f"{c.name}.json").read_text())
            if report["state_fingerprint"] != final:
                raise RuntimeError(f"{c.name} ended at another state than the server")
    finally:
        cluster.stop()
    rows = [json.loads(line) for line in (workdir / "out" / "metrics.jsonl").read_text().splitlines()]
    placed = {p.name: _event(p.text(), "model_placed") for p in [cluster.server, *cluster.clients]}
    return RunResult(rows, max(sampler.hwm, sampler.peak_rss), sampler.peak_anon, placed,
                     time.monotonic() - started)


def _event(text: str, name: str) -> dict:
    for line in text.splitlines():
        if line.startswith("{") and f'"{name}"' in line:
            event = json.loads(line)
            if event.get("event") == name:
                return event
    return {}


def write_report(out: Path, name: str, report: dict, render) -> None:
    """``<out>/<name>.json`` and ``<out>/<name>.md`` (``render(report)``), and the table printed."""
    (out / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / f"{name}.md").write_text(render(report))
    print(render(report))


# -- closed forms ----------------------------------------------------------------------------
def analytic(shape: Shape, k: int = 4, rank: int = 8, k_used: int = 1) -> dict[str, int]:
    """Bytes of the weights and training state each party holds, and of one round's payload,
    from the shape alone (activations and the Python/torch runtime not included).

    FedKRSO (common/precision.py): bfloat16 client = bfloat16 copies of every weight, float32
    host masters of the projected ones, float32 norms, one subspace's B with Adam (3 x 4 bytes),
    and a snapshot of the norms only; float32 client = float32 weights plus a snapshot of the
    projected weights and norms (training merges B P into them). Full fine-tuning with Adam =
    weights, gradients and two moments, all float32 (16 bytes per parameter); the FedAvg client
    adds its start copy and its snapshot (8 more); the FedAvg server holds the model, the
    float64 running sum (8) and the float32 mean (4), and assembles each update (4 + 4)."""
    p, pt, pn, pe = shape.total, shape.projected, shape.norms, shape.embeddings
    b_state = 3 * 4 * (rank * shape.sum_dm + pn)
    acc = rank * shape.sum_dm
    return {
        "parameters": p,
        "fedkrso_client_bf16": 2 * (pt + pe) + 4 * pt + 4 * pn + b_state + 4 * pn,
        "fedkrso_client_fp32": 4 * p + 4 * (pt + pn) + b_state,
        "fedkrso_server_fp32": 4 * p + 8 * k * acc + 8 * pn,
        "fft_arm_fp32": 16 * p,
        "fedavg_client_fp32": 24 * p,
        "fedavg_server_fp32": 4 * p + 8 * p + 4 * p + 8 * p,
        "fedkrso_uplink": 4 * (k_used * acc + pn),
        # a round's header seeds, then the previous round's delta: its seeds and the
        # accumulators of the seeds some client drew (here: k_used), plus the norms
        "fedkrso_downlink": 4 * (k_used * acc + pn) + 2 * 8 * k,
        "fedavg_uplink": 4 * p,
        "fedavg_downlink": 4 * p,
    }
