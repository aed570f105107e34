"""Pack a wheelhouse folder into one tar archive, the same bytes for the same wheels.

Usage: pack_wheelhouse.py WHEELHOUSE ARCHIVE. Prints ``written`` when ARCHIVE was made or
changed, ``unchanged`` when it already held these bytes (the task's ``changed_when``).
Members are the folder's wheels and ``constraints.txt``, sorted, owned by root, mode 0644,
mtime 0: the archive depends on their contents only, so a target copies one file (one
checksum) instead of one per wheel, and sees a change only when a wheel or a pin changed.
"""

from __future__ import annotations

import io
import os
import sys
import tarfile
from pathlib import Path


def pack(folder: Path) -> bytes:
    buf = io.BytesIO()
    names = sorted(p.name for p in folder.iterdir() if p.suffix == ".whl" or p.name == "constraints.txt")
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name in names:
            data = (folder / name).read_bytes()
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    folder, archive = Path(argv[1]), Path(argv[2])
    data = pack(folder)
    if archive.is_file() and archive.read_bytes() == data:
        print("unchanged")
        return 0
    tmp = archive.with_name(archive.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, archive)
    print("written")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
