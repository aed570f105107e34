"""Pure health evaluation: frames and the current time in, observations and rollups out.

No clock, no logging, no I/O (docs/reference.md, "Code rules"). See ``docs/health.md`` for every check.
"""

from collector.health.config import HealthConfig, health_config_from
from collector.health.engine import ExpectedHost, HealthEngine
from collector.health.model import (
    CRITICAL,
    HEALTHY,
    INFO,
    STATUSES,
    UNKNOWN,
    WARNING,
    HealthState,
    Observation,
)
from collector.health.rollup import FleetHealth, rollup

__all__ = [
    "CRITICAL",
    "HEALTHY",
    "INFO",
    "STATUSES",
    "UNKNOWN",
    "WARNING",
    "ExpectedHost",
    "FleetHealth",
    "HealthConfig",
    "HealthEngine",
    "HealthState",
    "Observation",
    "health_config_from",
    "rollup",
]
