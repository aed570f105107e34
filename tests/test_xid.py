from __future__ import annotations

from pathlib import Path

import pytest

from shared import xid
from shared.errors import ConfigError

# The codes docs/reference.md and docs/health.md name, with the action and fatality they must carry.
EXPECTED = {
    13: ("restart_app", False),
    31: ("restart_app", False),
    43: ("ignore", False),
    45: ("ignore", False),
    46: ("reset_gpu", True),
    48: ("reset_gpu", True),
    62: ("reset_gpu", True),
    63: ("ignore", False),
    64: ("reset_gpu", True),
    74: ("reset_gpu", True),
    79: ("reboot", True),
    92: ("ignore", False),
    94: ("restart_app", False),
    95: ("reset_gpu", True),
    119: ("reset_gpu", True),
    120: ("reset_gpu", True),
    121: ("ignore", False),
    140: ("reset_gpu", True),
    154: ("follow_linked", False),
}


@pytest.mark.parametrize(("code", "expected"), sorted(EXPECTED.items()))
def test_packaged_catalogue(code: int, expected: tuple[str, bool]) -> None:
    info = xid.lookup(code)
    assert (info.action, info.fatal) == expected
    assert info.summary
    assert info.mnemonic != "UNKNOWN"


def test_dcgm_fail_codes_are_fatal() -> None:
    for info in xid.catalog().values():
        if info.dcgm == "fail":
            assert info.fatal, info


def test_unknown_code() -> None:
    info = xid.lookup(99999)
    assert info.mnemonic == "UNKNOWN"
    assert info.action == "contact_support"
    assert not info.fatal


def test_operator_override(tmp_path: Path) -> None:
    path = tmp_path / "xid.csv"
    path.write_text("code,mnemonic,action,fatal,dcgm,nvidia_bucket,summary\n13,GR,reboot,true,,X,custom\n")
    table = xid.catalog(path)
    assert xid.lookup(13, table).action == "reboot"
    assert xid.lookup(79, table).mnemonic == "UNKNOWN"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("x,y\n", "expected columns"),
        (
            "code,mnemonic,action,fatal,dcgm,nvidia_bucket,summary\nabc,M,ignore,false,,B,s\n",
            "not an integer",
        ),
        ("code,mnemonic,action,fatal,dcgm,nvidia_bucket,summary\n1,M,explode,false,,B,s\n", "action"),
        ("code,mnemonic,action,fatal,dcgm,nvidia_bucket,summary\n1,M,ignore,maybe,,B,s\n", "fatal"),
        ("code,mnemonic,action,fatal,dcgm,nvidia_bucket,summary\n1,M,ignore,false,meh,B,s\n", "dcgm"),
        (
            "code,mnemonic,action,fatal,dcgm,nvidia_bucket,summary\n1,M,ignore,false,,B,s\n1,M,ignore,false,,B,s\n",
            "dup",
        ),
    ],
)
def test_bad_catalogue(body: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        xid.parse_catalog(body, "test.csv")
