from __future__ import annotations

import contextlib
import math
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared import frames
from shared.errors import FrameDecodeError
from shared.frames import (
    EventFrame,
    InventoryFrame,
    SampleFrame,
    decode,
    decode_as,
    encode,
    encode_v1,
    from_wire,
    to_wire,
)
from tests.support import frame_fixtures as fx


@pytest.mark.parametrize("frame", [fx.sample(), fx.event(), fx.inventory(), fx.sample(gpus=0)])
def test_round_trip(frame: frames.Frame) -> None:
    data = encode(frame)
    assert decode(data) == frame
    assert decode_as(data, type(frame)) == frame


def test_wire_form_is_plain_msgpack_map_with_string_keys() -> None:
    """Version 1: every record a map (what agents of the previous release send)."""
    raw = msgpack.unpackb(encode_v1(fx.sample()), raw=False)
    assert raw["v"] == 1
    assert raw["kind"] == "sample"
    assert raw["gpus"][0]["temp_c"] == 64.0
    assert raw["gpus"][0]["retired_pages_sbe"] is None  # unavailable is nil, never a sentinel
    assert raw["gpus"][0]["processes"][0]["container"] == "job_1234"


def test_v2_wire_form_is_tables_of_columns() -> None:
    """Version 2: a sample's records as tables (names once, a column per field), constant
    columns as one value, all-default columns left out, static GPU facts left to the inventory."""
    f = fx.sample(gpus=3)
    f = frames.replace(f, gpus=(frames.replace(f.gpus[0], temp_c=70.5), *f.gpus[1:]))
    raw = msgpack.unpackb(encode(f, static=False), raw=False)
    assert raw["v"] == 2
    assert raw["kind"] == "sample"
    gpus = raw["gpus"]
    assert gpus["index"] == [0, 1, 2]  # the first column is always an array: the row count
    assert gpus["temp_c"] == [70.5, 64, 64]  # integral floats travel as integers
    assert gpus["util_gpu_pct"] == 87  # the same for every GPU: one value
    assert "fan_pct" not in gpus  # nil (the default) for every GPU: left out
    assert "ecc_dbe_volatile" not in gpus  # a counter left out is 0 for every GPU
    assert gpus["retired_pages_sbe"] is None  # so a counter nil for every GPU is sent as nil
    assert not set(frames.STATIC_GPU_FIELDS) & set(gpus)
    assert raw["processes"]["gpu"] == [0, 1, 2]
    assert raw["processes"]["container"] == "job_1234"
    assert raw["system"]["disks"]["mount"] == ["/"]
    back = decode(encode(f, static=False))
    assert isinstance(back, SampleFrame)
    assert back.gpus[0].temp_c == 70.5
    assert back.gpus[1].temp_c == 64.0
    assert back.gpus[0].uuid == ""  # static facts: joined from the inventory by the collector
    assert back.gpus[0].temp_slowdown_c is None
    assert back.gpus[2].processes == f.gpus[2].processes
    assert decode(encode(f)) == f  # with static=True (the default) a sample is whole


def _raw_sample(**over: Any) -> dict[str, Any]:
    raw: dict[str, Any] = to_wire(frames.replace(fx.sample(gpus=2), v=1))
    raw.update(over)
    return raw


def _v2_gpu_over(**over: Any) -> dict[str, Any]:
    raw: dict[str, Any] = msgpack.unpackb(encode(fx.sample(gpus=2)))
    for name, value in over.items():
        default = {f.name: f.default for f in frames.fields(frames.GpuSample)}[name]
        col = raw["gpus"].get(name, [default, default])
        col = list(col) if type(col) is list else [col, col]
        col[1] = value
        raw["gpus"][name] = col
    return raw


def _gpu_over(**over: Any) -> dict[str, Any]:
    raw = _raw_sample()
    raw["gpus"][1].update(over)
    return raw


def test_a_gpu_index_carried_twice_is_refused() -> None:
    """v2 names a process's GPU by its index: two GPUs of one index would get each other's
    processes on the way back (the fuzz test found the frame this way, an index deleted)."""
    twice = frames.replace(fx.sample(gpus=2), gpus=(fx.gpu(0), fx.gpu(0, temp_c=50.0)))
    for data in (encode(twice), encode_v1(twice), encode(twice, static=False)):
        with pytest.raises(FrameDecodeError) as err:
            decode(data)
        assert (err.value.reason, err.value.field) == ("out_of_range", "gpus[1].index")
    assert decode(encode(fx.sample(gpus=2))) == fx.sample(gpus=2)


def test_a_gpu_index_carried_twice_is_refused_also_when_another_gpu_is_dropped() -> None:
    """decode_partial drops a GPU entry that fails validation and keeps the rest: what it keeps
    is checked as a whole frame is, so two GPUs of one index are refused there too (the fuzz
    test's mutations found the frame with a bad third GPU beside a repeated index)."""
    v1 = _raw_sample()
    v1["gpus"] = [v1["gpus"][0], {**v1["gpus"][1], "index": 0}, {**v1["gpus"][1], "temp_c": "hot"}]
    v2: dict[str, Any] = msgpack.unpackb(encode(fx.sample(gpus=2)))
    cols = v2["gpus"]  # a column of three GPUs: a list grows by its last value, a folded one holds
    v2["gpus"] = {k: ([*c, c[-1]] if type(c) is list else c) for k, c in cols.items()}
    v2["gpus"].update(index=[0, 0, 1], temp_c=[60, 61, "hot"])
    for raw in (v1, v2):
        with pytest.raises(FrameDecodeError) as err:
            frames.decode_partial(msgpack.packb(raw))
        assert (err.value.reason, err.value.field) == ("out_of_range", "gpus[1].index")
    v1["gpus"][1]["index"] = 1  # the same frame without the repeat: the bad GPU alone is dropped
    kept, dropped = frames.decode_partial(msgpack.packb(v1))
    assert [g.index for g in kept.gpus] == [0, 1]
    assert [e.field for e in dropped] == ["gpus[2].temp_c"]


@pytest.mark.parametrize(
    ("raw", "reason", "field"),
    [
        (_raw_sample(v=3), "version", "v"),
        (_raw_sample(v="1"), "version", "v"),
        (_raw_sample(kind="metrics"), "unknown_kind", "kind"),
        (_raw_sample(host=7), "bad_type", "host"),
        ({k: v for k, v in _raw_sample().items() if k != "boot_id"}, "missing_field", "boot_id"),
        (_raw_sample(seq=-1), "out_of_range", "seq"),
        (_raw_sample(seq=True), "bad_type", "seq"),
        (_raw_sample(ts=math.inf), "out_of_range", "ts"),
        (_raw_sample(gpus={"0": {}}), "bad_type", "gpus"),
        (_gpu_over(temp_c=math.nan), "out_of_range", "gpus[1].temp_c"),
        (_gpu_over(temp_c="hot"), "bad_type", "gpus[1].temp_c"),
        (_gpu_over(util_gpu_pct=101.0), "out_of_range", "gpus[1].util_gpu_pct"),
        (_gpu_over(mem_used_bytes=-5), "out_of_range", "gpus[1].mem_used_bytes"),
        (_gpu_over(pcie_link_gen=17), "out_of_range", "gpus[1].pcie_link_gen"),
        (_gpu_over(ecc_dbe_volatile=-(1 << 63)), "out_of_range", "gpus[1].ecc_dbe_volatile"),
        (_gpu_over(lost="yes"), "bad_type", "gpus[1].lost"),
        (_gpu_over(index=0), "out_of_range", "gpus[1].index"),  # one entry per GPU
        (_gpu_over(processes=[{"pid": "x"}]), "bad_type", "gpus[1].processes[0].pid"),
        (_gpu_over(uuid="u" * 129), "too_long", "gpus[1].uuid"),
        (_raw_sample(boot_id="b" * 4000), "too_long", "boot_id"),
        (_raw_sample(system={"cpu_pct": 250.0}), "out_of_range", "system.cpu_pct"),
        (_raw_sample(system=[1, 2]), "bad_type", "system"),
        # the same checks in a v2 frame, whose GPU values are columns
        (_v2_gpu_over(temp_c=math.nan), "out_of_range", "gpus[1].temp_c"),
        (_v2_gpu_over(temp_c="hot"), "bad_type", "gpus[1].temp_c"),
        (_v2_gpu_over(uuid="u" * 129), "too_long", "gpus[1].uuid"),
        (_v2_gpu_over(lost="yes"), "bad_type", "gpus[1].lost"),
        ({**_v2_gpu_over(), "gpus": 5}, "bad_type", "gpus"),
        ({**_v2_gpu_over(), "gpus": {"index": [0, 1], "temp_c": [1]}}, "bad_type", "gpus.temp_c"),
        ({**_v2_gpu_over(), "seq": -1}, "out_of_range", "seq"),
    ],
)
def test_decode_rejects_naming_the_field(raw: dict[str, Any], reason: str, field: str) -> None:
    with pytest.raises(FrameDecodeError) as err:
        decode(msgpack.packb(raw))
    assert err.value.reason == reason
    assert err.value.field == field
    assert field in str(err.value)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "malformed"),
        (b"\xc1", "malformed"),
        (encode(fx.sample())[:-7], "malformed"),
        (msgpack.packb([1, 2, 3]), "not_a_map"),
        (msgpack.packb({1: 2}), "malformed"),  # non-string keys
        (b"\x00" * (frames.MAX_FRAME_BYTES + 1), "oversized"),
    ],
)
def test_decode_rejects_garbage(data: bytes, reason: str) -> None:
    with pytest.raises(FrameDecodeError) as err:
        decode(data)
    assert err.value.reason == reason


def test_unknown_newer_fields_are_ignored() -> None:
    raw = _gpu_over(fan_rpm=1200, future={"x": 1})
    raw["hint"] = "from a newer agent"
    frame = decode(msgpack.packb(raw))
    assert isinstance(frame, SampleFrame)
    assert frame.gpus[1].temp_c == 64.0


def test_missing_optional_fields_default_to_none() -> None:
    raw = {"v": 1, "kind": "sample", "host": "h", "provider": "p", "boot_id": "b", "seq": 1, "ts": 1.0}
    raw["gpus"] = [{"index": 0, "uuid": "GPU-0"}]
    frame = decode_as(msgpack.packb(raw), SampleFrame)
    assert frame.gpus[0].temp_c is None
    assert frame.system is None
    assert frame.gpus[0].processes == ()


def test_ints_are_accepted_for_float_fields() -> None:
    frame = decode_as(msgpack.packb(_gpu_over(temp_c=70)), SampleFrame)
    assert frame.gpus[1].temp_c == 70.0
    assert type(frame.gpus[1].temp_c) is float


def test_event_type_and_source_are_validated() -> None:
    raw = to_wire(fx.event())
    with pytest.raises(FrameDecodeError, match="unknown event type"):
        from_wire({**raw, "type": "meltdown"})
    with pytest.raises(FrameDecodeError, match="unknown event source"):
        from_wire({**raw, "source": "ouija"})


def test_decode_as_checks_kind() -> None:
    with pytest.raises(FrameDecodeError) as err:
        decode_as(encode(fx.event()), InventoryFrame)
    assert err.value.reason == "unknown_kind"
    assert isinstance(decode_as(encode(fx.event()), EventFrame), EventFrame)


_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(1 << 63), (1 << 64) - 1),
    st.floats(allow_nan=True),
    st.text(max_size=20),
    st.binary(max_size=20),
)
_values = st.recursive(
    _scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4)
)


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["v", "kind", "host", "gpus", "seq", "ts", "boot_id", "provider"]), _values
    )
)
def test_decode_never_raises_anything_but_frame_decode_error(raw: dict[str, Any]) -> None:
    with contextlib.suppress(FrameDecodeError):
        decode(msgpack.packb(raw, use_bin_type=True))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=256))
def test_random_bytes_never_crash(data: bytes) -> None:
    with contextlib.suppress(FrameDecodeError):
        decode(data)


def _deep(depth: int) -> Any:
    v: Any = 0
    for _ in range(depth):
        v = [v]
    return v


def test_v2_nesting_is_bounded() -> None:
    """A v2 frame builds only what the schema's types allow: a deep value in a known column is
    refused as too_deep (the refused frame's headers are scanned before anything is built);
    deep content under a key the schema does not know is skipped unread, never built."""
    raw: dict[str, Any] = msgpack.unpackb(encode(fx.sample(gpus=2), static=False))
    raw["gpus"]["temp_c"] = [_deep(frames.MAX_DEPTH + 3), 64]
    with pytest.raises(FrameDecodeError) as err:
        decode(msgpack.packb(raw))
    assert err.value.reason == "too_deep"
    raw = msgpack.unpackb(encode(fx.sample(gpus=2), static=False))
    raw["zz_newer_field"] = _deep(frames.MAX_DEPTH + 3)
    assert isinstance(decode(msgpack.packb(raw)), SampleFrame)
    raw["zz_newer_field"] = _deep(1000)  # deep enough to exhaust the decoder: refused by name
    with pytest.raises(FrameDecodeError) as err:
        decode(msgpack.packb(raw))
    assert err.value.reason == "too_deep"
