"""Throw-away certificates for the TLS tests, made with the ``openssl`` command line."""

from __future__ import annotations

import subprocess
from pathlib import Path


def self_signed_ca(key: Path, cert: Path, cn: str) -> Path:
    """A self-signed P-256 CA valid for 2 days: its key at ``key``, its certificate at ``cert``."""
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "2",
            "-subj",
            f"/CN={cn}",
        ],
        check=True,
        capture_output=True,
    )
    return cert
