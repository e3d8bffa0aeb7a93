"""The local chunk cache of object-storage stores (olacache.store.chunk_cache): bounded, least recently used
out first, atomic entries; sizes as users write them."""

from __future__ import annotations

import os
import time

import pytest

from olacache.common.files import parse_size
from olacache.store.chunk_cache import ChunkCache


def _entries(root) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*") if p.is_file()}


def test_bounded_and_least_recently_used_go_first(tmp_path):
    cache = ChunkCache(tmp_path, max_bytes=10_000)
    keys = [ChunkCache.key("s3://b/x.zarr", "depth/target", "g1", shard, 0xABC, 0) for shard in range(12)]
    for k in keys[:8]:
        cache.put(k, b"x" * 1000)
    assert sum(_entries(tmp_path).values()) == 8000
    old = time.time() - 100
    for k in keys[:8]:  # make the order of use explicit (mtime resolution can be coarse)
        os.utime(tmp_path / k, (old, old))
    assert cache.get(keys[0]) == b"x" * 1000  # a hit refreshes the entry: it is now the most recently used
    for k in keys[8:]:
        cache.put(k, b"y" * 1000)
    total = sum(_entries(tmp_path).values())
    assert total <= 10_000
    assert (tmp_path / keys[0]).exists() and (tmp_path / keys[11]).exists()
    assert not (tmp_path / keys[1]).exists()  # the least recently used went first
    assert cache.hits == 1 and cache.get("nope/nothing") is None and cache.misses == 1


def test_keys_name_the_content_and_stale_temporaries_go(tmp_path):
    a = ChunkCache.key("s3://b/x.zarr", "depth/target", "g1", 3, 1, 0)
    assert a != ChunkCache.key("s3://b/x.zarr", "depth/target", "g2", 3, 1, 0)  # column replaced
    assert a != ChunkCache.key("s3://b/x.zarr", "depth/target", "g1", 3, 2, 0)  # shard rewritten
    assert a != ChunkCache.key("s3://b/y.zarr", "depth/target", "g1", 3, 1, 0)  # another store
    stale = tmp_path / "h" / ".tmp-1-1"
    stale.parent.mkdir()
    stale.write_bytes(b"partial")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    fresh = tmp_path / "h" / ".tmp-2-2"
    fresh.write_bytes(b"being written")
    ChunkCache(tmp_path, 10**6).trim()
    assert not stale.exists() and fresh.exists()


def test_parse_size():
    assert parse_size("50GB") == 50 * 10**9
    assert parse_size("512MiB") == 512 * 2**20
    assert parse_size("1.5 tb") == 1_500_000_000_000
    assert parse_size(1000) == 1000
    for bad in ("lots", "-1GB", "0"):
        with pytest.raises(ValueError):
            parse_size(bad)
    with pytest.raises(ValueError):
        ChunkCache("/tmp/x", 0)


def test_an_unwritable_cache_directory_is_refused(tmp_path):
    from olacache.store import StoreError

    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(StoreError, match="data.store_cache") as e:
        ChunkCache(blocker / "cache", 10**6).require_writable()
    assert str(blocker / "cache") in str(e.value)
    ChunkCache(tmp_path / "new" / "cache", 10**6).require_writable()  # made when missing
    assert (tmp_path / "new" / "cache").is_dir() and not any((tmp_path / "new" / "cache").iterdir())
