"""The in-memory fleet state: newest wins, providers grouped, events kept in order."""

from __future__ import annotations

import pytest

from collector.state import RECENT_EVENTS, FleetState
from tests.support.records import event, inventory, sample


def test_newest_sample_wins_in_any_order() -> None:
    s = FleetState()
    frames = [sample("a", seq, 1000.0 + seq, gpus=2) for seq in range(1, 6)]
    s.apply([frames[4], frames[0], frames[2]])
    s.apply([frames[1], frames[3]])  # late (redelivered) frames never overwrite newer ones
    host = s.host("a")
    assert host is not None
    assert host.sample == frames[4]
    assert host.last_seen == 1005.0
    assert host.gpu_count == 2


@pytest.mark.parametrize(
    ("order", "expected"),
    [((1, 2, 3), [1, 2, 3]), ((3, 1, 2), [1, 2, 3]), ((2, 2, 1), [1, 2])],
)
def test_events_kept_in_time_order_once(order: tuple[int, ...], expected: list[int]) -> None:
    s = FleetState()
    s.apply([event("a", seq, 100.0 + seq) for seq in order])
    host = s.host("a")
    assert host is not None
    assert [e.seq for e in host.events] == expected


def test_events_are_bounded() -> None:
    s = FleetState()
    s.apply([event("a", seq, float(seq)) for seq in range(RECENT_EVENTS + 10)])
    host = s.host("a")
    assert host is not None
    assert len(host.events) == RECENT_EVENTS
    assert host.events[0].seq == 10


def test_providers_group_hosts_and_follow_a_move() -> None:
    s = FleetState()
    s.apply(
        [
            sample("a", 1, 1.0, provider="p1"),
            sample("b", 1, 1.0, provider="p1"),
            sample("c", 1, 1.0, provider="p2"),
        ]
    )
    assert sorted(s.providers["p1"]) == ["a", "b"]
    s.apply([sample("a", 2, 2.0, provider="p2")])
    assert sorted(s.providers["p1"]) == ["b"]
    assert sorted(s.providers["p2"]) == ["a", "c"]
    s.apply([sample("b", 2, 2.0, provider="p2")])
    assert "p1" not in s.providers
    assert len(s) == 3


def test_gpu_count_falls_back_to_inventory() -> None:
    s = FleetState()
    s.apply([inventory("a", 1, 1.0, gpus=4)])
    host = s.host("a")
    assert host is not None
    assert host.gpu_count == 4
    info = host.gpu_info(3)
    assert info is not None
    assert info.uuid == "GPU-a-3"
    s.apply([sample("a", 2, 2.0, gpus=3)])
    assert host.gpu_count == 3


def test_the_agents_outage_report_is_kept_and_shown_on_the_host() -> None:
    """A sample carrying the agent's publish-outage report: the state keeps the newest report
    (a later sample without one does not clear it) and the host API shows it."""
    from collector.api.views import host_detail
    from shared.frames import PublishOutage, replace

    s = FleetState()
    report = PublishOutage(since=1000.0, until=1030.5, buffered_frames=30, dropped_frames=1)
    s.apply([replace(sample("a", 40, 1031.0), outage=report), sample("a", 41, 1032.0)])
    host = s.host("a")
    assert host is not None
    assert host.outage == report
    older = PublishOutage(since=900.0, until=910.0, buffered_frames=1, dropped_frames=0)
    s.apply([replace(sample("a", 5, 911.0), outage=older)])  # redelivered, older
    assert host.outage == report
    view = host_detail("a", None, host, {})
    assert view["publish_outage"] == {
        "since": 1000.0,
        "until": 1030.5,
        "seconds": 30.5,
        "buffered_frames": 30,
        "dropped_frames": 1,
    }
    assert host_detail("b", None, None, {})["publish_outage"] is None
