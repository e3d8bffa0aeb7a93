"""The writer lease: one writing job per store at a time (a build, ``verify --repair``, ``upgrade``).

A small JSON object beside the store (``<store>.lease``: ``x.zarr.lease`` next to the directory, an object
``s3://bucket/x.zarr.lease`` next to the prefix, ``x.h5.lease`` next to an HDF5 file; outside the store so Zarr
clients never see a foreign key in the hierarchy) names the owner and carries a heartbeat the owner refreshes
every ``ttl / 4`` seconds from a daemon thread.

- The ranks of one torchrun job share it: the job id is torchrun's ``TORCHELASTIC_RUN_ID`` (one id for all ranks),
  so only the writer of another job is refused.
- Another live owner -> ``StoreLocked`` naming it and when it last beat. A lease whose heartbeat is older than
  ``ttl``, or whose owner is a process of this host that no longer exists (a killed build being resumed),
  belongs to a dead process: it is taken over, with a message saying whose it was.
- No compare-and-swap on object storage, so acquisition writes, waits a moment and re-reads: of two racing
  writers, the one whose lease is not the one read back gives up.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from olacache.common.files import atomic_write
from olacache.store.format import StoreLocked, resolve_url

LEASE_SUFFIX = ".lease"
DEFAULT_TTL_S = 60.0


def job_id() -> str:
    """Shared by every rank of a torchrun job; otherwise this process."""
    run = os.environ.get("TORCHELASTIC_RUN_ID")
    if run and run != "none":
        return f"torchrun:{run}@{os.environ.get('MASTER_ADDR', '')}:{os.environ.get('MASTER_PORT', '')}"
    return f"{socket.gethostname()}:{os.getpid()}"


def _dead_here(owner: str) -> bool:
    """The owner is a process on this host that no longer exists (a killed build): its lease is stale now,
    without waiting for the ttl."""
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


class _Slot:
    """Read/write/delete the lease object (local file or fsspec object)."""

    def __init__(self, url: str | os.PathLike[str], hdf5: bool) -> None:
        disp, local = resolve_url(url)
        self.url = disp
        self._fs: Any = None
        if local is not None:
            self.path = str(local.parent / (local.name + LEASE_SUFFIX))
        else:
            import fsspec

            from olacache.store.remote import storage_options

            fs, root = fsspec.core.url_to_fs(disp, **storage_options())
            self._fs, self.path = fs, f"{root.rstrip('/')}{LEASE_SUFFIX}"

    def read(self) -> dict[str, Any] | None:
        try:
            raw = self._fs.cat_file(self.path) if self._fs is not None else Path(self.path).read_bytes()
        except (FileNotFoundError, OSError):
            return None
        try:
            return json.loads(raw)
        except ValueError:
            return None  # a torn lease file counts as none

    def write(self, lease: dict[str, Any]) -> None:
        data = json.dumps(lease).encode()
        if self._fs is not None:
            self._fs.pipe_file(self.path, data)
            return
        p = Path(self.path)
        p.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(p, lambda tmp: tmp.write_bytes(data))  # a reader never sees half a lease

    def delete(self) -> None:
        try:
            if self._fs is not None:
                self._fs.rm_file(self.path)
            else:
                os.unlink(self.path)
        except (FileNotFoundError, OSError):
            pass


class Lease:
    """A held lease; ``release()`` (also at exit) removes it."""

    def __init__(self, slot: _Slot, me: dict[str, Any], ttl: float) -> None:
        self._slot, self._me, self._ttl = slot, me, ttl
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="olacache-lease", daemon=True)
        self._thread.start()
        atexit.register(self.release)

    def _beat(self) -> None:
        while not self._stop.wait(self._ttl / 4):
            try:
                self._me["heartbeat"] = time.time()
                self._slot.write(self._me)
            except Exception:  # a missed beat is retried; the lease only goes stale after ttl
                pass

    def release(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        cur = self._slot.read()
        if cur is not None and cur.get("job") == self._me["job"]:
            self._slot.delete()


def acquire(url: str | os.PathLike[str], *, hdf5: bool = False, ttl: float = DEFAULT_TTL_S,
            log: Callable[[str], None] = print, settle_s: float = 0.2) -> Lease:
    """Take the store's writer lease or raise StoreLocked (see the module docstring). ``hdf5`` is accepted
    for callers that know the format; every lease lives beside its store."""
    slot = _Slot(url, hdf5)
    me = {"job": job_id(), "owner": f"{socket.gethostname()}:{os.getpid()}", "heartbeat": time.time(),
          "ttl": ttl}
    cur = slot.read()
    if cur is not None and cur.get("job") != me["job"]:
        age = time.time() - float(cur.get("heartbeat", 0))
        their_ttl = float(cur.get("ttl", ttl))
        if age < their_ttl and not _dead_here(str(cur.get("owner", ""))):
            raise StoreLocked(
                f"{slot.url}: another job writes this store (owner {cur.get('owner')}, last heartbeat {age:.0f}s "
                f"ago); wait for it to finish. If that process is dead, its lease expires {their_ttl - age:.0f}s "
                f"from now and is then taken over (or delete {slot.path})"
            )
        log(f"{slot.url}: taking over a stale writer lease (owner {cur.get('owner')}, last heartbeat "
            f"{age:.0f}s ago)")
    slot.write(me)
    time.sleep(settle_s)
    back = slot.read()
    if back is None or back.get("job") != me["job"]:
        raise StoreLocked(f"{slot.url}: another job took the writer lease at the same moment "
                          f"({None if back is None else back.get('owner')}); try again")
    return Lease(slot, me, ttl)


