"""Object storage (``s3://``, ``gs://``, any fsspec URL): connection options for the store's fsspec layer.

Credentials and endpoint come from the standard variables the fsspec backends read themselves (for S3:
``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``, profiles), or from
``--storage-option key=value`` on the command line, which lands here as process-wide defaults (so every store
the process opens, DataLoader workers included, uses them). Dotted keys nest:
``client_kwargs.region_name=eu-west-1``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from olacache.store.format import StoreError

_DEFAULTS: dict[str, Any] = {}


def parse_storage_options(items: Iterable[str]) -> dict[str, Any]:
    """``["key=value", "a.b=1"]`` -> ``{"key": "value", "a": {"b": 1}}``; true/false/ints/floats typed."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise StoreError(f"--storage-option {item!r}: expected key=value (e.g. endpoint_url=http://host:8333)")
        value: Any = raw
        low = raw.lower()
        if low in ("true", "false"):
            value = low == "true"
        else:
            for cast in (int, float):
                try:
                    value = cast(raw)
                    break
                except ValueError:
                    pass
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out


def set_default_storage_options(options: dict[str, Any]) -> None:
    """Options every fsspec store this process opens gets (``--storage-option``)."""
    _DEFAULTS.clear()
    _DEFAULTS.update(options)


def storage_options() -> dict[str, Any]:
    return dict(_DEFAULTS)
