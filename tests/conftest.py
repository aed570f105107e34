"""Shared fixtures: private nats-server (JetStream) and PostgreSQL on free ports.

Each server is started once per test session (module-scoped variants exist for tests that
stop and restart their server) and torn down at the end; no test depends on another's state.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any

import pytest

from gpuwarden.servers import NatsCluster, NatsServer, PostgresServer
from tests.support.db import fresh_database

if TYPE_CHECKING:
    import asyncpg


# Modules whose tests share no module-scoped fixture and take up to a minute or two each: their
# tests are spread over the workers one by one.
PER_TEST = (
    "tests/test_e2e_scenarios.py",
    "tests/test_group_e2e.py",
    "tests/test_group_ack_incident.py",
    "tests/test_group_engines.py",
)
# What takes longest in a full run (``--durations``; 2026-11-29, a loaded 2-core machine: the
# Ansible module's applies 600 s, the fuzz check 175 s, a group ack case 120 s, a group
# end-to-end test 30-90 s, a scenario 20-70 s), longest first: started first, so that the run
# does not end with one worker on a long module while the others wait. The rest follows in
# xdist's order.
LONGEST_FIRST = (
    "tests/test_ansible.py",
    "tests/test_fuzz_frames.py",
    "tests/test_group_ack_incident.py",
    "tests/test_group_e2e.py",
    "tests/test_e2e_scenarios.py",
    "tests/test_e2e_alerts.py",
    "tests/test_group_engines.py",
)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """Under pytest-xdist (``make test`` runs ``-n N``) a module's tests stay on one worker,
    where its module-scoped servers, collectors and playbook applies are made once; the tests
    of ``PER_TEST`` modules are spread over the workers one by one, and ``LONGEST_FIRST``
    goes first."""
    from xdist.scheduler import LoadScopeScheduling  # noqa: PLC0415 (only under xdist)

    def rank(scope: str) -> int:
        path = scope.split("::", 1)[0]
        return LONGEST_FIRST.index(path) if path in LONGEST_FIRST else len(LONGEST_FIRST)

    class ModuleScheduling(LoadScopeScheduling):  # type: ignore[misc]
        ordered = False

        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return nodeid if path in PER_TEST else path

        def _assign_work_unit(self, node: Any) -> None:
            if not self.ordered:  # the queue is complete before the first unit is assigned
                self.ordered = True
                units = sorted(self.workqueue.items(), key=lambda unit: rank(unit[0]))  # stable
                self.workqueue.clear()
                self.workqueue.update(units)
            super()._assign_work_unit(node)

    return ModuleScheduling(config, log)


@pytest.fixture(scope="session")
def nats_server() -> Iterator[NatsServer]:
    with NatsServer() as server:
        yield server


@pytest.fixture(scope="session")
def nats_url(nats_server: NatsServer) -> str:
    return nats_server.url


@pytest.fixture
def private_nats() -> Iterator[NatsServer]:
    """A nats-server of the test's own, for tests that stop and restart it."""
    with NatsServer() as server:
        yield server


@pytest.fixture
def nats_cluster() -> Iterator[NatsCluster]:
    """Three nats-servers with JetStream in one cluster, of the test's own (it may kill nodes):
    ``nats_cluster.urls`` for ``[nats] servers``, ``nats_cluster.node(leader)`` to kill one."""
    with NatsCluster(3) as cluster:
        yield cluster


@pytest.fixture
def pg_pair(request: pytest.FixtureRequest) -> Iterator[tuple[PostgresServer, PostgresServer]]:
    """A primary and its streaming standby (started), of the test's own: stop the primary and
    ``promote()`` the standby. Parametrize indirectly with ``"sync"`` for synchronous
    replication (``synchronous_commit = on``, ``synchronous_standby_names = '*'``: a commit
    returns once the standby has flushed it); the default is asynchronous."""
    sync = getattr(request, "param", "async") == "sync"
    settings = {"synchronous_commit": "on", "synchronous_standby_names": "*"} if sync else {}
    with PostgresServer(settings=settings) as primary:
        standby = PostgresServer.standby_of(primary)
        with standby:
            yield primary, standby


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    with PostgresServer() as server:
        yield server


@pytest.fixture
def pg_dsn(pg_server: PostgresServer) -> Iterator[str]:
    """A fresh, empty database for one test, dropped afterwards."""
    with fresh_database(pg_server) as dsn:
        yield dsn


@pytest.fixture
async def conn(pg_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection to ``pg_dsn`` with the collector's schema migrated in."""
    import asyncpg  # noqa: PLC0415 (collector tests only; agent tests need no asyncpg)

    from collector.store import migrate  # noqa: PLC0415

    c = await asyncpg.connect(pg_dsn)
    await migrate.migrate(c)
    yield c
    await c.close()


@pytest.fixture(scope="module")
def module_dsn(pg_server: PostgresServer) -> Iterator[str]:
    with fresh_database(pg_server) as dsn:
        yield dsn


@pytest.fixture(scope="module")
def module_nats() -> Iterator[NatsServer]:
    """A nats-server of the module's own: its stream holds only this module's frames."""
    with NatsServer() as server:
        yield server
