"""The collector group as its NATS key-value bucket shows it, for the group's tests and bench."""

from __future__ import annotations

import contextlib
import json

import nats
import nats.js.errors


async def owners(url: str | list[str], kv_bucket: str = "gpuwarden-group") -> dict[int, str]:
    """bucket -> the member holding its lease now (from the group's KV bucket)."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        try:
            kv = await js.key_value(kv_bucket)
            keys = await kv.keys()
        except (nats.js.errors.BucketNotFoundError, nats.js.errors.NoKeysError):
            return {}
        out = {}
        for k in keys:
            if k.startswith("b."):
                with contextlib.suppress(nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
                    e = await kv.get(k)
                    if e.value:
                        out[int(k[2:])] = json.loads(e.value)["member"]
        return out
    finally:
        await nc.close()
