"""Driver version drift across a provider: the info check and the provider view."""

from __future__ import annotations

from collector.api.views import provider_view
from collector.health import HealthEngine, HealthState
from collector.health.codec import state_from_dict
from collector.health.drivers import majority
from collector.state import FleetState
from shared.frames import InventoryFrame
from tests.support.health_dump import state_to_dict

NEW, OLD = "570.133.20", "550.127.08"


def inv(host: str, driver: str | None, provider: str = "p", seq: int = 1) -> InventoryFrame:
    return InventoryFrame(
        host=host, provider=provider, boot_id="b", seq=seq, ts=float(seq), driver_version=driver
    )


def drift_status(state: HealthState, host: str) -> str | None:
    cs = state.hosts[host].checks.get("host.driver_drift")
    return cs.status if cs is not None else None


def test_majority() -> None:
    assert majority({NEW: 3, OLD: 1}) == NEW
    assert majority({NEW: 2, OLD: 2}) is None  # a tie: nobody is "the" drift
    assert majority({NEW: 1}) is None  # one host is no majority
    assert majority({}) is None


def test_a_host_off_the_majority_is_info_and_clears_when_aligned() -> None:
    engine, state = HealthEngine(), HealthState()
    for i, v in enumerate([NEW, NEW, OLD]):
        state, _ = engine.observe(state, inv(f"n{i}", v), 1.0)
    assert [drift_status(state, f"n{i}") for i in range(3)] == ["healthy", "healthy", "info"]
    (o,) = [o for o in engine.observe(state, inv("n2", OLD, seq=2), 2.0)[1] if o.check == "host.driver_drift"]
    assert o.status == "info"
    assert f"runs NVIDIA driver {OLD}, p mostly {NEW} (2 of 3 hosts)" in o.summary
    state, _ = engine.observe(state, inv("n2", NEW, seq=3), 3.0)  # updated
    assert drift_status(state, "n2") == "healthy"
    # another provider has its own majority; a host without a driver version is not judged
    state, _ = engine.observe(state, inv("q0", OLD, provider="q"), 4.0)
    state, _ = engine.observe(state, inv("n3", None), 4.0)
    assert (drift_status(state, "q0"), drift_status(state, "n3")) == ("healthy", None)  # alone: no majority


def test_when_the_majority_moves_every_host_is_judged_again() -> None:
    engine, state = HealthEngine(), HealthState()
    for i, v in enumerate([OLD, OLD, NEW]):
        state, _ = engine.observe(state, inv(f"n{i}", v), 1.0)
    assert drift_status(state, "n2") == "info"
    # a rollout: two more hosts on the new driver make it the majority
    for i in (3, 4):
        state, _ = engine.observe(state, inv(f"n{i}", NEW), 2.0)
    assert [drift_status(state, f"n{i}") for i in range(5)] == [
        "info",
        "info",
        "healthy",
        "healthy",
        "healthy",
    ]
    # the counts survive a save/restore of the state (rebuilt from the hosts)
    restored = state_from_dict(state_to_dict(state))
    restored, _ = engine.observe(restored, inv("n0", NEW, seq=2), 3.0)
    assert restored.drivers["p"] == {NEW: 4, OLD: 1}
    assert drift_status(restored, "n0") == "healthy"


def test_provider_view_lists_the_drift() -> None:
    fleet = FleetState()
    fleet.apply([inv("n0", NEW), inv("n1", NEW), inv("n2", OLD), inv("n3", None)])
    view = provider_view("p", None, fleet)
    assert view["driver_versions"] == {NEW: 2, OLD: 1}
    assert view["driver_majority"] == NEW
    assert view["driver_drift"] == [{"host": "n2", "driver_version": OLD}]
