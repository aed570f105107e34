"""The whole health state as plain data, for tests: every field, the last readings included
(the collector persists the lean :func:`collector.health.codec.health_snapshot`; both are
read back by :func:`collector.health.codec.state_from_dict`, so a round trip through this
form shows that the decoder rebuilds every field)."""

from __future__ import annotations

import dataclasses
from typing import Any

import msgspec

from collector.health.model import HealthState


def _plain(value: Any) -> Any:
    if isinstance(value, msgspec.Struct):
        return {name: _plain(getattr(value, name)) for name in value.__struct_fields__}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            f.name: _plain(getattr(value, f.name))
            for f in dataclasses.fields(value)
            if not f.metadata.get("derived")  # a memo, rebuilt from the next sample
        }
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def state_to_dict(state: HealthState) -> dict[str, Any]:
    """``state`` as dicts, lists and scalars (keys are strings, so it survives JSON)."""
    out: dict[str, Any] = _plain(state)
    return out
