"""Run every benchmark module of this package and print one table (metric | value | goal)."""

from __future__ import annotations

import importlib
import pkgutil
import sys
import time
import traceback
from collections.abc import Callable
from types import ModuleType

import bench

FIRST = ("agent_cost", "fleet_rate")  # the rest follow in name order

Row = tuple[str, str, str]


def discover(only: list[str]) -> list[tuple[str, ModuleType | None, str]]:
    names = sorted(m.name for m in pkgutil.iter_modules(bench.__path__) if not m.name.startswith("_"))
    names = [n for n in FIRST if n in names] + [n for n in names if n not in FIRST]
    if only:
        names = [n for n in names if n in only]
    found = []
    for name in names:
        try:
            mod = importlib.import_module(f"bench.{name}")
        except ImportError as e:
            found.append((name, None, f"not importable: {e}"))
            continue
        if callable(getattr(mod, "run", None)):
            found.append((name, mod, ""))
    return found


def table(rows: list[Row]) -> str:
    head: Row = ("metric", "value", "goal")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(3)]

    def fmt(r: Row) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([fmt(head), sep, *(fmt(r) for r in rows)])


def main(argv: list[str]) -> int:
    rows: list[Row] = []
    failed = 0
    for name, mod, why in discover(argv):
        if mod is None:
            rows.append((name, why, ""))
            continue
        print(f"bench: running {name} ...", file=sys.stderr, flush=True)
        started = time.monotonic()
        run: Callable[[], list[Row]] = mod.run
        try:
            rows.extend(run())
        except Exception as e:  # one broken benchmark must not hide the others' figures
            traceback.print_exc()
            rows.append((name, f"failed: {type(e).__name__}: {e}", ""))
            failed += 1
        print(f"bench: {name} took {time.monotonic() - started:.0f}s", file=sys.stderr, flush=True)
    print(table(rows))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
