"""Kernel-log XID parsing (pure); KmsgReader on a regular file and a real FIFO standing in for /dev/kmsg."""

from __future__ import annotations

import logging
import os
import threading
import time
import tracemalloc
from pathlib import Path

import pytest

from agent.gpu.base import GpuEvent
from agent.kmsg import CLASS_NAMES, MAX_CLASS_KEYS, KmsgReader, classify_line, parse_xid_line

XID79 = "NVRM: Xid (PCI:0000:3b:00): 79, pid=1234, name=python, GPU has fallen off the bus."
XID13 = (
    "NVRM: Xid (PCI:0000:3b:00): 13, Graphics SM Warp Exception on (GPC 0, TPC 1, SM 0): Out Of Range Address"
)


@pytest.mark.parametrize(
    ("line", "kind", "bus", "xid", "message"),
    [
        (XID79, "xid", "0000:3b:00", 79, "pid=1234, name=python, GPU has fallen off the bus."),
        (XID13, "xid", "0000:3b:00", 13, XID13.split(": 13, ")[1]),
        (
            f"6,1234,5678901,-;{XID79}",
            "xid",
            "0000:3b:00",
            79,
            "pid=1234, name=python, GPU has fallen off the bus.",
        ),
        (f"[ 1234.567890] {XID13}", "xid", "0000:3b:00", 13, XID13.split(": 13, ")[1]),
        (
            "kernel: NVRM: Xid (PCI:0000:9B:00): 154, "
            "GPU recovery action changed from 0x0 (None) to 0x1 (Reset)",
            "xid",
            "0000:9b:00",
            154,
            "GPU recovery action changed from 0x0 (None) to 0x1 (Reset)",
        ),
        ("NVRM: Xid (PCI:0000:18:00): 48", "xid", "0000:18:00", 48, None),
        ("NVRM: GPU at PCI:0000:3b:00: GPU has fallen off the bus.", "gpu_lost", "0000:3b:00", None, None),
        (
            "3,99,1,-;NVRM: GPU 0000:3b:00.0: GPU has fallen off the bus.",
            "gpu_lost",
            "0000:3b:00.0",
            None,
            None,
        ),
    ],
)
def test_parse_xid_line(line: str, kind: str, bus: str, xid: int | None, message: str | None) -> None:
    ev = parse_xid_line(line, 1234.5)
    assert ev is not None
    assert (ev.type, ev.source, ev.pci_bus_id, ev.xid, ev.ts) == (kind, "kmsg", bus, xid, 1234.5)
    assert ev.gpu_index is None
    if kind == "xid":
        assert ev.message == message
    else:
        assert ev.message is not None
        assert "fallen off the bus" in ev.message


@pytest.mark.parametrize(
    "line",
    [
        "",
        "NVRM: loading NVIDIA UNIX x86_64 Kernel Module  570.133.20",
        "nvidia-nvswitch0: SXid (PCI:0000:05:00.0): 12028, Non-fatal, Link 32 egress non-posted PRIV error",
        "Xid (PCI:0000:3b:00): 79 without the NVRM tag",
        "NVRM: Xid (PCI:0000:3b:00): not-a-number, junk",
        "6,1,2,-;usb 1-1: new high-speed USB device",
    ],
)
def test_parse_ignores_other_lines(line: str) -> None:
    assert parse_xid_line(line, 0.0) is None


def test_message_is_bounded() -> None:
    ev = parse_xid_line(XID13 + "x" * 5000, 0.0)
    assert ev is not None
    assert ev.message is not None
    assert len(ev.message) <= 512


def collect(reader: KmsgReader, want: int, timeout_s: float = 10.0) -> list[GpuEvent]:
    events: list[GpuEvent] = []
    deadline = time.monotonic() + timeout_s
    while len(events) < want and time.monotonic() < deadline:
        events += reader.wait_events(0.5)
    return events


def test_regular_file_skips_old_lines(tmp_path: Path) -> None:
    log = tmp_path / "kmsg"
    log.write_text(f"{XID79}\n")  # before open: must not be replayed
    reader = KmsgReader(str(log))
    reader.open()
    assert reader.enabled
    assert reader.wait_events(0.2) == []
    with log.open("a") as f:
        f.write("some other kernel line\n")
        f.write(f"6,2000,3000000,-;{XID13}\n SUBSYSTEM=pci\n DEVICE=+pci:0000:3b:00.0\n")
        f.write("NVRM: GPU at PCI:0000:3b:00: GPU has fallen off the bus.\n")
    events = collect(reader, 2)
    assert [(e.type, e.xid) for e in events] == [("xid", 13), ("gpu_lost", None)]
    boot = time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)
    assert events[0].ts == pytest.approx(boot + 3.0, abs=1.0)  # from the record's usec since boot
    reader.close()
    reader.close()


def test_partial_line_waits_for_its_newline(tmp_path: Path) -> None:
    log = tmp_path / "kmsg"
    log.write_text("")
    reader = KmsgReader(str(log))
    reader.open()
    with log.open("a") as f:
        f.write(XID79[:20])
    assert reader.wait_events(0.2) == []
    with log.open("a") as f:
        f.write(XID79[20:] + "\n")
    assert [e.xid for e in collect(reader, 1)] == [79]
    reader.close()


def test_line_without_newline_is_bounded_and_never_re_split(tmp_path: Path) -> None:
    """2 MB without a newline, then an XID inside its tail: kept in bounded memory, not re-split
    (the old reader appended each 8 KB read to the whole pending line and split all of it again:
    quadratic work, and the pending line grew to the size of the read), and dropped whole."""
    log = tmp_path / "kmsg"
    log.write_text("")
    reader = KmsgReader(str(log))
    reader.open()
    with log.open("a") as f:
        f.write("x" * (2 << 20) + f" {XID79}\n{XID13}\n")
    tracemalloc.start()
    try:
        events = collect(reader, 1)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [e.xid for e in events] == [13]  # the overlong line's tail is no line of its own
    assert reader.overlong == 1
    assert peak < 256 * 1024, f"reading one runaway line held {peak} bytes"
    reader.close()


def test_line_read_in_many_pieces_is_parsed_whole(tmp_path: Path) -> None:
    log = tmp_path / "kmsg"
    log.write_text("")
    reader = KmsgReader(str(log))
    reader.open()
    record = f"6,7,8,-;{XID13}\n"
    events: list[GpuEvent] = []
    for i in range(0, len(record), 7):
        with log.open("a") as f:
            f.write(record[i : i + 7])
        events += reader.wait_events(0.0)  # each piece is read on its own
    events += collect(reader, 1 - len(events))
    assert [e.xid for e in events] == [13]
    assert reader.overlong == 0
    reader.close()


@pytest.fixture
def fifo(tmp_path: Path) -> str:
    path = tmp_path / "kmsg.fifo"
    os.mkfifo(path)
    return str(path)


def test_fifo_records(fifo: str) -> None:
    reader = KmsgReader(fifo)
    reader.open()
    assert reader.enabled
    assert reader.wait_events(0.1) == []  # no writer yet: not an error, no spin
    wfd = os.open(fifo, os.O_WRONLY)
    try:
        os.write(wfd, f"4,10,100,-;{XID79}\n".encode())
        os.write(wfd, f"4,11,200,-;{XID13}\n".encode())
        events = collect(reader, 2)
    finally:
        os.close(wfd)
    assert [(e.xid, e.pci_bus_id) for e in events] == [(79, "0000:3b:00"), (13, "0000:3b:00")]
    assert reader.wait_events(0.1) == []  # writer gone (POLLHUP): still quiet
    reader.close()


def test_close_wakes_a_waiting_thread(fifo: str) -> None:
    reader = KmsgReader(fifo)
    reader.open()
    result: list[list[GpuEvent]] = []
    t = threading.Thread(target=lambda: result.append(reader.wait_events(60.0)))
    t.start()
    time.sleep(0.05)
    reader.close()
    t.join(10.0)
    assert not t.is_alive()
    assert result == [[]]


def test_missing_log_disables_reader(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    reader = KmsgReader(str(tmp_path / "absent"))
    with caplog.at_level(logging.WARNING, logger="agent.kmsg"):
        reader.open()
        assert not reader.enabled
        assert reader.wait_events(0.05) == []
        assert reader.wait_events(0.05) == []
    assert len([r for r in caplog.records if "not readable" in r.getMessage()]) == 1
    reader.close()


def test_read_failure_disables_reader(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    reader = KmsgReader(str(tmp_path))  # a directory opens, but read() fails with EISDIR
    reader.open()
    with caplog.at_level(logging.WARNING, logger="agent.kmsg"):
        assert reader.wait_events(0.2) == []
    assert not reader.enabled
    assert any("reader disabled" in r.getMessage() for r in caplog.records)
    assert reader.wait_events(0.05) == []
    reader.close()


def test_real_dev_kmsg_when_readable() -> None:
    if not os.access("/dev/kmsg", os.R_OK):
        pytest.skip("/dev/kmsg not readable here")
    reader = KmsgReader()
    reader.open()
    assert reader.enabled  # a character device: seek to the end works, nothing old is replayed
    events = reader.wait_events(0.2)
    assert all(e.source == "kmsg" for e in events)
    reader.close()
    assert not reader.enabled


# ----------------------------------------------------------------------------- kernel-log classes

NODE_LOG = Path(__file__).parent / "data" / "kmsg-node.log"  # real lines, sources in tests/data/README.md
# The class of each line of NODE_LOG (None: no class, or an NVRM line for the XID path).
NODE_LOG_CLASSES: list[tuple[str, int | None, bool | None] | None] = [
    ("nvme_timeout", None, None),
    None,
    ("nvme_timeout", None, None),
    ("nvme_reset", None, None),
    ("nvme_reset", None, None),
    None,
    ("fs_error", None, None),
    None,
    ("fs_readonly", None, None),
    ("fs_error", None, None),
    None,
    ("oom_kill", None, None),
    None,  # the OOM reaper's line: one OOM is counted once
    ("hung_task", None, None),
    ("soft_lockup", None, None),
    ("mce", None, None),
    None,
    ("mce", None, None),
    None,
    ("aer_corrected", None, None),
    None,
    ("aer_corrected", None, None),
    ("aer_uncorrected", None, None),
    None,
    ("mlx5_error", None, None),
    None,  # an mlx5 line that passes the pre-filter and is no error (a cable plugged)
    ("peermem", None, None),
    None,
    ("sxid", 22013, False),
    None,
    ("sxid", 22013, False),
    None,
    None,
    None,
]


def test_every_real_line_gets_its_class() -> None:
    lines = NODE_LOG.read_text().splitlines()
    assert len(lines) == len(NODE_LOG_CLASSES)
    for line, want in zip(lines, NODE_LOG_CLASSES, strict=True):
        got = classify_line(line)
        assert (got[:3] if got else None) == want, line
    assert {c[0] for c in NODE_LOG_CLASSES if c} == CLASS_NAMES  # every class has a real line


def test_sxid_line_says_fatal_and_keeps_the_switch() -> None:
    line = "[ 6781753.4] nvidia-nvswitch1: SXid (PCI:0000:06:00.0): 20034, Fatal, Link 28 LTSSM Fault Up"
    got = classify_line(line)
    assert got == ("sxid", 20034, True, line.split("] ", 1)[1])


def test_xid_lines_are_not_classes_and_class_lines_are_not_xids() -> None:
    for line in NODE_LOG.read_text().splitlines():
        if "NVRM" in line:
            assert classify_line(line) is None
        elif classify_line(line) is not None:
            assert parse_xid_line(line, 1.0) is None


def test_reader_counts_classes_and_still_returns_xids_at_once(tmp_path: Path) -> None:
    """The one reader: the XID line comes back from wait_events (urgent path), every class
    line is counted for the next sample, SXid detail lines are not counted twice."""
    log = tmp_path / "kmsg"
    log.write_text("")
    reader = KmsgReader(str(log))
    reader.open()
    with log.open("a") as f:
        f.write(NODE_LOG.read_text())
    events = collect(reader, 1)
    assert [(e.type, e.xid, e.pci_bus_id) for e in events] == [("xid", 79, "0000:44:00")]
    counts = {(c.name, c.code): c for c in reader.counts()}
    want: dict[tuple[str, int | None], int] = {}
    for c in NODE_LOG_CLASSES:
        if c:
            want[(c[0], c[1])] = want.get((c[0], c[1]), 0) + 1
    assert {k: c.count for k, c in counts.items()} == want
    sx = counts[("sxid", 22013)]
    assert sx.fatal is False
    assert "Link 45" in (sx.last_message or "")
    reader.close()


def test_reader_counts_are_bounded() -> None:
    reader = KmsgReader("/nonexistent")
    for code in range(MAX_CLASS_KEYS + 10):
        reader.count_line(f"nvidia-nvswitch0: SXid (PCI:0000:05:00.0): {code + 1}, Non-fatal, x")
    assert len(reader.counts()) == MAX_CLASS_KEYS
    assert reader.dropped_classes == 10
