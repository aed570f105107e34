"""Reading a code-keyed CSV catalogue (the XID and SXid tables): columns, integer codes, no repeats."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator

from shared.errors import ConfigError


def coded_rows(text: str, source: str, columns: tuple[str, ...]) -> Iterator[tuple[str, int, dict[str, str]]]:
    """``(where, code, row)`` for each row of catalogue CSV ``text`` with exactly ``columns``.

    Raises :class:`ConfigError` naming the source (wrong columns) or the bad row (a code that
    is not an integer, a code seen before); ``where`` names the row for the caller's own checks.
    """
    reader = csv.DictReader(io.StringIO(text))
    if tuple(reader.fieldnames or ()) != columns:
        raise ConfigError(source, f"expected columns {','.join(columns)}, got {reader.fieldnames}")
    seen: set[int] = set()
    for n, row in enumerate(reader, start=2):
        where = f"{source} line {n}"
        try:
            code = int(row["code"])
        except ValueError as e:
            raise ConfigError(where, f"code {row['code']!r} is not an integer") from e
        if code in seen:
            raise ConfigError(where, f"duplicate code {code}")
        seen.add(code)
        yield where, code, row
