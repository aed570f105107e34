"""The alerting scenario catalogue (``tests/scenarios/*.toml``, see ``tests/support/scenario.py``)
through the pure engines: simulated agents on a virtual clock, the health engine and the
alert engine as the collector runs them; every notification per channel must be the
expected one, and no other may be sent."""

from __future__ import annotations

import pytest

from tests.support.scenario import catalogue, mismatches, run_pure

SCENARIOS = catalogue()


def test_the_catalogue_is_large_enough() -> None:
    assert len(SCENARIOS) >= 30
    assert sum(sc.e2e for sc in SCENARIOS) >= 8


@pytest.mark.parametrize(
    "sc",
    [
        pytest.param(
            sc, id=sc.name, marks=[pytest.mark.xfail(reason=sc.xfail, strict=True)] if sc.xfail else []
        )
        for sc in SCENARIOS
    ],
)
def test_scenario(sc) -> None:  # type: ignore[no-untyped-def]
    problems = mismatches(sc, run_pure(sc))
    assert not problems, f"{sc.title}\n" + "\n".join(problems)
