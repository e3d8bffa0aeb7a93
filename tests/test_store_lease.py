"""Writers and crashes: the writer lease (one writing job per store, stale leases taken over, torchrun ranks
share one), a killed store creation resumes, and a build against a leased store is refused in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from conftest import EXAMPLES, ROOT

from olacache.store import EmbeddingStore, StoreLocked
from olacache.store.lease import acquire

PATHS = [f"a/{i}.jpg" for i in range(10)]


def _foreign(path: Path, age_s: float, ttl: float = 60.0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"job": "otherhost:1", "owner": "otherhost:1", "heartbeat": time.time() - age_s,
                                "ttl": ttl}))


def test_live_lease_refuses_and_stale_one_is_taken_over(tmp_path: Path) -> None:
    url = tmp_path / "s.zarr"
    _foreign(Path(str(url) + ".lease"), age_s=5)
    with pytest.raises(StoreLocked, match="otherhost:1.*last heartbeat 5s ago"):
        acquire(url, settle_s=0)
    _foreign(Path(str(url) + ".lease"), age_s=120)
    msgs: list[str] = []
    lease = acquire(url, log=msgs.append, settle_s=0)
    assert "taking over a stale writer lease (owner otherhost:1" in msgs[0]
    assert json.loads((Path(str(url) + ".lease")).read_text())["job"] != "otherhost:1"
    # the lease lives beside the store: creating the store is unaffected, zarr never sees it
    with EmbeddingStore.create(url, PATHS, shard_size=4) as s:
        s.add_teacher("t", (2, 3))
    lease.release()
    assert not (Path(str(url) + ".lease")).exists()
    assert zarr.open_group(str(url), mode="r").attrs["n_images"] == len(PATHS)


def test_same_torchrun_job_shares_the_lease(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job42")
    url = tmp_path / "s.h5"
    first = acquire(url, hdf5=True, settle_s=0)
    assert (tmp_path / "s.h5.lease").is_file()
    second = acquire(url, hdf5=True, settle_s=0)  # another rank of the same job
    second.release()
    first.release()


def test_build_refused_while_another_job_writes(tmp_path: Path) -> None:
    out = tmp_path / "s.zarr"
    _foreign(Path(str(out) + ".lease"), age_s=1)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-m", "olacache", "build", str(EXAMPLES / "sample.json"),
                          str(EXAMPLES / "images"), "--out", str(out), "--teachers", "gen", "--workers", "0"],
                         env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode != 0 and "another job writes this store" in res.stderr
    assert "Traceback" not in res.stderr and res.stderr.count("error:") == 1


def test_killed_creation_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A creation killed before its root attrs (the commit point) leaves a group that the next create redoes."""
    url = tmp_path / "s.zarr"
    real = zarr.Group.update_attributes

    def killed(self, attrs):  # noqa: ANN001
        raise KeyboardInterrupt("SIGKILL")

    monkeypatch.setattr(zarr.Group, "update_attributes", killed)
    with pytest.raises(KeyboardInterrupt):
        EmbeddingStore.create(url, PATHS, shard_size=4)
    monkeypatch.setattr(zarr.Group, "update_attributes", real)
    assert not EmbeddingStore.exists(url)
    with EmbeddingStore.create(url, PATHS, shard_size=4) as s:
        assert s.image_paths == PATHS
    with EmbeddingStore.open(url) as s:
        assert s.n_images == len(PATHS) and s.image_paths == PATHS


def test_hdf5_full_disk_is_one_line_and_keeps_complete_shards(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil
    from collections import namedtuple

    from olacache.store import OK, StoreError
    from olacache.verify import verify_store

    url = tmp_path / "s.h5"
    v = np.random.default_rng(0).standard_normal((10, 64, 64), dtype=np.float32)
    with EmbeddingStore.create(url, PATHS, shard_size=4, format="hdf5") as s:
        s.add_teacher("t", (64, 64))
        s.write_shard("t", 0, v[:4], np.full(4, OK, np.uint8), [""] * 4)
        usage = namedtuple("usage", "total used free")
        monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 2**20, 2**20))
        with pytest.raises(StoreError, match="not enough free disk space.*every complete shard is kept"):
            s.write_shard("t", 1, v[4:8], np.full(4, OK, np.uint8), [""] * 4)
    monkeypatch.undo()
    with EmbeddingStore.open(url) as s:
        assert s.complete_shards("t").tolist() == [True, False, False]
        np.testing.assert_array_equal(s.read_rows("t", [0, 3]), v[[0, 3]].astype(np.float16))
    rep = verify_store(str(url))
    assert any("missing in 2 incomplete shard" in p for p in rep.problems)
