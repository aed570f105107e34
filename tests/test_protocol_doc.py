"""docs/protocol.md is the public contract: it must name every field, and its subscriber must work."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import nats
import pytest

from shared import frames
from shared.frames import encode, encode_v1, replace
from shared.subjects import event_subject, sample_subject
from tests.support import frame_fixtures as fx
from tests.support.wait import until

DOC = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"


@pytest.mark.parametrize("cls", frames._RECORDS, ids=lambda c: c.__name__)
def test_every_field_is_documented(cls: type) -> None:
    text = DOC.read_text()
    section = text.split(f"### {cls.__name__}\n", 1)
    body = section[1].split("\n### ", 1)[0] if len(section) == 2 else text
    for field in frames.fields(cls):
        if cls in (frames.EventFrame, frames.InventoryFrame) and field.name in (
            "host",
            "provider",
            "boot_id",
            "seq",
            "ts",
            "v",
        ):
            continue
        assert f"| `{field.name}` |" in body or f"| `{field.name}` |" in text.split("Then, by `kind`")[0], (
            field.name
        )


def _snippet() -> str:
    match = re.search(r"```python\n(.*?)```", DOC.read_text(), re.S)
    assert match
    return match.group(1)


def test_subscriber_snippet_is_short() -> None:
    assert len([line for line in _snippet().splitlines() if line.strip()]) <= 15


async def test_subscriber_snippet_taps_raw_frames(
    nats_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    opened = []
    real_connect = nats.connect

    async def recording_connect(*args: object, **kwargs: object) -> object:
        nc = await real_connect(*args, **kwargs)  # type: ignore[arg-type]
        opened.append(nc)
        return nc

    monkeypatch.setattr(nats, "connect", recording_connect)
    code = _snippet().replace("asyncio.run(main())", "")
    scope: dict[str, object] = {}
    exec(compile(code, "protocol.md", "exec"), scope)  # noqa: S102 - the documented snippet itself
    task = asyncio.create_task(scope["main"](nats_url))  # type: ignore[operator]
    wanted = (
        "gpuwarden.v1.sample.acme-east.gpu-node-17 2 sample 7 None [70.5, 64, 64]",  # v2, as the agent sends
        "gpuwarden.v1.event.acme-east.gpu-node-17 2 event 8 79 []",
        "gpuwarden.v1.sample.acme-east.gpu-node-17 1 sample 9 None [70.5, 64.0, 64.0]",  # v1, older agents
    )
    await until(lambda: bool(opened and getattr(opened[0], "_subs", None)), 20, "the snippet's subscription")
    await opened[0].flush()  # and the server has its subscription
    nc = await real_connect(nats_url)
    three = fx.sample(seq=7, gpus=3)
    three = replace(three, gpus=(replace(three.gpus[0], temp_c=70.5), *three.gpus[1:]))
    await nc.publish(sample_subject("acme-east", "gpu-node-17"), encode(three, static=False))
    await nc.publish(event_subject("acme-east", "gpu-node-17"), encode(fx.event(seq=8)))
    await nc.publish(sample_subject("acme-east", "gpu-node-17"), encode_v1(replace(three, seq=9)))
    await nc.flush()
    out = ""

    def printed() -> bool:  # by the snippet
        nonlocal out
        out += capsys.readouterr().out
        return all(w in out for w in wanted)

    await until(printed, 20, "the snippet's output")
    task.cancel()
    await nc.close()
    for tapped in opened:
        await tapped.close()
    for w in wanted:
        assert w in out


_POWERS = {(1 << 64) - 1: "2⁶⁴−1", 1 << 53: "2⁵³", 1 << 32: "2³²", 1 << 20: "2²⁰"}


def _shown(x: float) -> str:
    return _POWERS.get(int(x), f"{x:g}") if float(x).is_integer() and x >= 1 << 20 else f"{x:g}"


@pytest.mark.parametrize("cls", frames._RECORDS, ids=lambda c: c.__name__)
def test_every_range_is_the_schemas(cls: type) -> None:
    """The range column of each numeric field is the schema's Meta constraint (ge, le)."""
    text = DOC.read_text()
    header = text.split("Then, by `kind`")[0]
    section = text.split(f"\n### {cls.__name__}\n", 1)[-1].split("\n### ", 1)[0]
    for f in frames.fields(cls):
        if "range" not in f.metadata:
            continue
        where = header if f.name in ("seq", "ts") else section
        row = where.split(f"| `{f.name}` | ", 1)[1].split("\n", 1)[0]
        lo, hi = f.metadata["range"]
        assert f"{_shown(lo)} … {_shown(hi)}" in row, (cls.__name__, f.name, row)
