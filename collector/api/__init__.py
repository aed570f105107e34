"""The HTTP API, live stream, metrics endpoint and dashboard page (``docs/api.md``)."""

from collector.api.app import ApiServer, install, make_app

__all__ = ["ApiServer", "install", "make_app"]
