"""Argument checks of EmbeddingStore.create / add_teacher: every bad call is one StoreError naming the store."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from olacache.inputs.keys import normalize_image_path
from olacache.store.format import (
    COLUMN_NAME,
    DTYPES,
    KINDS,
    RESERVED_COLUMN_ATTRS,
    StoreError,
    default_kind,
    jsonable,
)


def check_new_paths(disp: str, paths: list[str]) -> None:
    """Rows of a new store: normalised and unique."""
    for p in paths:
        try:
            norm = normalize_image_path(p)
        except ValueError as e:
            raise StoreError(f"{disp}: {e}") from None
        if norm != p:
            raise StoreError(
                f"{disp}: image path {p!r} is not normalised (normalize_image_path gives {norm!r}); "
                "normalise paths before creating the store"
            )
    if len(set(paths)) != len(paths):
        seen: set[str] = set()
        dup = next(p for p in paths if p in seen or seen.add(p))  # type: ignore[func-returns-value]
        raise StoreError(f"{disp}: duplicate image path {dup!r}; store rows are unique images")


def check_teacher_args(
    url: str, name: str, target_shape: Sequence[int], dtype: str, kind: str | None,
    attrs: Mapping[str, Any] | None,
) -> tuple[tuple[int, ...], str, dict[str, Any]]:
    """-> (shape, kind, user attrs) of a valid add_teacher call."""
    if not isinstance(name, str) or not COLUMN_NAME.match(name) or name == "index":
        raise StoreError(
            f"{url}: bad teacher name {name!r}; use letters, digits, '_', '-', '.', starting with a "
            "letter (and not 'index')"
        )
    if dtype not in DTYPES:
        raise StoreError(f"{url}: teacher {name!r}: dtype must be one of {DTYPES}, got {dtype!r}")
    shape = tuple(int(s) for s in target_shape)
    if not shape or any(s < 1 for s in shape):
        raise StoreError(
            f"{url}: teacher {name!r}: target_shape must be non-empty and positive, got {target_shape!r}"
        )
    kind = default_kind(shape) if kind is None else kind
    if kind not in KINDS:
        raise StoreError(f"{url}: teacher {name!r}: kind must be one of {KINDS}, got {kind!r}")
    user = jsonable(dict(attrs or {}), f"attrs of teacher {name!r}")
    bad = [k for k in RESERVED_COLUMN_ATTRS if k in user]
    if bad:
        raise StoreError(f"{url}: teacher {name!r}: attrs {bad} are set by the store itself")
    return shape, kind, user
