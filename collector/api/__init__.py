"""The HTTP API, live stream, metrics endpoint and dashboard page (``docs/api.md``)."""

from collector.api.app import ApiServer, make_app
from collector.api.deps import ApiDeps

__all__ = ["ApiDeps", "ApiServer", "make_app"]
