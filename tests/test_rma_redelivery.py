"""A fatal XID judged twice (redelivered, judged by two collector group members, or judged again
by a collector restarted with the history restored from PostgreSQL) counts once in the board's
fault history, and two writers of one board's history neither lose nor double a fatal XID
(docs/alerts.md, "Hardware escalation (gpu.rma)").

``rma_fatal_xids = 2`` throughout: one XID counted twice would raise a false ``gpu.rma``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from collector.health import HealthEngine, HealthState, Observation, health_config_from
from collector.health.codec import health_snapshot, state_from_dict
from collector.health.history import BoardHistory, FatalXid, FleetHistory, merge
from shared.frames import EventFrame, GpuInfo, HostFacts, InventoryFrame
from tests.support.frame_fixtures import xid_frame

T0 = 1_700_000_000.0
DAY = 86400.0
BOARD = "SN-9"


def make_engine() -> HealthEngine:
    return HealthEngine(health_config_from({"health": {"gpu": {"rma_fatal_xids": 2}}}, env={}))


def inv(ts: float) -> InventoryFrame:
    return InventoryFrame(
        host="h1",
        provider="p",
        boot_id="agent-1",
        seq=1,
        ts=ts,
        backend="nvml",
        gpus=(GpuInfo(index=0, uuid="GPU-9", serial=BOARD),),
        host_facts=HostFacts(hostname="h1", kernel_boot_id="kb-1"),
    )


def fatal(seq: int, ts: float) -> EventFrame:
    return xid_frame("h1", seq, ts, "p", "agent-1", gpu_index=0, gpu_uuid="GPU-9", xid=79)


def raised(obs: list[Observation]) -> list[Observation]:
    return [o for o in obs if o.check == "gpu.rma" and o.status != "healthy"]


def copy(state: HealthState, eng: HealthEngine) -> HealthState:
    """``state`` as a restarted or taking collector reads it back: the lean health snapshot,
    and the fault history as stored (``gpu_history``)."""
    back = state_from_dict(json.loads(json.dumps(health_snapshot(state, eng.healthy_for))))
    back.history = FleetHistory.of(
        BoardHistory.from_dict(json.loads(json.dumps(b.to_dict()))) for b in state.history.boards.values()
    )
    return back


def test_a_redelivered_fatal_xid_counts_once_and_raises_no_rma() -> None:
    eng = make_engine()
    state, _ = eng.observe(HealthState(), inv(T0), T0)
    state, obs = eng.observe(state, fatal(2, T0 + 1), T0 + 1)
    assert not raised(obs)
    state, obs = eng.observe(state, fatal(2, T0 + 1), T0 + 5)  # the same copy again
    assert not raised(obs)
    assert [e.at for e in state.history.boards[BOARD].fatal] == [T0 + 1]
    # a second, distinct fatal XID is what raises it
    state, obs = eng.observe(state, fatal(3, T0 + 2), T0 + 6)
    assert [o.status for o in raised(obs)] == ["critical"]


def test_judged_again_after_a_restart_whose_snapshot_predates_it_counts_once() -> None:
    """The history was written with the XID, the health snapshot before it (they are written
    apart): the restarted collector judges the unacknowledged copy again."""
    eng = make_engine()
    state, _ = eng.observe(HealthState(), inv(T0), T0)
    before = copy(state, eng)
    state, _ = eng.observe(state, fatal(2, T0 + 1), T0 + 1)
    restarted = before
    restarted.history = copy(state, eng).history  # gpu_history has the XID
    restarted, obs = eng.observe(restarted, fatal(2, T0 + 1), T0 + 60)
    assert not raised(obs)
    assert [e.at for e in restarted.history.boards[BOARD].fatal] == [T0 + 1]
    assert restarted.hosts["h1"].gpus[0].fatal_xids == [T0 + 60]


def test_two_members_judging_one_copy_merge_to_one_fatal_xid() -> None:
    """A bucket changing hands: the old holder judged the batch, the taker (its history read
    back from PostgreSQL: no inventory of the host yet, so the board is named by its UUID)
    judges the redelivered copy. Once the host's inventory names the board, the two members'
    boards merge by event identity: one XID, and the next distinct one raises gpu.rma once."""
    eng = make_engine()
    old, _ = eng.observe(HealthState(), inv(T0), T0)
    taker = copy(old, eng)
    old, obs_old = eng.observe(old, fatal(2, T0 + 1), T0 + 1)
    taker, obs_taker = eng.observe(taker, fatal(2, T0 + 1), T0 + 30)
    assert not raised(obs_old + obs_taker)
    assert list(taker.history.boards) == ["GPU-9"]
    taker, _ = eng.observe(taker, inv(T0 + 40), T0 + 40)
    changed, gone = taker.history.take_changes()
    assert ([b.board for b in changed], gone) == ([BOARD], [("GPU-9", T0 + 1)])
    a, b = old.history.boards[BOARD], taker.history.boards[BOARD]
    for m in (merge(a, b), merge(b, a)):
        assert [(e.code, e.at, e.boot) for e in m.fatal] == [(79, T0 + 1, "kb-1")]
    taker.history.absorb([merge(a, b)])
    assert len(taker.history.boards[BOARD].fatal) == 1
    taker, obs = eng.observe(taker, fatal(3, T0 + 2), T0 + 41)
    assert [o.status for o in raised(obs)] == ["critical"]


def board(*events: tuple[float, str], boots: tuple[tuple[str, float], ...] = ()) -> BoardHistory:
    b = BoardHistory(BOARD, BOARD, "GPU-9", "p", "h1", 0)
    b.boots = list(boots)
    b.fatal = [FatalXid(79, at, boot, 0) for at, boot in events]
    b._renumber()
    b.updated_at = max((at for at, _ in events), default=0.0)
    return b


def test_merge_is_a_union_by_event_identity_with_boots_in_order() -> None:
    a = board((T0, "k1"), (T0 + DAY, "k2"), boots=(("k1", T0 - 5), ("k2", T0 + DAY - 5)))
    b = board((T0 + DAY, "k2"), (T0 + 2 * DAY, "k3"), boots=(("k2", T0 + DAY - 9), ("k3", T0 + 2 * DAY - 5)))
    m = merge(a, b)
    assert [(e.at, e.boot, e.boot_no) for e in m.fatal] == [
        (T0, "k1", 1),
        (T0 + DAY, "k2", 2),
        (T0 + 2 * DAY, "k3", 3),
    ]
    assert m.boots == [("k1", T0 - 5), ("k2", T0 + DAY - 9), ("k3", T0 + 2 * DAY - 5)]
    assert merge(m, b) == m
    # stored XIDs aged out for the writer are dropped
    assert [e.at for e in merge(a, b, cutoff=T0 + 1).fatal] == [T0 + DAY, T0 + 2 * DAY]


# ----------------------------------------------------------------------------- PostgreSQL


async def test_two_writers_of_one_board_neither_lose_nor_double_a_fatal_xid(conn: Any) -> None:
    """Member A writes XID e0; member B, holding the board as it was before (it loaded the
    history earlier), writes its own XID e1 and the copy of e0 it judged again: the row keeps
    e0 and e1, each once. A then forgets the board (its XIDs aged out on its view): the row,
    holding B's newer XID, stays."""
    from collector.store.history import load_history, save_history

    kb = (("kb-1", T0),)
    a = board((T0 + 1, "kb-1"), boots=kb)
    await save_history(conn, [a], [])
    b = board((T0 + 50, "kb-1"), boots=kb)  # B's view: it never saw e0
    written = await save_history(conn, [b], [])
    assert [e.at for e in written[0].fatal] == [T0 + 1, T0 + 50]
    b2 = board((T0 + 1, "kb-1"), (T0 + 50, "kb-1"), boots=kb)  # e0 judged again by B
    await save_history(conn, [b2], [])
    (row,) = await load_history(conn)
    assert [(e.code, e.at) for e in row.fatal] == [(79, T0 + 1), (79, T0 + 50)]
    await save_history(conn, [], [(BOARD, T0 + 1)])  # A forgets it knowing only e0
    assert [e.at for e in (await load_history(conn))[0].fatal] == [T0 + 1, T0 + 50]
    await save_history(conn, [], [(BOARD, T0 + 50)])  # forgotten by one that knew them all
    assert await load_history(conn) == []


async def test_a_writer_waiting_on_anothers_open_write_merges_it_in(conn: Any, pg_dsn: str) -> None:
    """Two writers at once, for a new board and then for a stored one: the second waits for
    the first's open transaction (on the row, or on its insert) and merges what it committed."""
    import asyncio

    import asyncpg

    from collector.store.history import load_history, save_history
    from tests.support.wait import until

    async def waiting() -> bool:  # the second writer blocks on a lock the first holds
        n = await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE datname = current_database() AND wait_event_type = 'Lock'"
        )
        return bool(n)

    kb = (("kb-1", T0),)
    first = await asyncpg.connect(pg_dsn)
    try:
        for e0, e1 in ((T0 + 1, T0 + 2), (T0 + 3, T0 + 4)):  # a new board, then the stored one
            tx = first.transaction()
            await tx.start()
            await first.execute(
                "INSERT INTO gpu_history (board, fatal) VALUES ($1, $2::jsonb)"
                " ON CONFLICT (board) DO UPDATE SET fatal = gpu_history.fatal || EXCLUDED.fatal",
                BOARD,
                json.dumps([[79, e0, "kb-1", 1]]),
            )
            conn2 = await asyncpg.connect(pg_dsn)
            second = asyncio.create_task(save_history(conn2, [board((e1, "kb-1"), boots=kb)], []))
            try:
                await until(waiting, what="the second writer waiting on the first")
                await tx.commit()
                await second
            finally:
                await conn2.close()
        (row,) = await load_history(conn)
        assert [e.at for e in row.fatal] == [T0 + 1, T0 + 2, T0 + 3, T0 + 4]
    finally:
        await first.close()


# ----------------------------------------------------------------------------- collector group


async def test_a_bucket_taker_decides_with_the_history_its_previous_owner_wrote(
    conn: Any, pg_dsn: str, tmp_path: Path
) -> None:
    """Members a and b start with the same (empty) fault history. a holds the bucket and judges
    XID 79 in two boots of the host; b takes the bucket and judges it in a third boot: a
    recurrence after two reboots, raised by b (it took in the history a wrote when it took
    the bucket; before, b decided from its own view and raised nothing). The count rule is
    out of the way (``rma_fatal_xids`` 100): the history decides."""
    import time

    import asyncpg

    from collector.group import fence
    from collector.group.scope import Scope
    from collector.group.store import GroupAlertStore
    from tests.support.collector import load_toml
    from tests.support.group import host_name_in_bucket
    from tests.support.runner import CONFIG, build_runner

    cfg = load_toml(tmp_path, pg_dsn, None, CONFIG + "[health.gpu]\nrma_fatal_xids = 100\n")
    host, bucket = host_name_in_bucket(5), 5
    pools = [await asyncpg.create_pool(pg_dsn, min_size=1, max_size=2) for _ in range(2)]
    try:
        runners, held = [], []
        for pool in pools:
            mine: dict[int, int] = {}
            scope = Scope(64, lambda b, m=mine: b in m, lambda m=mine: dict(m))  # type: ignore[misc]
            store = GroupAlertStore(lambda p=pool: p, scope, "g")  # type: ignore[misc]
            runner = build_runner(cfg, store, scope=scope, on_fenced=lambda _: None)[0]
            store.incidents = lambda r=runner: r.alerts_state.incidents  # type: ignore[misc]
            store.health = lambda r=runner: (r.health, r.health_engine.healthy_for)  # type: ignore[misc]
            runners.append((runner, store))
            held.append(mine)

        async def take(i: int, token: int) -> None:
            await fence.take(conn, bucket, token, f"m{i}", group="g")
            held[i][bucket] = token
            runner, store = runners[i]
            await runner.regroup(lambda: store.reload([bucket]))

        def boot(n: int, t: float) -> list[Any]:
            agent = f"agent-{n}"
            return [
                InventoryFrame(
                    host=host, provider="p", boot_id=agent, seq=1, ts=t, backend="nvml",
                    gpus=(GpuInfo(index=0, uuid="GPU-9", serial=BOARD),),
                    host_facts=HostFacts(hostname=host, kernel_boot_id=f"kb-{n}"),
                ),
                xid_frame(host, 2, t + 1, "p", agent, gpu_index=0, gpu_uuid="GPU-9", xid=79),
            ]  # fmt: skip

        def rma_states(i: int) -> list[str]:
            return [a.state for a in runners[i][0].alerts_state.alerts.values() if a.rule == "gpu.rma"]

        t = time.time()
        await take(0, 10)
        await runners[0][0].on_frames(boot(0, t) + boot(1, t + 10))
        assert rma_states(0) == []
        await take(1, 11)
        await runners[1][0].on_frames(boot(2, t + 20))
        assert rma_states(1) == ["firing"]
        (a,) = [a for a in runners[1][0].alerts_state.alerts.values() if a.rule == "gpu.rma"]
        assert a.summary == (
            f"GPU 0 (board {BOARD}): fatal XID 79 recurred after 2 reboots: hardware inspection / RMA"
        )
        n = await conn.fetchval("SELECT jsonb_array_length(fatal) FROM gpu_history WHERE board = $1", BOARD)
        assert n == 3
    finally:
        for pool in pools:
            await pool.close()
