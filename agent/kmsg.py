"""Kernel-log reader: NVIDIA driver XID lines and "fallen off the bus" messages from ``/dev/kmsg``.

Some GPU failures show in the kernel log before, or instead of, the NVML event set, so the
agent reads both and :class:`agent.events.EventTracker` removes the duplicates.

:func:`parse_xid_line` is pure. :class:`KmsgReader` reads ``/dev/kmsg`` records (one record per
``read``: ``priority,seq,usec,flags;message`` then optional indented ``KEY=value`` lines), or any
file or FIFO of plain log lines standing in for it. A missing or unreadable log is logged once
and the reader stays disabled; it is never an error.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import select
import threading
import time
from typing import Final

from agent.gpu.base import GpuEvent

log = logging.getLogger(__name__)

MAX_MESSAGE: Final = 512
_SLICE_S: Final = 0.1  # longest uninterrupted wait, so close() is honoured quickly
_READ_SIZE: Final = 8192  # /dev/kmsg needs a buffer at least as large as one record
MAX_LINE: Final = _READ_SIZE  # a longer "line" is no kernel record: dropped whole, counted

_PCI = r"(?:PCI:)?((?:[0-9a-fA-F]{4,8}:)?[0-9a-fA-F]{2}:[0-9a-fA-F]{2}(?:\.[0-9a-fA-F])?)"
_XID_RE: Final = re.compile(r"NVRM: Xid \(" + _PCI + r"\): (\d+)(?:, (.*))?$")
_LOST_RE: Final = re.compile(r"NVRM: GPU (?:at )?" + _PCI + r":? .*fallen off the bus", re.IGNORECASE)
_KMSG_PREFIX_RE: Final = re.compile(r"^(\d+),(\d+),(\d+),[^;]*;")
_DMESG_PREFIX_RE: Final = re.compile(r"^\[\s*\d+\.\d+\]\s*")


def parse_xid_line(line: str, ts: float) -> GpuEvent | None:
    """An ``xid`` or ``gpu_lost`` event from one kernel-log line, or ``None`` if it is neither.

    Accepts bare messages, ``dmesg`` lines with a ``[seconds]`` prefix and ``/dev/kmsg`` records
    with their ``priority,seq,usec,flags;`` prefix. ``pci_bus_id`` is as the driver printed it
    (``0000:3b:00``); the agent maps it to a GPU. ``ts`` is used as the event time.
    """
    text = line.strip()
    prefix = _KMSG_PREFIX_RE.match(text)
    text = text[prefix.end() :] if prefix else _DMESG_PREFIX_RE.sub("", text, count=1)
    if "NVRM:" not in text:
        return None
    m = _XID_RE.search(text)
    if m:
        detail = (m.group(3) or "").strip()
        return GpuEvent(
            type="xid",
            ts=ts,
            source="kmsg",
            pci_bus_id=m.group(1).lower(),
            xid=int(m.group(2)),
            message=detail[:MAX_MESSAGE] or None,
        )
    m = _LOST_RE.search(text)
    if m:
        return GpuEvent(
            type="gpu_lost",
            ts=ts,
            source="kmsg",
            pci_bus_id=m.group(1).lower(),
            message=text[text.index("NVRM:") :][:MAX_MESSAGE],
        )
    return None


def _boot_offset() -> float:
    """Unix time of boot, to turn a record's microseconds since boot into wall time."""
    return time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)


class KmsgReader:
    """Reads NVRM lines from ``/dev/kmsg`` (or a file/FIFO of log lines) without blocking the agent.

    ``open`` seeks to the end so old lines are not replayed. ``wait_events`` runs in one thread;
    ``close`` may be called from another and is honoured within about 0.1 s.
    """

    def __init__(self, path: str = "/dev/kmsg") -> None:
        self.path = path
        self.enabled = False
        self.overruns = 0  # times the kernel overwrote records before we read them (EPIPE)
        self.overlong = 0  # lines longer than MAX_LINE, dropped
        self._fd: int | None = None
        self._parts: list[bytes] = []  # the line being read, not yet ended by a newline
        self._pending = 0  # bytes in _parts
        self._skipping = False  # inside an overlong line: drop up to its newline
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._boot = _boot_offset()

    def open(self) -> None:
        """Open the log, positioned at its end. A missing or unreadable log disables the reader."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            log.warning("kernel log %s not readable (%s); XIDs come from NVML only", self.path, e.strerror)
            return
        try:
            os.lseek(fd, 0, os.SEEK_END)
        except OSError as e:
            if e.errno != errno.ESPIPE:  # a FIFO cannot seek; it has no past anyway
                os.close(fd)
                log.warning("kernel log %s: cannot seek to its end (%s); reader disabled", self.path, e)
                return
        self._fd = fd
        self.enabled = True
        self._closed.clear()

    def close(self) -> None:
        """Stop the reader (idempotent); wakes a thread in :meth:`wait_events`."""
        self._closed.set()
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            self.enabled = False

    def wait_events(self, timeout_s: float) -> list[GpuEvent]:
        """Block up to ``timeout_s`` for XID / GPU-lost lines; ``[]`` on timeout or when disabled."""
        deadline = time.monotonic() + max(0.0, timeout_s)
        while not self._closed.is_set():
            remaining = deadline - time.monotonic()
            with self._lock:
                if self._fd is None:
                    break
                events = self._poll_once(min(_SLICE_S, max(0.0, remaining)))
            if events:
                return events
            if remaining <= 0:
                return []
        self._closed.wait(max(0.0, deadline - time.monotonic()))
        return []

    def _poll_once(self, wait_s: float) -> list[GpuEvent]:
        assert self._fd is not None
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        ready = poller.poll(int(wait_s * 1000))
        events = self._drain() if ready else []
        if ready and not events and wait_s > 0:
            # A regular file or a FIFO without writer is always "ready" at EOF: do not spin.
            self._closed.wait(wait_s)
        return events

    def _drain(self) -> list[GpuEvent]:
        assert self._fd is not None
        events: list[GpuEvent] = []
        for _ in range(1024):  # bounded: one read per /dev/kmsg record
            try:
                chunk = os.read(self._fd, _READ_SIZE)
            except BlockingIOError:
                break
            except OSError as e:
                if e.errno == errno.EPIPE:  # records overwritten since our last read; go on
                    self.overruns += 1
                    log.warning("kernel log overrun: some records were lost before they were read")
                    continue
                log.warning("kernel log read failed (%s); reader disabled", e)
                os.close(self._fd)
                self._fd = None
                self.enabled = False
                break
            if not chunk:
                break
            events.extend(ev for raw in self._lines(chunk) if (ev := self._parse(raw)) is not None)
        return events

    def _lines(self, chunk: bytes) -> list[bytes]:
        """The lines ``chunk`` completes. Each byte is scanned once (a line without a newline
        is kept as parts, never re-split); a line longer than :data:`MAX_LINE` is dropped whole."""
        lines: list[bytes] = []
        start = 0
        while (nl := chunk.find(b"\n", start)) >= 0:
            piece = chunk[start:nl]
            start = nl + 1
            if self._skipping:
                self._skipping = False
            elif self._pending + len(piece) > MAX_LINE:
                self.overlong += 1
            else:
                lines.append(b"".join((*self._parts, piece)) if self._parts else piece)
            self._parts.clear()
            self._pending = 0
        rest = chunk[start:]
        if rest and not self._skipping:
            if self._pending + len(rest) > MAX_LINE:  # a runaway line: memory stays bounded
                self.overlong += 1
                self._skipping = True
                self._parts.clear()
                self._pending = 0
            else:
                self._parts.append(rest)
                self._pending += len(rest)
        return lines

    def _parse(self, raw: bytes) -> GpuEvent | None:
        if not raw or raw[:1] == b" " or b"NVRM" not in raw:  # kmsg continuation lines start with a space
            return None
        line = raw.decode("utf-8", errors="replace")
        m = _KMSG_PREFIX_RE.match(line)
        ts = self._boot + int(m.group(3)) / 1e6 if m else time.time()
        return parse_xid_line(line, ts)
