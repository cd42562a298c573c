"""Aggregators (common/aggregate.py): clipping, trimmed mean, streaming = batch mean, and the
state an open round persists across a server restart (server/state.py)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from fedkrso.common.aggregate import (StreamingAggregator, TrimmedMeanAggregator, aggregator_from_state,
                                      build_aggregator, clip_update)
from fedkrso.server.state import read_tensors, write_tensors


def updates(n: int, seed: int = 0) -> list[tuple[dict[str, torch.Tensor], float]]:
    g = torch.Generator().manual_seed(seed)
    return [({"a": torch.randn(4, 3, generator=g), "b": torch.randn(5, generator=g)}, float(i + 1))
            for i in range(n)]


def norm(tensors: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(t.double().square().sum()) for t in tensors.values()))


def test_clipping_scales_exactly():
    t = {"a": torch.full((4,), 3.0), "b": torch.full((9,), 4.0 / 3.0)}  # norm sqrt(36 + 16) ~ 7.2
    clipped = clip_update(t, 2.0)
    assert norm(clipped) == pytest.approx(2.0, rel=1e-12)
    scale = 2.0 / norm(t)
    for name in t:
        assert torch.allclose(clipped[name], t[name].double() * scale, rtol=0, atol=1e-15)
    assert clip_update(t, 100.0) is t  # within the bound: untouched
    agg = StreamingAggregator(clip_norm=2.0)
    agg.add(t, 5.0)
    for name in t:  # one client: the mean is its clipped update, whatever its weight
        assert torch.allclose(agg.result()[name], clipped[name].float())


def test_streaming_mean_equals_batch_mean_in_any_order():
    ups = updates(4)
    total = sum(w for _, w in ups)
    want = {n: sum(w * t[n].double() for t, w in ups) / total for n in ("a", "b")}
    results = []
    for order in itertools.permutations(ups):
        agg = StreamingAggregator()
        for t, w in order:
            agg.add(t, w)
        results.append(agg.result())
        for n in want:
            assert torch.allclose(results[-1][n].double(), want[n], rtol=1e-6, atol=1e-7)
    for r in results[1:]:  # float64 sums: bit-identical whatever the arrival order
        assert all(torch.equal(r[n], results[0][n]) for n in want)


def test_trimmed_mean_ignores_an_outlier_client():
    honest = [{"a": torch.full((3,), v)} for v in (1.0, 1.1, 0.9, 1.05, 0.95)]
    outlier = {"a": torch.full((3,), 1e6)}
    agg = TrimmedMeanAggregator(trim_fraction=0.2)
    for t in [*honest, outlier]:
        agg.add(t, 1000.0 if t is outlier else 1.0)  # weights are ignored
    got = agg.result()["a"]
    # 6 values, cut 1 at each end: drops 1e6 and 0.9, averages 0.95, 1.0, 1.05, 1.1
    assert torch.allclose(got, torch.full((3,), (0.95 + 1.0 + 1.05 + 1.1) / 4))
    plain = StreamingAggregator()
    for t in [*honest, outlier]:
        plain.add(t, 1.0)
    assert plain.result()["a"][0] > 1e5  # what the trimmed mean protects against


def test_trimmed_mean_of_few_updates_keeps_the_median():
    agg = TrimmedMeanAggregator(trim_fraction=0.49)
    for v in (0.0, 5.0, 100.0):
        agg.add({"a": torch.tensor([v])}, 1.0)
    assert agg.result()["a"].item() == 5.0


@pytest.mark.parametrize("kind,clip", [("mean", None), ("mean", 1.5), ("trimmed-mean", None), ("trimmed-mean", 1.5)])
def test_state_round_trips_through_save_and_load(tmp_path, kind, clip):
    ups = updates(5, seed=1)
    whole = build_aggregator(kind, clip, 0.2)
    for t, w in ups:
        whole.add(t, w)
    half = build_aggregator(kind, clip, 0.2)
    for t, w in ups[:3]:
        half.add(t, w)
    tensors, meta = half.state()
    write_tensors(tmp_path / "agg.safetensors", tensors)
    restored = aggregator_from_state(read_tensors(tmp_path / "agg.safetensors"), meta)
    assert type(restored) is type(half) and restored.count == 3
    for t, w in ups[3:]:
        restored.add(t, w)
    want, got = whole.result(), restored.result()
    assert sorted(want) == sorted(got)
    assert all(torch.equal(want[n], got[n]) for n in want)  # bit for bit, as if never interrupted
