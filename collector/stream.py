"""The ``GPUWARDEN`` stream as the collector sees it: settings reconciled at start, losses counted.

:func:`reconcile` runs at start, before the consumer is bound (through :func:`settle`, which
retries a set-up step NATS answers late or "not found" yet): it creates the stream when it
is missing and allowed, else compares its settings with ``[nats]`` (:func:`shared.natsconf.
stream_drift`), updates what NATS can update in place and logs, for each setting it cannot
(storage, retention) or was refused, a warning with the exact command an operator runs.

:class:`StreamGaps` counts the messages the stream dropped (``discard: old`` when it is full,
``max_age``) before this collector's consumer got them: the consumer reads the whole stream
in order, so a jump in the stream sequence numbers it is delivered is a loss.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import nats.errors
import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import StorageType, StreamConfig, StreamInfo, SubjectTransform
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_delay, wait_exponential_jitter

from shared.config import NatsConfig
from shared.errors import ServiceUnavailableError
from shared.natsconf import Drift, fit_max_bytes, is_name_in_use, stream_drift, stream_settings
from shared.subjects import PREFIX, STREAM

log = logging.getLogger(__name__)
T = TypeVar("T")


def stream_config(cfg: NatsConfig) -> StreamConfig:
    return StreamConfig(storage=StorageType.FILE, **stream_settings(cfg))


def wanted(cfg: NatsConfig) -> dict[str, Any]:
    return {**stream_settings(cfg), "storage": "file", "retention": "limits"}


@dataclass(slots=True)
class StreamReport:
    """What :func:`reconcile` found and did."""

    created: bool = False
    updated: list[Drift] = field(default_factory=list)
    left: list[Drift] = field(default_factory=list)  # differences NATS cannot or would not apply
    max_bytes: int = -1  # the stream's size limit after reconciling


async def settle(step: Callable[[], Awaitable[T]]) -> T:
    """Run an idempotent stream set-up ``step``, retried for two minutes while NATS answers late
    or not yet. Collectors starting together update the stream at once; on a loaded cluster
    such an update can outlast the API timeout, and a stream another collector has just created
    can answer "stream not found" for a moment (in a full test run a group member exited on
    that 404 between creating the stream and giving it the group's transform)."""
    async for attempt in AsyncRetrying(
        retry=retry_if_exception_type((nats.errors.TimeoutError, TimeoutError, nats.js.errors.NotFoundError)),
        wait=wait_exponential_jitter(multiplier=0.5, max=5.0),
        stop=stop_after_delay(120),
        before_sleep=lambda rs: log.warning(
            "stream setup failed, retrying: %r", rs.outcome.exception() if rs.outcome else None
        ),
        reraise=True,
    ):
        with attempt:
            return await step()
    raise AssertionError("unreachable: the last attempt's error is raised")


async def reconcile(js: JetStreamContext, cfg: NatsConfig) -> StreamReport:
    """Create the stream, or bring its settings to ``cfg`` where NATS allows; warn for the rest."""
    report = StreamReport()
    try:
        info = await js.stream_info(STREAM)
    except nats.js.errors.NotFoundError as e:
        if not cfg.create_stream:
            raise ServiceUnavailableError(f"JetStream stream {STREAM} does not exist") from e
        want = stream_config(cfg)
        try:
            _, size = await fit_max_bytes(
                lambda n: js.add_stream(dataclasses.replace(want, max_bytes=n)), int(want.max_bytes or -1)
            )
        except nats.js.errors.BadRequestError as e2:
            if not is_name_in_use(e2):
                raise
            return await reconcile(js, cfg)  # created meanwhile by another client: reconcile it
        log.info("created stream %s (max_bytes %d)", STREAM, size)
        report.created = True
        report.max_bytes = size
        return report
    have = info.config
    seconds = {"max_age": have.max_age, "duplicate_window": have.duplicate_window}  # as_dict: ns
    drift = stream_drift(have.as_dict() | seconds, wanted(cfg))
    report.max_bytes = int(have.max_bytes or -1)
    updatable = [d for d in drift if d.updatable]
    report.left = [d for d in drift if not d.updatable]
    if updatable and not cfg.create_stream:  # credentials that may not manage the stream
        report.left += updatable
        updatable = []
    if updatable:
        report.updated, refused = await _update(js, have, updatable)
        report.left += refused
        if report.updated:
            latest = await js.stream_info(STREAM)
            report.max_bytes = int(latest.config.max_bytes or -1)
    for d in report.left:
        log.warning(
            "stream %s: %s is %r, configuration wants %r; NATS %s: %s",
            STREAM,
            d.field,
            d.have,
            d.want,
            "cannot change it in place" if not d.updatable else "did not apply it",
            d.command,
        )
    if report.max_bytes <= 0:
        log.warning(
            "stream %s has no size limit: when the JetStream store fills, every publish fails "
            "(set [nats] stream_max_bytes, docs/configuration.md)",
            STREAM,
        )
    return report


async def _update(
    js: JetStreamContext, have: StreamConfig, changes: list[Drift]
) -> tuple[list[Drift], list[Drift]]:
    """Apply ``changes`` in one update; if NATS refuses it, one by one. Returns (applied, refused)."""

    def patched(base: StreamConfig, items: list[Drift], max_bytes: int | None = None) -> StreamConfig:
        fields = {d.field: d.want for d in items}
        if max_bytes is not None and "max_bytes" in fields:
            fields["max_bytes"] = max_bytes
        return dataclasses.replace(base, **fields)

    want_bytes = next((int(d.want) for d in changes if d.field == "max_bytes"), -1)
    try:
        await fit_max_bytes(lambda n: js.update_stream(patched(have, changes, n)), want_bytes)
    except (nats.js.errors.APIError, nats.errors.TimeoutError) as e:
        log.info("stream %s: one update of %d settings refused (%s); trying each", STREAM, len(changes), e)
    else:
        for d in changes:
            log.info("stream %s: %s updated from %r to %r", STREAM, d.field, d.have, d.want)
        return changes, []
    applied: list[Drift] = []
    refused: list[Drift] = []
    current = have
    for d in changes:
        try:
            info, _ = await fit_max_bytes(functools.partial(_apply_one, js, patched, current, d), want_bytes)
        except (nats.js.errors.APIError, nats.errors.TimeoutError) as e:
            log.debug("stream %s: update of %s refused: %s", STREAM, d.field, e)
            refused.append(d)
        else:
            current = info.config
            applied.append(d)
            log.info("stream %s: %s updated from %r to %r", STREAM, d.field, d.have, d.want)
    return applied, refused


async def _apply_one(
    js: JetStreamContext,
    patched: Callable[[StreamConfig, list[Drift], int | None], StreamConfig],
    base: StreamConfig,
    change: Drift,
    max_bytes: int,
) -> StreamInfo:
    return await js.update_stream(patched(base, [change], max_bytes))


def bucket_transform(buckets: int) -> SubjectTransform:
    """The stream's subject transform of a collector group: each frame is stored under its
    subject plus the bucket of its host token (``{{partition(n,3)}}``, nats-server >= 2.10),
    so that each member's consumers read only their buckets (docs/operations.md)."""
    return SubjectTransform(
        src=f"{PREFIX}.*.*.*",
        dest=f"{PREFIX}.{{{{wildcard(1)}}}}.{{{{wildcard(2)}}}}.{{{{wildcard(3)}}}}.{{{{partition({buckets},3)}}}}",
    )


async def partition(js: JetStreamContext, buckets: int) -> bool:
    """Give the stream the group's subject transform (in place); True when it was changed."""
    info = await js.stream_info(STREAM)
    want = bucket_transform(buckets)
    have = info.config.subject_transform
    if have is not None and have.src == want.src and have.dest == want.dest:
        return False
    await js.update_stream(dataclasses.replace(info.config, subject_transform=want))
    log.info("stream %s: frames stored by host bucket (%d buckets) from now on", STREAM, buckets)
    return True


class StreamGaps:
    """Counts stream sequence numbers skipped by the consumer's deliveries (messages the stream
    dropped before this consumer got them). ``last`` starts at the consumer's highest delivered
    sequence, or just before the stream's first message for a new consumer."""

    def __init__(self, last: int = 0) -> None:
        self.last = last
        self.lost = 0
        self.events = 0  # separate jumps

    def see(self, seq: int | None) -> int:
        """Note one delivery; returns the messages lost just before it (0 for a redelivery)."""
        if seq is None or seq <= self.last:
            return 0
        lost = seq - self.last - 1
        self.last = seq
        if lost > 0:
            self.lost += lost
            self.events += 1
        return lost
