"""The SXid catalogue: NVSwitch errors (``nvidia-nvswitchN: SXid (PCI:…): CODE, …`` kernel lines).

The table is data (``sxid_catalog.csv`` beside this module). NVIDIA documents the SXid codes and
their severities (non-fatal, fatal, always fatal) in the *Fabric Manager User Guide*
(docs.nvidia.com/datacenter/tesla/fabric-manager-user-guide/), which is where an operator should
look a code up. The packaged catalogue is deliberately small: it holds only codes whose severity
we can cite from a public source, namely the NVSwitch driver's own line for that code as
published (the ``source`` column says where). Columns: ``code``, ``name``, ``severity`` (one of
:data:`SEVERITIES`), ``action`` (one of :data:`ACTIONS`), ``source`` and ``summary`` (one line
saying what to do).

The driver itself prints ``Fatal`` or ``Non-fatal`` on most SXid lines; where it does, that word
decides (:func:`is_fatal`). The catalogue decides only for lines without the word (the ``Data``
and ``Severity`` detail lines); a code missing from it is non-fatal unless its line says
``Fatal`` (:func:`unknown_sxid`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Final

from shared.csvtable import coded_rows
from shared.errors import ConfigError

SEVERITIES: Final = frozenset({"non_fatal", "fatal", "always_fatal"})
ACTIONS: Final = frozenset({"monitor", "reset_fabric", "reboot"})
_COLUMNS: Final = ("code", "name", "severity", "action", "source", "summary")


@dataclass(frozen=True, slots=True)
class SxidInfo:
    code: int
    name: str
    severity: str  # one of SEVERITIES
    action: str  # one of ACTIONS
    summary: str

    @property
    def fatal(self) -> bool:
        return self.severity != "non_fatal"


def unknown_sxid(code: int) -> SxidInfo:
    """An SXid missing from the catalogue: treated as non-fatal unless its line says Fatal."""
    return SxidInfo(
        code,
        "UNKNOWN",
        "non_fatal",
        "monitor",
        f"SXid {code} is not in the catalogue; collect nvidia-bug-report.sh, see the Fabric Manager guide",
    )


def parse_catalog(text: str, source: str = "sxid catalogue") -> dict[int, SxidInfo]:
    """Parse catalogue CSV text. Raises :class:`ConfigError` naming the bad row."""
    table: dict[int, SxidInfo] = {}
    for where, code, row in coded_rows(text, source, _COLUMNS):
        if row["severity"] not in SEVERITIES:
            raise ConfigError(where, f"severity {row['severity']!r} is not one of {sorted(SEVERITIES)}")
        if row["action"] not in ACTIONS:
            raise ConfigError(where, f"action {row['action']!r} is not one of {sorted(ACTIONS)}")
        table[code] = SxidInfo(code, row["name"], row["severity"], row["action"], row["summary"])
    return table


@cache
def catalog() -> dict[int, SxidInfo]:
    """The packaged catalogue."""
    text = resources.files("shared").joinpath("sxid_catalog.csv").read_text(encoding="utf-8")
    return parse_catalog(text, "shared/sxid_catalog.csv")


def lookup(code: int, table: dict[int, SxidInfo] | None = None) -> SxidInfo:
    info = (table if table is not None else catalog()).get(code)
    return info if info is not None else unknown_sxid(code)


def is_fatal(code: int, said: bool | None, table: dict[int, SxidInfo] | None = None) -> bool:
    """Whether an SXid is fatal: what the driver printed on the line, else the catalogue."""
    return said if said is not None else lookup(code, table).fatal
