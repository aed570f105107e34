"""Driver version drift across a provider: the hosts whose NVIDIA driver differs from the
version most of the provider's hosts run (a half-finished rollout, a host rebuilt from an
old image). Pure; the health engine judges ``host.driver_drift`` with it and the API lists it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping


def majority(counts: Mapping[str, int]) -> str | None:
    """The version more hosts run than any other; ``None`` on a tie or with fewer than 2 hosts."""
    if sum(counts.values()) < 2:
        return None
    top = Counter(counts).most_common(2)
    if len(top) == 2 and top[0][1] == top[1][1]:
        return None
    return top[0][0]


def drift(
    versions: Iterable[tuple[str, str | None]],
) -> tuple[dict[str, int], str | None, list[tuple[str, str]]]:
    """From (host, driver version or None): the count per version, the majority, the drifting
    hosts (host, version) sorted by host."""
    pairs = [(h, v) for h, v in versions if v]
    counts = dict(Counter(v for _, v in pairs))
    top = majority(counts)
    off = sorted((h, v) for h, v in pairs if top is not None and v != top)
    return counts, top, off
