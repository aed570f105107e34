"""Running the ``gpuwarden`` command in a subprocess: the repository root and a clean environment."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def gpuwarden(*args: str) -> list[str]:
    """The console script when installed (``make install``), else ``python -m gpuwarden``."""
    script = shutil.which("gpuwarden", path=str(Path(sys.executable).parent))
    return [script, *args] if script else [sys.executable, "-m", "gpuwarden", *args]


def env(**extra: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("GPUWARDEN_") and k != "NOTIFY_SOCKET"}
    base["PYTHONPATH"] = str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")
    return base | extra
