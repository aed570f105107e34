"""The fault-spec grammar and the fault schedule."""

from __future__ import annotations

import pytest

import agent.faults as faults_module
from agent.faults import FAULT_KINDS, GPU_KINDS, HOST_KINDS, KIND_SPECS, Fault, FaultSchedule, parse_fault
from shared.errors import EXIT_USAGE, ConfigError, FaultSpecError

GOOD = [
    # spec, host, gpu, kind, value, after_s, duration_s
    ("host-0003/gpu2:xid=79@10s", "host-0003", 2, "xid", 79, 10.0, None),
    ("gpu2:xid=79@10s", None, 2, "xid", 79, 10.0, None),
    ("xid=13@0s", None, None, "xid", 13, 0.0, None),
    ("*/gpu0:temp=95@1m+30s", "*", 0, "temp", 95.0, 60.0, 30.0),
    ("*:temp=-5.5@1s", "*", None, "temp", -5.5, 1.0, None),
    ("node-1:host_down@30s", "node-1", None, "host_down", None, 30.0, None),
    ("host_down@30s+2m", None, None, "host_down", None, 30.0, 120.0),
    ("gpu0:ecc_dbe@5s", None, 0, "ecc_dbe", None, 5.0, None),
    ("h/gpu3:ecc_sbe=120@2s+10s", "h", 3, "ecc_sbe", 120.0, 2.0, 10.0),
    ("h/gpu3:ecc_sbe=0.5@2s", "h", 3, "ecc_sbe", 0.5, 2.0, None),
    ("gpu1:throttle=hw_slowdown@1s", None, 1, "throttle", "hw_slowdown", 1.0, None),
    ("gpu1:throttle=hw_thermal@1s", None, 1, "throttle", "hw_thermal", 1.0, None),
    ("gpu1:throttle=sw_thermal@1s", None, 1, "throttle", "sw_thermal", 1.0, None),
    ("gpu1:throttle=power_brake@1s", None, 1, "throttle", "power_brake", 1.0, None),
    ("gpu1:throttle=sw_power@1s", None, 1, "throttle", "sw_power", 1.0, None),
    ("gpu7:lost@500ms+1.5s", None, 7, "lost", None, 0.5, 1.5),
    ("gpu0:power=850@3s", None, 0, "power", 850.0, 3.0, None),
    ("gpu0:pcie_replay=40@3s", None, 0, "pcie_replay", 40.0, 3.0, None),
    ("gpu0:nvlink_err@3s", None, 0, "nvlink_err", 250.0, 3.0, None),
    ("gpu0:nvlink_err=1000@3s", None, 0, "nvlink_err", 1000.0, 3.0, None),
    ("gpu0:nvlink_down@3s", None, 0, "nvlink_down", 1, 3.0, None),
    ("gpu0:nvlink_down=18@3s", None, 0, "nvlink_down", 18, 3.0, None),
    ("gpu0:row_remap_fail@3s", None, 0, "row_remap_fail", None, 3.0, None),
    ("gpu0:remap_pending@3s", None, 0, "remap_pending", None, 3.0, None),
    ("gpu0:retired_pages=63@3s", None, 0, "retired_pages", 63, 3.0, None),
    ("gpu0:recovery_action=2@3s", None, 0, "recovery_action", 2, 3.0, None),
    ("gpu0:mem_full@3s", None, 0, "mem_full", None, 3.0, None),
    ("gpu0:persistence_off@3s", None, 0, "persistence_off", None, 3.0, None),
    ("*:cpu=97.5@1h", "*", None, "cpu", 97.5, 3600.0, None),
    ("cpu=0@0s", None, None, "cpu", 0.0, 0.0, None),
    ("cpu=100@0s", None, None, "cpu", 100.0, 0.0, None),
    ("rack1-node7:disk_full@2m+1d", "rack1-node7", None, "disk_full", None, 120.0, 86400.0),
    ("gpu2/gpu0:lost@1s", "gpu2", 0, "lost", None, 1.0, None),  # a host called gpu2
    ("10.0.0.5/gpu1:xid=48@10", "10.0.0.5", 1, "xid", 48, 10.0, None),  # bare seconds
    ("  gpu1:xid=79@10s  ", None, 1, "xid", 79, 10.0, None),  # surrounding blanks
]


@pytest.mark.parametrize(("spec", "host", "gpu", "kind", "value", "after", "duration"), GOOD)
def test_good_specs(
    spec: str,
    host: str | None,
    gpu: int | None,
    kind: str,
    value: object,
    after: float,
    duration: float | None,
) -> None:
    f = parse_fault(spec)
    assert (f.spec, f.host, f.gpu, f.kind, f.value, f.after_s, f.duration_s) == (
        spec,
        host,
        gpu,
        kind,
        value,
        after,
        duration,
    )
    assert type(f.value) is type(value)


BAD = [
    ("", "empty fault spec"),
    ("   ", "empty fault spec"),
    ("gpu1:xid=79", "missing '@AFTER'"),
    ("h/gpu1:xdi=79@1s", "unknown fault kind 'xdi' (known: clock_skew, cpu, disk_full"),
    ("gpu1:@1s", "missing KIND"),
    ("@1s", "missing KIND"),
    ("gpu1:xid@1s", "fault kind 'xid' needs a value"),
    ("gpu1:xid=@1s", "bad xid value ''"),
    ("gpu1:xid=7.9@1s", "bad xid value '7.9': expected an integer"),
    ("gpu1:xid=abc@1s", "bad xid value 'abc'"),
    ("gpu1:xid=0@1s", "xid value 0 out of range [1, 65535]"),
    ("gpu1:xid=70000@1s", "out of range"),
    ("gpu1:temp@1s", "fault kind 'temp' needs a value"),
    ("gpu1:temp=hot@1s", "expected a number (degrees Celsius)"),
    ("gpu1:temp=nan@1s", "expected a finite number"),
    ("gpu1:temp=inf@1s", "finite number"),
    ("gpu1:temp=500@1s", "temp value 500 out of range [-40, 250]"),
    ("gpu1:ecc_dbe=3@1s", "fault kind 'ecc_dbe' takes no value"),
    ("gpu1:lost=1@1s", "fault kind 'lost' takes no value"),
    ("gpu1:ecc_sbe@1s", "fault kind 'ecc_sbe' needs a value"),
    ("gpu1:ecc_sbe=-1@1s", "out of range"),
    ("gpu1:throttle@1s", "needs a value: throttle=VALUE (one of hw_slowdown"),
    ("gpu1:throttle=thermal@1s", "bad throttle value 'thermal' (expected one of"),
    ("gpu1:power=-5@1s", "out of range"),
    ("gpu1:pcie_replay@1s", "needs a value"),
    ("gpu1:nvlink_down=0@1s", "out of range [1, 64]"),
    ("gpu1:retired_pages@1s", "needs a value"),
    ("gpu1:recovery_action=8@1s", "out of range [0, 7]"),
    ("gpu1:mem_full=99@1s", "takes no value"),
    ("h/gpu1:host_down@1s", "applies to a host, not a GPU: drop '/gpu1'"),
    ("gpu1:cpu=50@1s", "fault kind 'cpu' applies to a host"),
    ("gpu0:disk_full@1s", "fault kind 'disk_full' applies to a host"),
    ("cpu@1s", "fault kind 'cpu' needs a value"),
    ("cpu=101@1s", "cpu value 101 out of range [0, 100]"),
    ("cpu=-1@1s", "out of range"),
    ("host_down=1@1s", "takes no value"),
    ("gpu1:xid=79@", "empty AFTER"),
    ("gpu1:xid=79@soon", "bad AFTER 'soon'"),
    ("gpu1:xid=79@-5s", "bad AFTER"),
    ("gpu1:xid=79@10x", "bad AFTER '10x'"),
    ("gpu1:xid=79@10s+", "empty DURATION"),
    ("gpu1:xid=79@10s+0s", "DURATION must be positive"),
    ("gpu1:xid=79@10s+abc", "bad DURATION 'abc'"),
    ("gpu1:xid=79@1s@2s", "more than one '@'"),
    (":xid=79@1s", "empty HOST before ':'"),
    ("h/gpu:xid=79@1s", "bad target 'h/gpu'"),
    ("h/gpux:xid=79@1s", "bad target"),
    ("h/gpu1/gpu2:xid=79@1s", "bad target"),
    ("h/cpu1:xid=79@1s", "bad target"),
    ("a:b:xid=79@1s", "bad target 'a:b'"),
    ("h*:lost@1s", "'*' must stand alone"),
    ("h/gpu5000:lost@1s", "GPU index 5000 out of range"),
    ("gpu1:xid=79 @1s", "whitespace"),
    ("gpu1:x-y@1s", "bad fault kind 'x-y'"),
]


@pytest.mark.parametrize(("spec", "message"), BAD)
def test_bad_specs(spec: str, message: str) -> None:
    with pytest.raises(FaultSpecError) as info:
        parse_fault(spec)
    err = info.value
    assert message in str(err)
    assert err.spec == spec
    assert isinstance(err, ConfigError)
    assert err.exit_code == EXIT_USAGE
    assert repr(spec) in str(err)  # the message quotes the offending spec


def test_non_string_spec() -> None:
    with pytest.raises(FaultSpecError, match="must be a string"):
        parse_fault(42)  # type: ignore[arg-type]


def test_every_kind_is_documented_and_parsable() -> None:
    required = {
        "xid",
        "temp",
        "ecc_dbe",
        "ecc_sbe",
        "throttle",
        "lost",
        "power",
        "pcie_replay",
        "nvlink_err",
        "row_remap_fail",
        "mem_full",
        "host_down",
        "cpu",
        "disk_full",
    }
    assert required <= FAULT_KINDS
    assert GPU_KINDS | HOST_KINDS == FAULT_KINDS
    assert not GPU_KINDS & HOST_KINDS
    node = {"ib_down", "ib_rate", "ib_errors", "ib_flap", "sxid", "kmsg", "module_missing", "service_down"}
    node |= {"clock_skew", "fs_readonly", "dstate"}
    assert frozenset({"host_down", "cpu", "disk_full", "nvml_init_fail"} | node) == HOST_KINDS
    for kind, ks in KIND_SPECS.items():
        value = {
            "none": "",
            "int": "=1",
            "float": "=1.5",
            "choice": "=" + min(ks.choices or {"x"}),
            "name": "=nvidia-fabricmanager",
        }[ks.value]
        f = parse_fault(f"{kind}{value}@1s")
        assert f.kind == kind
        assert f"\n{kind} " in (faults_module.__doc__ or "")


@pytest.mark.parametrize(
    ("after", "duration", "t", "active"),
    [
        (10.0, None, 9.999, False),
        (10.0, None, 10.0, True),
        (10.0, None, 1e9, True),
        (10.0, 5.0, 14.999, True),
        (10.0, 5.0, 15.0, False),
        (0.0, 1.0, 0.0, True),
        (0.0, 1.0, -1.0, False),
    ],
)
def test_active_window(after: float, duration: float | None, t: float, active: bool) -> None:
    f = Fault("x", None, None, "lost", None, after, duration)
    assert f.active(t) is active


@pytest.mark.parametrize(
    ("after", "duration", "t", "overlap"),
    [(10.0, None, 5.0, 0.0), (10.0, None, 12.5, 2.5), (10.0, 5.0, 12.0, 2.0), (10.0, 5.0, 100.0, 5.0)],
)
def test_overlap(after: float, duration: float | None, t: float, overlap: float) -> None:
    assert Fault("x", None, None, "ecc_sbe", 1.0, after, duration).overlap(t) == overlap


@pytest.mark.parametrize(
    ("spec", "host", "matches"),
    [
        ("gpu1:lost@1s", "anything", True),
        ("*/gpu1:lost@1s", "anything", True),
        ("h1/gpu1:lost@1s", "h1", True),
        ("h1/gpu1:lost@1s", "h10", False),
        ("h1:host_down@1s", "H1", False),
    ],
)
def test_matches_host(spec: str, host: str, matches: bool) -> None:
    assert parse_fault(spec).matches_host(host) is matches


def test_schedule_queries() -> None:
    s = FaultSchedule.parse(
        [
            "h1/gpu0:xid=79@10s",
            "h2/gpu1:temp=95@5s+10s",
            "*:host_down@30s+5s",
            "h1:ecc_sbe=60@0s",  # every GPU of h1
            "cpu=90@1m",
        ]
    )
    assert len(s) == 5
    h1 = s.for_host("h1")
    assert [f.spec for f in h1.faults] == [
        "h1/gpu0:xid=79@10s",
        "*:host_down@30s+5s",
        "h1:ecc_sbe=60@0s",
        "cpu=90@1m",
    ]
    assert [f.spec for f in s.for_host("h3").faults] == ["*:host_down@30s+5s", "cpu=90@1m"]

    assert [f.kind for f in h1.active(0.0)] == ["ecc_sbe"]
    assert [f.kind for f in h1.active(10.0)] == ["xid", "ecc_sbe"]
    assert [f.kind for f in h1.active(10.0, gpu=0)] == ["xid", "ecc_sbe"]
    assert [f.kind for f in h1.active(10.0, gpu=1)] == ["ecc_sbe"]  # gpu None = every GPU
    assert [f.kind for f in h1.active(10.0, kind="xid")] == ["xid"]
    assert h1.active(10.0, kind="temp") == []
    assert [f.kind for f in s.active(6.0, kind="temp", gpu=1)] == ["temp"]
    assert [f.kind for f in h1.active(31.0)] == ["xid", "host_down", "ecc_sbe"]
    assert [f.kind for f in h1.active(61.0, gpu=3)] == ["ecc_sbe"]  # host-level faults left out
    assert [f.kind for f in h1.active(61.0, kind="cpu")] == ["cpu"]
    assert h1.active(61.0, kind="cpu", gpu=0) == []
    assert s.active(15.0, kind="temp") == []

    assert not s.host_down(29.9)
    assert s.host_down(30.0)
    assert s.host_down(34.9)
    assert not s.host_down(35.0)

    assert s.next_change_after(-1.0) == 0.0
    assert s.next_change_after(0.0) == 5.0
    assert s.next_change_after(5.0) == 10.0
    assert s.next_change_after(10.0) == 15.0
    assert s.next_change_after(15.0) == 30.0
    assert s.next_change_after(30.0) == 35.0
    assert s.next_change_after(35.0) == 60.0
    assert s.next_change_after(60.0) is None

    assert [f.kind for f in h1.for_gpu(1)] == ["ecc_sbe"]  # host kinds excluded
    assert [f.kind for f in h1.for_gpu(0)] == ["xid", "ecc_sbe"]
    assert [f.kind for f in s.of_kind("host_down")] == ["host_down"]


def test_empty_schedule() -> None:
    s = FaultSchedule()
    assert not s
    assert s.active(1.0) == []
    assert not s.host_down(1.0)
    assert s.next_change_after(0.0) is None
    assert s.for_host("x").faults == ()


def test_schedule_parse_reports_first_bad_spec() -> None:
    with pytest.raises(FaultSpecError) as info:
        FaultSchedule.parse(["gpu1:xid=79@1s", "gpu1:bogus@1s", "also bad"])
    assert info.value.spec == "gpu1:bogus@1s"


def test_fault_is_frozen() -> None:
    f = parse_fault("gpu1:xid=79@1s")
    with pytest.raises(AttributeError):
        f.kind = "temp"  # type: ignore[misc]


NODE_SPECS = [
    ("ib_down@1s", "ib_down", 0),
    ("ib_down=3@1s", "ib_down", 3),
    ("ib_rate=200@1s", "ib_rate", 200.0),
    ("ib_errors=60@1s", "ib_errors", 60.0),
    ("ib_flap@1s", "ib_flap", None),
    ("sxid=20034@1s", "sxid", 20034),
    ("kmsg=oom_kill@1s", "kmsg", "oom_kill"),
    ("module_missing=nvidia_peermem@1s", "module_missing", "nvidia_peermem"),
    ("service_down=nvidia-fabricmanager@1s", "service_down", "nvidia-fabricmanager"),
    ("clock_skew=-2.5@1s", "clock_skew", -2.5),
    ("fs_readonly@1s", "fs_readonly", None),
    ("dstate=3@1s", "dstate", 3),
]


@pytest.mark.parametrize(("spec", "kind", "value"), NODE_SPECS)
def test_node_fault_kinds_parse(spec: str, kind: str, value: object) -> None:
    f = parse_fault(spec)
    assert (f.kind, f.value, f.gpu) == (kind, value, None)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("kmsg=bogus@1s", "bad kmsg value 'bogus' (expected one of aer_corrected"),
        ("kmsg@1s", "fault kind 'kmsg' needs a value"),
        ("service_down=a/b@1s", "bad service_down value 'a/b'"),
        ("module_missing@1s", "fault kind 'module_missing' needs a value"),
        ("ib_down=64@1s", "ib_down value 64 out of range [0, 63]"),
        ("h/gpu1:dstate=3@1s", "fault kind 'dstate' applies to a host, not a GPU"),
        ("ib_flap=1@1s", "fault kind 'ib_flap' takes no value"),
    ],
)
def test_bad_node_fault_specs(spec: str, message: str) -> None:
    with pytest.raises(FaultSpecError) as e:
        parse_fault(spec)
    assert message in str(e.value)


def test_kmsg_fault_classes_are_the_readers_classes() -> None:
    from agent.faults import KMSG_CLASSES
    from agent.kmsg import CLASS_NAMES

    assert CLASS_NAMES - {"sxid"} == KMSG_CLASSES
