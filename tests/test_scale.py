"""Many clients at once against one real server: the scale bench's pool (every client on its
own connection, as separate client processes are) through the relay, in ``make test``.

The regression this guards: the pool's gRPC channels shared one TCP connection (gRPC's global
subchannel pool), so past ``server.max_streams_per_connection`` long-polls the rest queued in
the pool and no round opened for a minute or more (docs/SCALE.md)."""

from __future__ import annotations

import pytest

from fedkrso.bench.scale import run_one

pytestmark = pytest.mark.slow

CLIENTS = 100
METHOD = {"name": "fedkrso", "k": 4, "rank": 4, "intervals": 2, "interval_steps": 2}


def test_a_hundred_concurrent_clients_are_all_in_two_rounds(tmp_path, tiny_bert):
    # a round of 100 synthetic updates closes in about 1.5 s on 2 cores; with the shared
    # connection the first round opened only after every client's 30 s poll had cycled
    r = run_one(CLIENTS, 2, tmp_path, tiny_bert, METHOD, timeout=120.0)
    assert r["rounds"] == 2 and r["all_clients_each_round"], r
    assert r["updates"] == 2 * CLIENTS
    assert r["pool_seconds"] < 40.0, r  # join, two rounds, leave: seconds, not minutes
    assert r["round_s_max"] < 20.0, r
