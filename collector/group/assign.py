"""Pure bucket arithmetic of a collector group: which bucket a host is in, which member owns it.

A host's bucket is ``fnv1a32(host token) % buckets``: exactly what nats-server computes for the
stream's subject transform ``{{partition(buckets,3)}}`` on the host token, so the bucket a
collector thinks a host is in is the one the stream stores the host's frames under.

:func:`assign` spreads the buckets over the live members: balanced (no member more than one
bucket above another) and stable (each bucket goes to the member that ranks it highest by a
rendezvous score, while that member has room), so adding or removing a member moves few
buckets. Every member computes the same table from the same member list; leases
(:mod:`collector.group.lease`) make the table's word exclusive while views differ.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping

FNV_OFFSET = 0x811C9DC5
FNV_PRIME = 0x01000193
GROUP_PARTITION_BASE = 10_000  # PostgreSQL's partition column of bucket b is BASE + b


def fnv1a32(data: bytes) -> int:
    h = FNV_OFFSET
    for byte in data:
        h = ((h ^ byte) * FNV_PRIME) & 0xFFFFFFFF
    return h


def bucket_of(host_token: str, buckets: int) -> int:
    """The bucket of a host (its subject token): nats-server's ``partition(buckets, host)``."""
    return fnv1a32(host_token.encode("utf-8")) % buckets


def _score(member: str, bucket: int) -> bytes:
    return hashlib.blake2b(f"{member}/{bucket}".encode(), digest_size=8).digest()


def assign(members: Iterable[str], buckets: int) -> dict[str, frozenset[int]]:
    """Member -> the buckets it should own (every bucket exactly once; empty without members)."""
    names = sorted(set(members))
    if not names:
        return {}
    n = len(names)
    base, extra = divmod(buckets, n)
    # the members that rank first get the extra buckets: deterministic for a given member set
    ranked = sorted(names, key=lambda m: _score(m, -1))
    room = {m: base + (1 if i < extra else 0) for i, m in enumerate(ranked)}
    out: dict[str, set[int]] = {m: set() for m in names}
    for b in range(buckets):
        for m in sorted(names, key=lambda m: _score(m, b), reverse=True):
            if len(out[m]) < room[m]:
                out[m].add(b)
                break
    return {m: frozenset(s) for m, s in out.items()}


def moved(before: Mapping[str, frozenset[int]], after: Mapping[str, frozenset[int]]) -> int:
    """How many buckets changed owner between two tables (for tests and logs)."""
    owner_before = {b: m for m, bs in before.items() for b in bs}
    owner_after = {b: m for m, bs in after.items() for b in bs}
    return sum(1 for b, m in owner_after.items() if owner_before.get(b) != m)
