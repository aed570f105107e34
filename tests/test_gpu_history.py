"""History-aware escalation to hardware: the fault history per physical GPU across boots
(``collector.health.history``, pure) and ``gpu.rma`` from it in the health engine."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from collector.health import HealthEngine, HealthState, Observation, health_config_from
from collector.health.codec import state_from_dict
from collector.health.config import GpuThresholds
from collector.health.history import BoardHistory, FatalXid, FleetHistory, decide
from gpuwarden.servers import NatsServer
from shared.frames import EventFrame, GpuInfo, HostFacts, InventoryFrame, replace
from tests.support.frame_fixtures import xid_frame
from tests.support.health_dump import state_to_dict

T0 = 1_700_000_000.0
HOUR, DAY = 3600.0, 86400.0
CFG = GpuThresholds()


def board(*events: tuple[int, float, int]) -> BoardHistory:
    """A board with fatal XIDs ``(code, at, boot ordinal)``."""
    b = BoardHistory("S1", "S1", "GPU-1")
    b.fatal = [FatalXid(code, at, f"k{no}", no) for code, at, no in events]
    b.boots = [(f"k{no}", T0 - 1 + no) for no in sorted({no for _, _, no in events})]
    return b


# ----------------------------------------------------------------------------- decide (pure)


def test_the_same_fatal_xid_after_two_reboots_asks_for_rma_with_the_evidence() -> None:
    b = board((79, T0, 1), (79, T0 + DAY, 2), (79, T0 + 2 * DAY, 3))
    d = decide(b, T0 + 2 * DAY, CFG)
    assert d is not None
    assert (d.rule, d.code, d.reboots) == ("recurrence", 79, 2)
    assert [(e.code, e.at, e.boot) for e in d.evidence] == [
        (79, T0, "k1"),
        (79, T0 + DAY, "k2"),
        (79, T0 + 2 * DAY, "k3"),
    ]
    assert d.until == T0 + 2 * DAY + CFG.rma_history
    assert (
        d.summary(3, "S1")
        == "GPU 3 (board S1): fatal XID 79 recurred after 2 reboots: hardware inspection / RMA"
    )
    assert d.evidence_text() == (
        "XID 79 at 2023-11-14T22:13:20Z (boot k1, boot #1); "
        "XID 79 at 2023-11-15T22:13:20Z (boot k2, boot #2); "
        "XID 79 at 2023-11-16T22:13:20Z (boot k3, boot #3)"
    )


@pytest.mark.parametrize(
    ("events", "why"),
    [
        (((79, T0, 1), (79, T0 + DAY, 2)), "one reboot cured it so far"),
        (((79, T0, 1), (48, T0 + DAY, 2), (94, T0 + 2 * DAY, 3)), "different codes in each boot"),
        (((79, T0, 1), (79, T0 + 40 * DAY, 3)), "the first occurrence aged out of rma_history"),
        (
            ((79, T0, 1), (79, T0 + 1, 1), (48, T0 + 2, 1)),
            "two of one code, one of another within the window",
        ),
    ],
)
def test_no_rma(events: tuple[tuple[int, float, int], ...], why: str) -> None:
    assert decide(board(*events), max(e[1] for e in events), CFG) is None, why


def test_the_same_fatal_code_three_times_within_the_window_asks_for_rma() -> None:
    b = board((48, T0, 1), (48, T0 + HOUR, 1), (48, T0 + 5 * HOUR, 1))
    d = decide(b, T0 + 5 * HOUR, CFG)
    assert d is not None
    assert (d.rule, d.code, d.reboots, len(d.evidence)) == ("window", 48, 0, 3)
    assert d.until == T0 + CFG.rma_window  # until the oldest of the three leaves the window
    assert decide(b, T0 + CFG.rma_window + 1, CFG) is None


def test_thresholds_are_configurable() -> None:
    cfg = health_config_from(
        {"health": {"gpu": {"rma_reboots": 1, "rma_history": "7d", "rma_fatal_xids": 2, "rma_window": "1h"}}},
        env={},
    ).gpu
    d = decide(board((79, T0, 1), (79, T0 + DAY, 2)), T0 + DAY, cfg)
    assert d is not None
    assert (d.rule, d.reboots) == ("recurrence", 1)
    assert decide(board((79, T0, 1), (79, T0 + 8 * DAY, 2)), T0 + 8 * DAY, cfg) is None
    d = decide(board((48, T0, 1), (48, T0 + 60, 1)), T0 + 60, cfg)
    assert d is not None
    assert d.rule == "window"


# ----------------------------------------------------------------------------- FleetHistory (pure)


def gpus(serial: str | None = "S2") -> list[tuple[int, str, str | None]]:
    return [(0, "GPU-0", "S0"), (2, "GPU-2", serial)]


def test_boots_are_counted_from_kernel_boot_ids_and_agent_restarts_are_not_reboots() -> None:
    h = FleetHistory()
    h.inventory("n1", "p", "a1", "k1", gpus(), T0)
    b, d = h.fatal_xid("n1", "p", 2, "GPU-2", 79, T0 + 10, "a1", CFG)  # type: ignore[misc]
    assert (b.board, b.serial, b.boot_count, b.boots[-1][0], d) == ("S2", "S2", 1, "k1", None)
    h.inventory("n1", "p", "a2", "k1", gpus(), T0 + 20)  # the agent restarted, the host did not
    h.inventory("n1", "p", "a3", "k2", gpus(), T0 + 30)  # a reboot
    h.inventory("n1", "p", "a4", "k2", gpus(), T0 + 40)  # the agent again
    assert b.boot_count == 2
    _, d = h.fatal_xid("n1", "p", 2, "GPU-2", 79, T0 + 50, "a4", CFG)  # type: ignore[misc]
    assert d is None
    h.inventory("n1", "p", "a5", "k3", gpus(), T0 + 60)
    _, d = h.fatal_xid("n1", "p", 2, "GPU-2", 79, T0 + 70, "a5", CFG)  # type: ignore[misc]
    assert d is not None
    assert [e.boot for e in d.evidence] == ["k1", "k2", "k3"]
    # without a kernel boot id the agent's boot id is the boot
    h2 = FleetHistory()
    for i in range(3):
        h2.inventory("n2", "p", f"a{i}", None, gpus(), T0 + i)
        got = h2.fatal_xid("n2", "p", 2, "GPU-2", 79, T0 + i + 0.5, f"a{i}", CFG)
    assert got is not None
    assert got[1] is not None
    assert got[1].rule == "recurrence"


def test_an_event_before_its_boots_inventory_is_not_a_boot_of_its_own() -> None:
    h = FleetHistory()
    h.inventory("n1", "p", "a1", "k1", gpus(), T0)
    h.fatal_xid("n1", "p", 2, "GPU-2", 79, T0 + 1, "a1", CFG)
    h.fatal_xid("n1", "p", 2, "GPU-2", 79, T0 + 100, "a2", CFG)  # judged before a2's inventory
    h.inventory("n1", "p", "a2", "k1", gpus(), T0 + 101)  # a2 runs in the same kernel boot
    b = h.boards["S2"]
    assert b.boot_count == 1  # a2 was provisionally a boot of its own until its inventory said k1
    assert [(e.boot, e.boot_no) for e in b.fatal] == [("k1", 1), ("k1", 1)]
    h.inventory("n1", "p", "a3", "k2", gpus(), T0 + 200)  # a real reboot still counts
    assert b.boot_count == 2


def test_a_board_is_named_by_its_serial_follows_it_and_takes_its_serial_when_learnt() -> None:
    h = FleetHistory()
    h.fatal_xid("n1", "p", 2, "GPU-2", 79, T0, "a1", CFG)  # no inventory yet: the UUID names it
    assert list(h.boards) == ["GPU-2"]
    h.inventory("n1", "p", "a1", "k1", gpus(), T0 + 1)
    assert list(h.boards) == ["S2"]
    changed, gone = h.take_changes()
    assert [b.board for b in changed] == ["S2"]
    assert gone == [("GPU-2", T0)]  # (with the newest fatal XID it held)
    # the board moved to another host (same serial): its history came with it
    h.inventory("n9", "p", "b1", "k9", [(5, "GPU-2", "S2")], T0 + DAY)
    h.inventory("n9", "p", "b2", "k10", [(5, "GPU-2", "S2")], T0 + 2 * DAY)
    got = h.fatal_xid("n9", "p", 5, "GPU-2", 79, T0 + 2 * DAY, "b2", CFG)
    assert got is not None
    b, d = got
    assert (b.host, b.gpu, b.boot_count) == ("n9", 5, 3)
    assert d is not None
    assert d.reboots == 2


def test_a_redelivered_event_is_not_counted_twice_and_old_boards_are_forgotten() -> None:
    h = FleetHistory()
    for _ in range(3):
        h.fatal_xid("n1", "p", 2, "GPU-2", 79, T0, "a1", CFG)
    assert len(h.boards["GPU-2"].fatal) == 1
    h.take_changes()
    h.expire(T0 + CFG.rma_history - 1, CFG)
    assert "GPU-2" in h.boards
    h.expire(T0 + CFG.rma_history + 1, CFG)
    assert h.boards == {}
    assert h.take_changes() == ([], [("GPU-2", T0)])


def test_boards_round_trip() -> None:
    b = board((79, T0, 1), (48, T0 + 1, 2))
    assert BoardHistory.from_dict(json.loads(json.dumps(b.to_dict()))) == b


# ----------------------------------------------------------------------------- in the health engine


def inventory(boot: str, kernel: str | None, seq: int, ts: float, serial: str = "SN-7") -> InventoryFrame:
    return InventoryFrame(
        host="node-1",
        provider="acme",
        boot_id=boot,
        seq=seq,
        ts=ts,
        backend="nvml",
        gpus=(GpuInfo(index=0, uuid="GPU-a", serial="SN-0"), GpuInfo(index=1, uuid="GPU-b", serial=serial)),
        host_facts=HostFacts(hostname="node-1", kernel_boot_id=kernel),
    )


def xid(boot: str, seq: int, ts: float, code: int = 79) -> EventFrame:
    return xid_frame("node-1", seq, ts, "acme", boot, source="nvml", gpu_index=1, gpu_uuid="GPU-b", xid=code)


def rma(obs: list[Observation]) -> list[Observation]:
    return [o for o in obs if o.check == "gpu.rma"]


def engine() -> HealthEngine:
    # the count rule (3 fatal XIDs on a GPU in 24 h) out of the way: the history decides
    return HealthEngine(health_config_from({"health": {"gpu": {"rma_fatal_xids": 100}}}, env={}))


def test_a_fatal_xid_recurring_across_two_reboots_raises_one_gpu_rma_with_its_evidence() -> None:
    eng, state = engine(), HealthState()
    out: list[Observation] = []
    for n in range(3):  # boot n: inventory, then XID 79 on GPU 1; the host reboots in between
        t = T0 + n * DAY
        state, obs = eng.observe(state, inventory(f"a{n}", f"k{n}", 1, t), t)
        state, obs = eng.observe(state, xid(f"a{n}", 2, t + 60), t + 60)
        out += rma(obs)
    assert [(o.status, o.at) for o in out if o.status != "healthy"] == [("critical", T0 + 2 * DAY + 60)]
    o = out[-1]
    assert o.immediate
    assert o.labels["gpu"] == "1"
    assert o.labels["uuid"] == "GPU-b"
    assert o.summary == "GPU 1 (board SN-7): fatal XID 79 recurred after 2 reboots: hardware inspection / RMA"
    for k in ("k0", "k1", "k2"):
        assert f"boot {k}" in o.advice
    assert o.advice.count("XID 79 at ") == 3
    # it holds (the sample path keeps judging it) and clears when the evidence ages out
    state, obs = eng.tick(state, T0 + 10 * DAY)
    assert [x.status for x in rma(obs)] == ["critical"]
    state, obs = eng.tick(state, T0 + 2 * DAY + 60 + eng.config.gpu.rma_history + 1)
    assert [x.status for x in rma(obs)] == ["healthy"]


def test_agent_restarts_without_a_reboot_raise_no_gpu_rma() -> None:
    eng, state = engine(), HealthState()
    for n in range(4):
        t = T0 + n * DAY
        state, _ = eng.observe(state, inventory(f"a{n}", "k0", 1, t), t)
        state, obs = eng.observe(state, xid(f"a{n}", 2, t + 60), t + 60)
        assert [o for o in rma(obs) if o.status != "healthy"] == []
    assert state.history.boards["SN-7"].boot_count == 1


def test_a_swapped_board_starts_a_new_history() -> None:
    eng, state = engine(), HealthState()
    for n in range(2):
        t = T0 + n * DAY
        state, _ = eng.observe(state, inventory(f"a{n}", f"k{n}", 1, t), t)
        state, _ = eng.observe(state, xid(f"a{n}", 2, t + 60), t + 60)
    t = T0 + 2 * DAY  # the board was replaced (new serial and UUID): its predecessor's XIDs are not its own
    inv = inventory("a2", "k2", 1, t, serial="SN-NEW")
    inv = replace(inv, gpus=(inv.gpus[0], replace(inv.gpus[1], uuid="GPU-new")))
    state, _ = eng.observe(state, inv, t)
    state, obs = eng.observe(state, replace(xid("a2", 2, t + 60), gpu_uuid="GPU-new"), t + 60)
    assert [o for o in rma(obs) if o.status != "healthy"] == []
    assert state.history.boards["SN-NEW"].boot_count == 1
    assert state.history.boards["SN-7"].boot_count == 2


def test_an_xid_judged_before_its_inventory_is_decided_when_the_inventory_names_the_boot() -> None:
    """The fast event path can judge an XID before the inventory of its agent run: its boot is
    unknown (a reboot, or only an agent restart?). No RMA then; the inventory decides."""
    eng, state = engine(), HealthState()
    for n in range(2):
        t = T0 + n * DAY
        state, _ = eng.observe(state, inventory(f"a{n}", f"k{n}", 1, t), t)
        state, _ = eng.observe(state, xid(f"a{n}", 2, t + 60), t + 60)
    t = T0 + 2 * DAY
    state, obs = eng.observe(state, xid("a2", 2, t + 60), t + 60)  # before a2's inventory
    assert [o for o in rma(obs) if o.status != "healthy"] == []
    state, obs = eng.observe(state, inventory("a2", "k1", 1, t), t + 61)  # only the agent restarted
    assert [o for o in rma(obs) if o.status != "healthy"] == []
    state, obs = eng.observe(state, xid("a3", 2, t + 120), t + 120)
    state, obs = eng.observe(state, inventory("a3", "k2", 1, t + 100), t + 121)  # a reboot
    assert [(o.status, o.summary) for o in rma(obs)] == [
        ("critical", "GPU 1 (board SN-7): fatal XID 79 recurred after 2 reboots: hardware inspection / RMA")
    ]


def test_after_a_collector_restart_the_current_boot_is_not_a_new_one() -> None:
    """The host-to-boot map is not persisted: after a restart the current agent run's boot is
    unknown until its next inventory, and its XIDs count in the latest known boot."""
    eng, state = engine(), HealthState()
    for n in range(2):
        t = T0 + n * DAY
        state, _ = eng.observe(state, inventory(f"a{n}", f"k{n}", 1, t), t)
        state, _ = eng.observe(state, xid(f"a{n}", 2, t + 60), t + 60)
    restarted = HealthState(hosts=state.hosts, history=FleetHistory.of(state.history.boards.values()))
    t = T0 + DAY + 3600
    restarted, obs = eng.observe(restarted, xid("a1", 3, t), t)  # boot k1 still, the same agent run
    assert [o for o in rma(obs) if o.status != "healthy"] == []
    assert restarted.history.boards["SN-7"].boot_count == 2


def test_the_history_survives_the_state_codec() -> None:
    eng, state = engine(), HealthState()
    state, _ = eng.observe(state, inventory("a0", "k0", 1, T0), T0)
    state, _ = eng.observe(state, xid("a0", 2, T0 + 60), T0 + 60)
    back = state_from_dict(json.loads(json.dumps(state_to_dict(state))))
    assert back.history.boards == state.history.boards
    assert back.history.host_boots == state.history.host_boots
    assert back.history.slots == state.history.slots


# ----------------------------------------------------------------------------- persisted (PostgreSQL)


async def test_the_store_round_trips_boards_and_deletes_forgotten_ones(conn: Any) -> None:
    from collector.store.history import load_history, save_history

    a = board((79, T0, 1), (79, T0 + DAY, 2))
    a.updated_at = T0 + DAY
    b = replace(board((48, T0, 1)), board="GPU-x", serial="", uuid="GPU-x", host="n2", gpu=3)
    await save_history(conn, [a, b], [])
    assert sorted((await load_history(conn)), key=lambda x: x.board) == [b, a]
    a.fatal.append(FatalXid(79, T0 + 2 * DAY, "k3", 3))
    await save_history(conn, [a], [("GPU-x", T0)])
    assert await load_history(conn) == [a]


async def test_a_board_deleted_by_another_writer_meanwhile_is_written_again(conn: Any, pg_dsn: str) -> None:
    """Another writer deletes a board's row (its host forgotten) after this writer's insert of
    the board found it there and before it locked it: the board is written again with this
    writer's news, not lost (before: a KeyError that failed the whole alert step, seen on the
    fast event path under fuzzed frames)."""
    import asyncpg

    from collector.store.history import load_history, save_history

    a = board((79, T0, 1))
    await save_history(conn, [a], [])
    other = await asyncpg.connect(pg_dsn)

    class DeletedBeforeTheLock:
        """``conn``, with the other writer's delete committed just before the first locking read."""

        def __init__(self) -> None:
            self.done = False

        def __getattr__(self, name: str) -> Any:
            return getattr(conn, name)

        async def fetch(self, query: str, *args: Any) -> Any:
            if not self.done and "FOR UPDATE" in query:
                self.done = True
                await other.execute("DELETE FROM gpu_history WHERE board = $1", a.board)
            return await conn.fetch(query, *args)

    try:
        news = replace(a, fatal=[*a.fatal, FatalXid(79, T0 + DAY, "k2", 2)])
        written = await save_history(DeletedBeforeTheLock(), [news], [])  # type: ignore[arg-type]
    finally:
        await other.close()
    assert [b.board for b in written] == [a.board]
    (back,) = await load_history(conn)
    assert [(x.code, x.at) for x in back.fatal] == [(79, T0), (79, T0 + DAY)]


async def test_a_restarted_collector_continues_the_history_and_raises_gpu_rma(
    tmp_path: Path, pg_dsn: str, private_nats: NatsServer
) -> None:
    """Two boots with XID 79 before a collector restart, the third after it: the history comes
    back from PostgreSQL (``gpu_history``) and the third occurrence raises ``gpu.rma``."""
    import asyncpg

    from tests.support.collector import Receiver, collector, send, webhook_toml, write_config
    from tests.support.wait import until

    url = private_nats.url
    # the count rule out of the way (the history decides); no samples are sent: no staleness
    body = '[health]\nstale_after = "1h"\n[health.gpu]\nrma_fatal_xids = 100\n'
    t = time.time()
    async with Receiver() as rx:
        cfg = write_config(tmp_path, pg_dsn, url, body + webhook_toml(rx.url))
        async with collector(cfg) as svc:
            await send(url, [inventory("a0", "k0", 1, t), xid("a0", 2, t + 1)])
            await send(url, [inventory("a1", "k1", 1, t + 2), xid("a1", 2, t + 3)])
            boards = svc.alerting.health.history.boards
            await until(
                lambda: (
                    "SN-7" in boards
                    and len(boards["SN-7"].fatal) == 2
                    and [b for b, _ in boards["SN-7"].boots] == ["k0", "k1"]
                )  # both inventories judged
            )
        db = await asyncpg.connect(pg_dsn)
        try:
            (row,) = await db.fetch("SELECT board, host, gpu, boots, fatal FROM gpu_history")
        finally:
            await db.close()
        assert (row["board"], row["host"], row["gpu"]) == ("SN-7", "node-1", 1)
        assert [b for b, _ in json.loads(row["boots"])] == ["k0", "k1"]
        assert [f[0] for f in json.loads(row["fatal"])] == [79, 79]
        assert not [a for b in rx.bodies() for a in b["alerts"] if a["labels"]["alertname"] == "gpu.rma"]
        async with collector(cfg) as svc:
            assert svc.alerting.health.history.boards["SN-7"].boot_count == 2
            await send(url, [inventory("a2", "k2", 1, t + 4), xid("a2", 2, t + 5)])

            def told() -> list[dict[str, Any]]:
                return [a for b in rx.bodies() for a in b["alerts"] if a["labels"]["alertname"] == "gpu.rma"]

            await until(lambda: len(told()) >= 1)
        (a,) = told()
        assert a["status"] == "firing"
        assert a["labels"]["severity"] == "critical"
        assert a["annotations"]["summary"] == (
            "GPU 1 (board SN-7): fatal XID 79 recurred after 2 reboots: hardware inspection / RMA"
        )
        assert a["annotations"]["advice"].count("XID 79 at ") == 3


def test_forgetting_a_host_keeps_its_boards_history() -> None:
    h = FleetHistory()
    h.inventory("n1", "p", "a1", "k1", gpus(), T0)
    h.inventory("n10", "p", "b1", "k9", [(0, "GPU-z", "Z0")], T0)
    h.fatal_xid("n1", "p", 2, "GPU-2", 79, T0 + 1, "a1", CFG)
    h.forget_host("n1")
    assert list(h.host_boots) == ["n10"]
    assert list(h.slots) == ["n10/0"]
    assert list(h.boards) == ["S2"]
