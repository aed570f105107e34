"""XID 74 (NVLink error) details: the link and the seven error registers the driver prints.

The kernel-log line reads, for example::

    NVRM: Xid (PCI:0000:b9:00): 74, pid=<unknown>, name=<unknown>, NVLink: fatal error
    detected on link 6(0x10000, 0x0, 0x0, 0x0, 0x0, 0x0, 0x0)

NVIDIA's XID catalogue resolves XID 74 through its NVLink workflow (WORKFLOW_NVLINK_ERR):
only the first, third, fourth and fifth registers carry bits to analyse, and each documented
bit falls in one class below. :func:`decode` is pure; a line without the registers (older
drivers print only ``... on link N``) still gives the link.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

_LINE: Final = re.compile(r"link\s+(\d+)\s*(?:\(([^)]*)\))?", re.IGNORECASE)
_HEX: Final = re.compile(r"0x[0-9a-fA-F]+")

IGNORE: Final = "ignore"
SYMPATHETIC: Final = "sympathetic"  # secondary to another error: follow that one's resolution
ECC_PARITY: Final = "ecc_parity"  # likely a hardware ECC/parity problem: report if > 2 on one link
MECHANICAL: Final = "mechanical"  # possibly hardware: check and reseat the link's connections, diags
SIGNAL: Final = "signal_integrity"  # marginal channel signal integrity: check connections, field diags
FABRIC_RESET: Final = "fabric_reset"  # sympathetic, but the fabric needs a reset
ECC_THRESHOLD: Final = "ecc_threshold"  # an ECC-error threshold was exceeded, nothing uncorrectable
UNEXPECTED: Final = "unexpected"  # not expected in production / repeated: report a bug to NVIDIA

# (register index 0..6, bit) -> class, from the catalogue's workflow
_BITS: Final[dict[tuple[int, int], str]] = {
    **{(0, b): IGNORE for b in (0, 23, 30)},
    **{(0, b): SYMPATHETIC for b in (1, 20)},
    **{(0, b): ECC_PARITY for b in (4, 5)},
    **{(0, b): MECHANICAL for b in (8, 9, 12, 16, 17, 24, 28)},
    **{(0, b): SIGNAL for b in (21, 22)},
    **{(0, b): UNEXPECTED for b in (27, 29)},
    **{(2, b): ECC_PARITY for b in (0, 1, 2, 6)},
    **{(2, b): UNEXPECTED for b in (13, 17, 18)},
    **{(2, b): MECHANICAL for b in (16, 19)},  # "run field diags" if repeated
    **{(3, b): SYMPATHETIC for b in (16, 17)},
    (3, 18): FABRIC_RESET,
    **{(4, b): ECC_PARITY for b in (18, 19, 21, 22, 24, 25, 27, 28)},
    **{(4, b): ECC_THRESHOLD for b in (20, 23, 26, 29)},
}
_ADVICE: Final[dict[str, str]] = {
    MECHANICAL: "check the link's mechanical connections and reseat; run field diagnostics if it persists",
    SIGNAL: "marginal signal integrity: check the link's connections and run field diagnostics",
    ECC_PARITY: "likely an ECC/parity hardware problem: report it if seen more than twice on this link",
    FABRIC_RESET: "the NVLink fabric needs a reset (reset the GPUs / restart the fabric manager)",
    UNEXPECTED: "not expected in production: collect nvidia-bug-report.sh and report it",
    SYMPATHETIC: "secondary to another error: follow that error's resolution",
    ECC_THRESHOLD: "an ECC threshold was exceeded without an uncorrectable error: continue; field "
    "diagnostics if jobs are interrupted or it repeats",
    IGNORE: "no action",
}
_ANALYSED: Final = frozenset({0, 2, 3, 4})  # the first, third, fourth and fifth registers
# the worst class present decides the advice
_ORDER: Final = (MECHANICAL, SIGNAL, ECC_PARITY, FABRIC_RESET, UNEXPECTED, SYMPATHETIC, ECC_THRESHOLD, IGNORE)


@dataclass(frozen=True, slots=True)
class Xid74:
    """The decoded details of one XID 74 line."""

    link: int
    registers: tuple[int, ...]  # the seven register values, () when the line has none
    classes: tuple[str, ...]  # the classes of the bits set, worst first
    unknown_bits: tuple[tuple[int, int], ...]  # (register, bit) set but not in the catalogue

    @property
    def benign(self) -> bool:
        """Only bits the catalogue says need no action (ignorable, ECC threshold): not fatal."""
        return bool(self.classes) and not self.unknown_bits and set(self.classes) <= {IGNORE, ECC_THRESHOLD}

    def describe(self) -> str:
        """One line: the link, the registers and what the catalogue advises."""
        regs = ", ".join(f"0x{r:x}" for r in self.registers)
        out = f"NVLink link {self.link}" + (f" ({regs})" if regs else "")
        if self.classes:
            out += ": " + _ADVICE[self.classes[0]]
        if self.unknown_bits:
            bits = ", ".join(f"register {r} bit {b}" for r, b in self.unknown_bits)
            out += f"; undocumented bits ({bits}): report them"
        return out


def decode(message: str | None) -> Xid74 | None:
    """The link and registers of an XID 74 message (its detail text or the whole line)."""
    if not message:
        return None
    m = _LINE.search(message)
    if m is None:
        return None
    registers = tuple(int(h, 16) for h in _HEX.findall(m.group(2) or ""))
    if registers and len(registers) != 7:
        registers = ()  # not the documented form: keep the link only
    found: set[str] = set()
    unknown: list[tuple[int, int]] = []
    for reg, value in enumerate(registers):
        if reg not in _ANALYSED:
            continue
        for bit in range(64):
            if value >> bit & 1:
                cls = _BITS.get((reg, bit))
                if cls is None:
                    unknown.append((reg, bit))
                else:
                    found.add(cls)
    classes = tuple(c for c in _ORDER if c in found)
    return Xid74(int(m.group(1)), registers, classes, tuple(unknown))
