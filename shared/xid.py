"""The XID catalogue: what each NVIDIA XID code means and what to do about it.

The table is data (``xid_catalog.csv`` beside this module, from NVIDIA's XID catalogue and
its machine-readable bucket CSV in NVIDIA/NVSentinel), so it can be updated without a code
change. Columns: ``code``, ``mnemonic``, ``action`` (one of :data:`ACTIONS`), ``fatal``,
``dcgm`` (``warn``/``fail``/empty: DCGM health verdict), ``nvidia_bucket`` (NVIDIA's
original resolution bucket), ``summary`` (one line saying what to do).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Final

from shared.csvtable import coded_rows
from shared.errors import ConfigError

ACTIONS: Final = frozenset(
    {"restart_app", "reset_gpu", "reboot", "ignore", "contact_support", "follow_linked"}
)
_COLUMNS: Final = ("code", "mnemonic", "action", "fatal", "dcgm", "nvidia_bucket", "summary")


@dataclass(frozen=True, slots=True)
class XidInfo:
    code: int
    mnemonic: str
    action: str  # one of ACTIONS
    fatal: bool
    dcgm: str | None  # "warn", "fail" or None
    nvidia_bucket: str
    summary: str


def unknown_xid(code: int) -> XidInfo:
    """What an XID missing from the catalogue is taken to be: non-fatal, contact support."""
    return XidInfo(
        code=code,
        mnemonic="UNKNOWN",
        action="contact_support",
        fatal=False,
        dcgm=None,
        nvidia_bucket="UNEXPECTED_ERR_REPORT_ISSUE",
        summary=f"XID {code} is not in the catalogue; collect nvidia-bug-report.sh and contact support",
    )


def parse_catalog(text: str, source: str = "xid catalogue") -> dict[int, XidInfo]:
    """Parse catalogue CSV text. Raises :class:`ConfigError` naming the bad row."""
    table: dict[int, XidInfo] = {}
    for where, code, row in coded_rows(text, source, _COLUMNS):
        if row["action"] not in ACTIONS:
            raise ConfigError(where, f"action {row['action']!r} is not one of {sorted(ACTIONS)}")
        if row["fatal"] not in ("true", "false"):
            raise ConfigError(where, f"fatal must be true or false, got {row['fatal']!r}")
        if row["dcgm"] not in ("", "warn", "fail"):
            raise ConfigError(where, f"dcgm must be warn, fail or empty, got {row['dcgm']!r}")
        table[code] = XidInfo(
            code=code,
            mnemonic=row["mnemonic"],
            action=row["action"],
            fatal=row["fatal"] == "true",
            dcgm=row["dcgm"] or None,
            nvidia_bucket=row["nvidia_bucket"],
            summary=row["summary"],
        )
    return table


@cache
def catalog(path: Path | None = None) -> dict[int, XidInfo]:
    """The catalogue: the packaged table, or the CSV at ``path`` (an operator's override)."""
    if path is not None:
        return parse_catalog(path.read_text(encoding="utf-8"), str(path))
    text = resources.files("shared").joinpath("xid_catalog.csv").read_text(encoding="utf-8")
    return parse_catalog(text, "shared/xid_catalog.csv")


def lookup(code: int, table: dict[int, XidInfo] | None = None) -> XidInfo:
    """Classification of ``code``; unknown codes get :func:`unknown_xid`."""
    info = (table if table is not None else catalog()).get(code)
    return info if info is not None else unknown_xid(code)
