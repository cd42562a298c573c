"""The round port (``server/port.py``) driven directly, without gRPC, and the deadline policy
(``server/deadlines.py``) on a fake clock.

A real ``Coordinator`` on the tiny BERT, real participants (``common.participant``) training on
its model as the simulator's do, and a ``FakeClock`` that the test moves on by hand: a round's
deadline passes in a millisecond, and every wait is for the code under test, never for time.
The real-process deadline test (a client killed mid-round, the round closing on its quorum at a
real deadline) stays in test_reliability.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import round_config
from fedkrso.common.accounting import message_bytes, payload_bytes, seeds_bytes
from fedkrso.common.config import parse_config
from fedkrso.common.data import load_split
from fedkrso.common.participant import Participant
from fedkrso.server.clock import FakeClock
from fedkrso.server.coordinator import Coordinator
from fedkrso.server.deadlines import DeadlinePolicy
from fedkrso.server.port import RoundError, RoundPort
from fedkrso.server.rounds import RoundState
from method_cases import CASES, small


async def until(predicate: Callable[[], object], what: str, timeout: float = 60.0) -> None:
    """Let the event loop run until ``predicate`` holds (real time bounds only a hang)."""
    loop = asyncio.get_running_loop()
    give_up = loop.time() + timeout
    while not predicate():
        assert loop.time() < give_up, f"timed out waiting for {what}"
        await asyncio.sleep(0.002)


class Run:
    """A port over a real coordinator on a fake clock, with participants on the shards."""

    def __init__(self, tiny_bert: Path, shards: Path, out: Path, **sections: dict):
        self.clock = FakeClock()
        self.cfg = parse_config(round_config(tiny_bert, out, **sections))
        self.port = RoundPort(Coordinator(self.cfg, fresh=True, clock=self.clock))
        shared = self.port.shared
        self.parts = {f"shard{i}": Participant(self.cfg, f"shard{i}", load_split(shards / f"shard{i}"), shared)
                      for i in range(3)}

    @property
    def rs(self) -> RoundState | None:
        return self.port.coord.current

    async def join(self, name: str) -> None:
        await self.port.join(name, name, self.parts[name].num_samples)
        self.port.touch(name, polling=True)

    async def download(self, name: str) -> list:
        """The client's assignment stream, as a transport would send it; the messages."""
        p = self.parts[name]
        self.port.touch(name)  # heard from, as on every call of a transport
        task = self.port.assignment(name, p.have)
        assert task is not None and task.status == "train", task
        msgs = [m async for m in self.port.assignment_stream(name, task)]
        p.have = task.target_round  # participants share the coordinator's model: it is at the target
        self.tasks = getattr(self, "tasks", {})
        self.tasks[name] = task
        return msgs

    async def train_and_submit(self, name: str) -> tuple[bool, object]:
        p, task = self.parts[name], self.tasks[name]
        seeds = p.seeds(task.seeds)
        update = await asyncio.to_thread(p.train, task.round, seeds)
        msgs = list(update.requests(self.port.run_id, 0, self.cfg.server.max_chunk_bytes))
        folded = await self.port.submit(name, update.header(self.port.run_id, 0), update.tensors,
                                        sum(message_bytes(m) for m in msgs))
        return folded, update


@pytest.mark.parametrize("method", sorted(CASES))
def test_a_round_driven_through_the_port_without_grpc(tiny_bert, shards, tmp_path, method):
    """Join, the assignment stream with its bytes counted, submit (header record + tensors +
    message bytes), an idempotent resubmission and precise refusals: one round of every
    method, no socket."""
    run = Run(tiny_bert, shards, tmp_path / "out", method=small(method),
              rounds={"total": 1, "clients_per_round": 2, "min_clients": 2})

    async def scenario() -> dict:
        port = run.port
        for name in ("shard0", "shard1"):
            await run.join(name)
        loop = asyncio.create_task(port.run())
        assert await port.wait_pending(loop) == ["shard0", "shard1"]
        msgs = {name: await run.download(name) for name in ("shard0", "shard1")}
        traffic = run.rs.traffic["shard0"]
        assert traffic.down_message == sum(message_bytes(m) for m in msgs["shard0"]) > 0
        assert traffic.down_payload == seeds_bytes(len(run.tasks["shard0"].seeds))  # round 0: no delta to send
        folded, update = await run.train_and_submit("shard0")
        assert folded and run.rs.submissions["shard0"].digest == update.digest
        assert run.rs.traffic["shard0"].up_payload == payload_bytes(update.tensors)
        header = update.header(port.run_id, 0)
        assert await port.submit("shard0", header, update.tensors, 0) is False  # the same update: a duplicate
        header.update_digest = "0" * 64
        with pytest.raises(RoundError) as refused:
            port.admit("shard0", header)
        assert refused.value.code == "ALREADY_EXISTS"
        header.run_id = "another-run"
        with pytest.raises(RoundError) as refused:
            port.admit("shard1", header)
        assert refused.value.code == "FAILED_PRECONDITION"
        assert port.pending() == ["shard1"]
        folded, _ = await run.train_and_submit("shard1")
        assert folded
        await asyncio.wait_for(loop, 120)
        return port.rows()[-1]

    row = asyncio.run(scenario())
    assert row["round"] == 0 and row["clients"] == ["shard0", "shard1"] and row["dropped"] == []
    assert row["round_seconds"] >= 0 and run.port.finished


def test_a_silent_client_is_replaced_at_the_deadline_and_kept_when_nobody_can_replace_it(tiny_bert, shards,
                                                                                      tmp_path):
    """Past the deadline without quorum the silent client is swapped for a fresh live one (the
    longest unheard first) and the deadline extended; with nobody to swap in it is kept
    (dropping it would leave the round nobody to wait for). On a fake clock: no waiting."""
    run = Run(tiny_bert, shards, tmp_path / "out",
              rounds={"total": 1, "clients_per_round": 2, "min_clients": 2, "deadline_s": 60})

    async def scenario() -> dict:
        port = run.port
        for name in ("shard0", "shard1"):
            await run.join(name)
        loop = asyncio.create_task(port.run())
        await until(lambda: run.rs is not None, "round 0 to open")
        rs, first = run.rs, run.rs.deadline
        await run.download("shard0")  # shard0 is heard from; shard1 never polls again
        run.clock.advance(59.9)
        await asyncio.sleep(0.01)
        assert rs.deadline == first and rs.selected == {"shard0", "shard1"}  # not yet due
        run.clock.advance(0.2)
        await until(lambda: rs.deadline > first, "the deadline to pass and extend the round")
        assert rs.deadline == pytest.approx(run.clock.monotonic() + 60)
        assert rs.selected == {"shard0", "shard1"} and not rs.dropped  # nobody to replace them: both kept
        await run.join("shard2")
        second = rs.deadline
        run.clock.advance(60.1)
        await until(lambda: "shard2" in rs.selected, "shard2 to replace the silent client")
        assert rs.dropped == {"shard1"} and rs.selected == {"shard0", "shard2"} and rs.deadline > second
        with pytest.raises(RoundError) as refused:  # the dropped client's late update
            run.tasks["shard1"] = run.tasks["shard0"]
            await run.train_and_submit("shard1")
        assert refused.value.code == "FAILED_PRECONDITION"
        await run.download("shard2")
        for name in ("shard0", "shard2"):
            assert (await run.train_and_submit(name))[0]
        await asyncio.wait_for(loop, 120)
        return port.rows()[-1]

    row = asyncio.run(scenario())
    assert row["clients"] == ["shard0", "shard2"] and row["dropped"] == ["shard1"]


def test_a_round_closes_on_its_quorum_at_the_deadline(tiny_bert, shards, tmp_path):
    """Two of three selected clients submit; at the deadline the round closes with them, the
    silent one recorded as dropped. Before the deadline it waits for all three."""
    run = Run(tiny_bert, shards, tmp_path / "out",
              rounds={"total": 1, "clients_per_round": 3, "min_clients": 2, "deadline_s": 30})

    async def scenario() -> dict:
        port = run.port
        for name in run.parts:
            await run.join(name)
        loop = asyncio.create_task(port.run())
        await until(lambda: run.rs is not None, "round 0 to open")
        rs = run.rs
        for name in ("shard0", "shard1"):
            await run.download(name)
            assert (await run.train_and_submit(name))[0]
        run.clock.advance(29.0)
        await asyncio.sleep(0.01)
        assert not loop.done() and not rs.closing  # a quorum, but not yet the deadline
        run.clock.advance(1.5)
        await asyncio.wait_for(loop, 120)
        return port.rows()[-1]

    row = asyncio.run(scenario())
    assert row["clients"] == ["shard0", "shard1"] and row["dropped"] == ["shard2"]


def test_the_deadline_policy_on_a_fake_clock(tiny_bert, tmp_path):
    """The policy alone: its verdicts, a restored round's grace, a disabled policy never due."""
    cfg = parse_config(round_config(tiny_bert, tmp_path, rounds={"clients_per_round": 3, "min_clients": 2,
                                                                  "deadline_s": 10, "resume_grace_s": 45}))
    clock = FakeClock()
    policy = DeadlinePolicy(cfg.rounds, clock)
    rs = RoundState(0, [1], "p", {"a", "b", "c"}, policy.deadline())
    assert policy.verdict(rs) == "wait" and policy.next_check_s(rs) == 1.0
    clock.advance(10)
    assert policy.verdict(rs) == "short" and policy.room(rs) == 3
    rs.submissions.update({"a": None, "b": None})
    assert policy.verdict(rs) == "quorum" and policy.silent(rs) == {"c"}
    assert DeadlinePolicy(cfg.rounds, clock, enabled=False).verdict(rs) == "wait"
    rs.submissions["c"] = None
    assert policy.verdict(rs) == "complete"
    assert policy.replace(rs, ["c", "b"], ["d"]) == ["c"] and rs.selected == {"a", "b", "d"}
    assert rs.dropped == {"c"} and rs.deadline == clock.monotonic() + 10
    assert policy.resumed(5.0) == clock.monotonic() + 45 and policy.resumed(100.0) == clock.monotonic() + 100


def test_a_fake_clock_ends_waits_in_due_order_and_only_when_moved():
    async def scenario() -> list:
        clock, ended = FakeClock(), []

        async def waiter(name: str, timeout: float) -> None:
            ended.append((name, await clock.wait(asyncio.Event().wait(), timeout)))

        tasks = [asyncio.create_task(waiter(n, t)) for n, t in (("late", 5.0), ("soon", 1.0))]
        await asyncio.sleep(0.01)
        assert ended == []  # real time passes, the fake clock does not
        clock.advance(1.0)
        await asyncio.sleep(0.01)
        assert ended == [("soon", False)]
        clock.advance(10.0)
        await asyncio.gather(*tasks)
        done = asyncio.Event()
        done.set()
        ended.append(("set", await clock.wait(done.wait(), 1.0)))
        return ended

    assert asyncio.run(scenario()) == [("soon", False), ("late", False), ("set", True)]
