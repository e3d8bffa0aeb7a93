"""A bounded local-disk cache of object-storage chunks (``data.store_cache`` in the trainer).

Repeated epochs and sweeps read the same targets again; from object storage every read is a network transfer.
With a cache directory, each inner chunk fetched from a remote store (its bytes WITH their crc32c) is kept as
one file, and later reads of that chunk, in any process on the machine, come from local disk.

- **Correct by construction.** An entry's name holds what identifies the chunk's content: the store, the
  array, the column's generation id (a replaced column gets new names) and the shard's digest (the crc32c of
  the shard's stored bytes, written with the shard: a shard recomputed by ``--retry-failed`` or ``verify
  --repair`` gets new names). Every read from the cache checks the chunk's own crc32c like a network read; a
  damaged entry is deleted and the chunk fetched again. Only chunks that passed their checksum are stored.
- **Safe with many processes.** Entries are written to a temporary name and renamed into place, so a reader
  sees a whole entry or none; DataLoader workers and ranks on one machine share the directory.
- **Bounded.** ``max_bytes`` caps the total. Each process counts what it adds and, once it has added
  ``max_bytes / 20`` since its last look (or the total it saw would exceed the cap), scans the directory and
  deletes the least recently used entries (a hit refreshes an entry's mtime) down to 80% of the cap. With P
  processes writing, the directory can briefly exceed the cap by up to P x 5%.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

_TMP = ".tmp-"
_STALE_TMP_S = 3600.0  # a temporary file this old belongs to a process that died mid-write


class ChunkCache:
    """Files under ``root``; keys are relative paths made by ``key``. Picklable (it holds no handles)."""

    def __init__(self, root: str | os.PathLike[str], max_bytes: int) -> None:
        if max_bytes <= 0:
            raise ValueError(f"chunk cache size must be > 0 bytes, got {max_bytes}")
        self.root = Path(root)
        self.max_bytes = int(max_bytes)
        self._seen: int | None = None  # the directory's total at this process's last scan
        self._added = 0  # bytes this process wrote since then
        self.hits = self.misses = 0

    def require_writable(self) -> None:
        """Raise StoreError unless the directory exists (or can be made) and takes files: once training runs,
        a failed cache write is ignored (the cache is optional), so a wrong directory is refused up front."""
        from olacache.store.format import StoreError

        probe = self.root / f"{_TMP}{os.getpid()}-probe"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise StoreError(f"chunk cache directory {self.root}: cannot write there ({e.strerror or e}); set "
                             "data.store_cache to a writable local directory, or leave it unset") from None

    @staticmethod
    def key(store_url: str, array: str, generation: object, shard: int, digest: int, chunk: int) -> str:
        """The entry name of one inner chunk: <store hash>/<array>/<shard>/<generation>-<digest>-<chunk>."""
        h = hashlib.sha1(str(store_url).encode()).hexdigest()[:16]
        safe_array = array.replace("/", "__")
        return f"{h}/{safe_array}/{shard}/{generation}-{digest:08x}-{chunk}"

    def get(self, key: str) -> bytes | None:
        path = self.root / key
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError:
            self.misses += 1
            return None
        try:  # least recently USED: the eviction scan orders entries by mtime
            os.utime(path)
        except OSError:
            pass
        self.hits += 1
        return data

    def drop(self, key: str) -> None:
        """Delete an entry (it failed its checksum)."""
        try:
            os.unlink(self.root / key)
        except OSError:
            pass

    def put(self, key: str, data: bytes | memoryview) -> None:
        """Store an entry (atomically); errors (a full or read-only disk) are ignored: a cache is optional."""
        path = self.root / key
        tmp = path.with_name(f"{_TMP}{os.getpid()}-{time.monotonic_ns()}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except OSError:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            return
        self._added += len(data)
        if self._seen is None or self._seen + self._added > self.max_bytes or self._added > self.max_bytes // 20:
            self.trim()

    def trim(self) -> int:
        """Scan the directory; delete least recently used entries down to 80% of the cap if it is over.
        -> the total left."""
        entries: list[tuple[float, int, str]] = []
        now = time.time()
        for dirpath, _dirs, files in os.walk(self.root):
            for name in files:
                p = os.path.join(dirpath, name)
                try:
                    st = os.stat(p)
                except OSError:
                    continue  # another process evicted it meanwhile
                if name.startswith(_TMP):
                    if now - st.st_mtime > _STALE_TMP_S:
                        _unlink(p)
                    continue
                entries.append((st.st_mtime, st.st_size, p))
        total = sum(e[1] for e in entries)
        if total > self.max_bytes:
            entries.sort()
            goal = int(self.max_bytes * 0.8)
            for _mtime, size, p in entries:
                if total <= goal:
                    break
                _unlink(p)
                total -= size
        self._seen, self._added = total, 0
        return total


def _unlink(p: str) -> None:
    try:
        os.unlink(p)
    except OSError:
        pass

