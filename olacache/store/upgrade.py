"""``olacache upgrade STORE``: convert a format-1 store to format 2 in place, without touching target data.

What changes (olacache.store.format): Zarr text arrays move to core Zarr v3 types (``index/path_utf8`` +
``index/path_offsets``, ``<teacher>/error_utf8``) and every column gets a generation id; HDF5 attributes become
native. Target, scale and status chunks are left as they are (so they keep format 1's lack of inner checksums;
``olacache verify`` says so; a rebuilt column gets them).

Atomic and resumable: every new array is written (overwriting a partial one from a killed run) before the root
``format_version`` is set to 2, which is the commit point; format-1 readers see the old arrays until then, and
the old arrays are deleted only after it. Rerunning after a crash at any point finishes the job.
"""

from __future__ import annotations

import os
import uuid
from typing import Any

from olacache.store.format import ERRORS, FORMAT_VERSION, INDEX_PATH, StoreError, resolve_url


def upgrade_store(url: str | os.PathLike[str], log: Any = print) -> str:
    """Upgrade in place; -> a one-line summary. Raises StoreError for anything that is not a store."""
    from olacache.store.lease import acquire

    disp, local = resolve_url(url)
    if local is not None and not local.exists():
        raise StoreError(f"{disp}: no embedding store there (path does not exist)")
    is_file = local is not None and local.is_file()
    lease = acquire(url, hdf5=is_file, log=log)  # no build may write while the layout changes
    try:
        return _upgrade_hdf5(disp, local, log) if is_file else _upgrade_zarr(disp, local, log)
    finally:
        lease.release()


def _upgrade_zarr(url: str, local: Any, log: Any) -> str:
    import zarr

    from olacache.store.strings import ERROR_BYTES, encode_concat, encode_fixed
    from olacache.store.zarr_backend import ERROR_UTF8, PATH_OFFSETS, PATH_UTF8, ZarrBackend, _text_codecs

    store = ZarrBackend._store(url, local, read_only=False)
    try:
        g = zarr.open_group(store, mode="r+")
    except Exception as e:
        raise StoreError(f"{url} is not a zarr group ({type(e).__name__}: {e})") from None
    fv = g.attrs.get("format_version")
    if fv is None:
        raise StoreError(f"{url}: not an olacache embedding store (no format_version attr)")
    fv = int(fv)
    if fv > FORMAT_VERSION:
        raise StoreError(f"{url}: format_version {fv} is newer than this olacache ({FORMAT_VERSION})")
    columns = [k for k in g.group_keys() if k != "index" and "target_shape" in g[k].attrs]
    if fv < 2:
        paths = [str(p) for p in g[INDEX_PATH][:]]
        data, offsets = encode_concat(paths)
        for name, arr in ((PATH_OFFSETS, offsets), (PATH_UTF8, data)):
            a = g.create_array(name, shape=arr.shape, dtype=arr.dtype, chunks=(max(1, min(len(arr), 1 << 20)),),
                               compressors=_text_codecs(), fill_value=0, overwrite=True)
            if len(arr):
                a[:] = arr
        for c in columns:
            old = g[f"{c}/{ERRORS}"]
            texts = [str(t) for t in old[:]]
            new = g.create_array(
                f"{c}/{ERROR_UTF8}", shape=(len(texts), ERROR_BYTES), dtype="uint8",
                chunks=(int(old.chunks[0]), ERROR_BYTES), compressors=_text_codecs(), fill_value=0,
                attributes={"encoding": f"utf-8, zero-padded to {ERROR_BYTES} bytes per row"}, overwrite=True,
            )
            new[:] = encode_fixed(texts)
            attrs = dict(g[c].attrs)
            attrs.setdefault("generation", uuid.uuid4().hex)
            g[c].attrs.put(attrs)
        g.update_attributes({"format_version": FORMAT_VERSION})  # the commit point
        log(f"{url}: converted to format_version {FORMAT_VERSION} ({len(paths)} paths, {len(columns)} column(s))")
    # cleanup (also what a rerun after a crash past the commit point finishes)
    removed = 0
    for old_path in [INDEX_PATH, *(f"{c}/{ERRORS}" for c in columns)]:
        if old_path in g:
            del g[old_path]
            removed += 1
    return (f"{url}: format_version {FORMAT_VERSION}" + (" (was 1)" if fv < 2 else " (already)")
            + (f"; removed {removed} format-1 array(s)" if removed else ""))


def _upgrade_hdf5(url: str, path: Any, log: Any) -> str:
    import h5py

    from olacache.store.hdf5_backend import JSON_KEYS, _open_file, read_attrs, write_attrs

    if not h5py.is_hdf5(path):
        raise StoreError(f"{url} is a file but not an HDF5 file")
    f = _open_file(url, path, "r+")
    try:
        root = read_attrs(f)
        fv = root.get("format_version")
        if fv is None:
            raise StoreError(f"{url}: not an olacache embedding store (no format_version attr)")
        if int(fv) >= 2 and JSON_KEYS in f.attrs:
            return f"{url}: format_version {int(fv)} (already)"
        for name, obj in f.items():
            if isinstance(obj, h5py.Group) and name != "index":
                attrs = read_attrs(obj)
                if "target_shape" in attrs:
                    attrs.setdefault("generation", uuid.uuid4().hex)
                write_attrs(obj, attrs)  # idempotent: a column already converted reads back the same
        root["format_version"] = FORMAT_VERSION
        write_attrs(f, root)  # root last: the commit point
        f.flush()
        log(f"{url}: converted to format_version {FORMAT_VERSION} (native HDF5 attributes)")
        return f"{url}: format_version {FORMAT_VERSION} (was {int(fv)})"
    finally:
        f.close()


