"""Kernel-log reader: NVIDIA driver XID lines and "fallen off the bus" messages from ``/dev/kmsg``,
and counts of the other kernel-log classes a GPU node cares about.

Some GPU failures show in the kernel log before, or instead of, the NVML event set, so the
agent reads both and :class:`agent.events.EventTracker` removes the duplicates. XID lines are
returned at once (the agent publishes them as urgent events). Every other line is matched
against :data:`CLASSES` (NVMe timeouts and resets, file-system errors and read-only remounts,
OOM kills, hung tasks, soft lockups, MCE/CPER hardware errors, PCIe AER, mlx5 errors,
``nvidia-peermem`` failures, NVSwitch SXids) only when a cheap byte pre-filter says it might
be one, and counted; :meth:`KmsgReader.counts` gives the running counts for the next sample.

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
from shared.frames import KernelLogCount

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


# Kernel-log classes: name -> patterns (searched in the message without its kmsg/dmesg prefix).
# Each pattern matches one line per occurrence (an OOM kill, not the dozen lines around it).
CLASSES: Final[tuple[tuple[str, re.Pattern[str]], ...]] = (
    ("nvme_timeout", re.compile(r"nvme nvme\d+: I/O (?:tag )?\d+ (?:\(\w+\) )?QID \d+ timeout")),
    (
        "nvme_reset",
        re.compile(
            r"nvme nvme\d+: (?:Disabling device after reset failure|Removing after probe failure"
            r"|controller is down; will reset|Device not ready; aborting reset)"
        ),
    ),
    (
        "fs_readonly",
        re.compile(r"Remounting filesystem read-only|XFS \([^)]+\): .*Shutting down filesystem"),
    ),
    (
        "fs_error",
        re.compile(
            r"EXT4-fs error \(device|XFS \([^)]+\): (?:Metadata corruption detected|Corruption detected"
            r"|metadata I/O error|log I/O error)|Buffer I/O error on dev"
        ),
    ),
    ("oom_kill", re.compile(r"(?:Out of memory|Memory cgroup out of memory): Killed process \d+")),
    ("hung_task", re.compile(r"task \S+:\d+ blocked for more than \d+ seconds")),
    ("soft_lockup", re.compile(r"soft lockup - CPU#\d+ stuck for|Watchdog detected hard LOCKUP on cpu")),
    (
        "mce",
        re.compile(
            r"mce: \[Hardware Error\]: Machine check events logged"
            r"|\[Hardware Error\]: Hardware error from APEI Generic Hardware Error Source"
        ),
    ),
    ("aer_uncorrected", re.compile(r"AER: (?:Multiple )?Uncorrect(?:ed|able) \((?:Non-)?Fatal\) error")),
    ("aer_corrected", re.compile(r"AER: (?:Multiple )?Correct(?:ed|able) error (?:message )?received")),
    (
        "mlx5_error",
        re.compile(
            r"mlx5_cmd_out_err.*failed|Port module event\[error\]"
            r"|Detected insufficient power on the PCIe slot"
            r"|mlx5_core \S+: .*(?:health compromised|FW fatal|firmware internal error)"
        ),
    ),
    ("peermem", re.compile(r"nvidia[-_]peermem\b.*(?:ERROR|[Ee]rror|[Ff]ail|Unknown symbol)")),
)
CLASS_NAMES: Final = frozenset(name for name, _ in CLASSES) | {"sxid"}
_SXID_RE: Final = re.compile(r"nvidia-nvswitch\d*: SXid \(" + _PCI + r"\): (\d+), (.*)$")
# Bytes any class line contains: lines without one are skipped before decoding.
_PREFILTER: Final = re.compile(
    rb"nvme|EXT4-fs|XFS|Buffer I/O|illed process|blocked for more|lockup|LOCKUP|Hardware Error|AER:"
    rb"|mlx5|Port module|insufficient power|peermem|SXid|read-only"
)
MAX_CLASS_KEYS: Final = 256  # (class, SXid code) pairs counted; more are dropped (and counted)


def classify_line(line: str) -> tuple[str, int | None, bool | None, str] | None:
    """``(class, sxid_code, fatal, message)`` of a non-XID kernel-log line, or ``None``.

    ``fatal`` is what an SXid line says (``Fatal`` / ``Non-fatal``), else ``None``. SXid
    ``Data {…}`` and ``Severity …`` lines (details of an SXid already counted) return ``None``.
    """
    text = line.strip()
    prefix = _KMSG_PREFIX_RE.match(text)
    text = text[prefix.end() :] if prefix else _DMESG_PREFIX_RE.sub("", text, count=1)
    if "SXid" in text:
        m = _SXID_RE.search(text)
        if m is None:
            return None
        detail = m.group(3).strip()
        if detail.startswith(("Data {", "Severity ")):
            return None
        fatal = True if detail.startswith("Fatal") else False if detail.startswith("Non-fatal") else None
        return "sxid", int(m.group(2)), fatal, text[text.index("nvidia-nvswitch") :][:MAX_MESSAGE]
    for name, pattern in CLASSES:
        if pattern.search(text):
            return name, None, None, text[:MAX_MESSAGE]
    return None


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
        self._counts: dict[tuple[str, int | None], KernelLogCount] = {}
        self._counts_lock = threading.Lock()
        self.dropped_classes = 0  # lines of a class not counted because MAX_CLASS_KEYS was reached

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

    def counts(self) -> tuple[KernelLogCount, ...]:
        """The classes seen since :meth:`open`, with running counts (safe from any thread)."""
        with self._counts_lock:
            return tuple(self._counts[k] for k in sorted(self._counts, key=lambda k: (k[0], k[1] or 0)))

    def count_line(self, line: str) -> None:
        """Count one kernel-log line if it is of a class (also used by tests and replay)."""
        found = classify_line(line)
        if found is None:
            return
        name, code, fatal, message = found
        key = (name, code)
        with self._counts_lock:
            old = self._counts.get(key)
            if old is None:
                if len(self._counts) >= MAX_CLASS_KEYS:
                    self.dropped_classes += 1
                    return
                old = KernelLogCount(name=name, code=code)
            self._counts[key] = KernelLogCount(
                name=name,
                code=code,
                count=old.count + 1,
                fatal=fatal if fatal is not None else old.fatal,
                last_message=message,
            )

    def _parse(self, raw: bytes) -> GpuEvent | None:
        if not raw or raw[:1] == b" ":  # kmsg continuation lines start with a space
            return None
        if b"NVRM" not in raw:
            if _PREFILTER.search(raw):
                self.count_line(raw.decode("utf-8", errors="replace"))
            return None
        line = raw.decode("utf-8", errors="replace")
        m = _KMSG_PREFIX_RE.match(line)
        ts = self._boot + int(m.group(3)) / 1e6 if m else time.time()
        return parse_xid_line(line, ts)
