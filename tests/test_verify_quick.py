"""`olacache verify --quick`: every complete shard's file, size and index checked without reading target bytes
(local zarr, HDF5, S3), with the same lines as the full check for what both check, and a note saying what was
not read."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import olacache_cli, s3_server
from s3_server import BUCKET
from zarr.storage import FsspecStore, LocalStore

from olacache.store import OK, EmbeddingStore
from olacache.store.extend import extend_store
from olacache.verify import verify_store

N, SHARD = 21, 8  # a partial last shard
PATHS = [f"img/{i:04d}.jpg" for i in range(N)]
COLUMNS = {"big": ((64, 1024), "float16"), "small": ((2, 32), "int8")}  # one / several images per inner chunk


def _make(url: str | Path, fmt: str = "zarr", compressor: str | None = None, shards: tuple[int, ...] = (0, 1, 2)
          ) -> None:
    rng = np.random.default_rng(0)
    with EmbeddingStore.create(url, PATHS, shard_size=SHARD, format=fmt) as s:
        for name, (shape, dtype) in COLUMNS.items():
            s.add_teacher(name, shape, dtype=dtype, compressor=compressor)
            for sh in shards:
                r = s.shard_rows(sh)
                v = rng.standard_normal((len(r), *shape), dtype=np.float32)
                s.write_shard(name, sh, v, np.full(len(r), OK, np.uint8), [""] * len(r))


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("clean")
    _make(d / "plain.zarr")
    _make(d / "zstd.zarr", compressor="zstd")
    _make(d / "s.h5", "hdf5")
    return {"plain": d / "plain.zarr", "zstd": d / "zstd.zarr", "hdf5": d / "s.h5"}


def _copy(src: Path, dst_dir: Path) -> Path:
    dst = dst_dir / src.name
    (shutil.copytree if src.is_dir() else shutil.copy)(src, dst)
    return dst


def _shard(url: Path, col: str, shard: int) -> Path:
    return url / col / "target" / "c" / str(shard) / "0" / "0"


def _truncate(p: Path, n: int) -> None:
    p.write_bytes(p.read_bytes()[:-n])


def _flip(p: Path, offset: int) -> None:
    b = bytearray(p.read_bytes())
    b[offset] ^= 1
    p.write_bytes(bytes(b))


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return olacache_cli(*args, env=env, timeout=300)


DAMAGE = {  # what a copy, a sync or a full disk leaves: each found from the file's size and index alone
    "deleted": (lambda u: _shard(u, "big", 1).unlink(), "shard file big/target/c/1/0/0 is missing"),
    "truncated": (lambda u: _truncate(_shard(u, "big", 1), 10), "is 1048730 bytes; its layout implies 1048740"),
    "last byte gone": (lambda u: _truncate(_shard(u, "small", 2), 1), "small/target shard 2 (rows 16-20)"),
    "appended": (lambda u: _shard(u, "big", 0).open("ab").write(b"xx"), "is 1048742 bytes"),
    "index flipped": (lambda u: _flip(_shard(u, "big", 1), _shard(u, "big", 1).stat().st_size - 20),
                      "the shard index of big/target/c/1/0/0 fails its crc32c"),
    "other array's shard": (lambda u: shutil.copy(_shard(u, "small", 0), _shard(u, "big", 0)),
                            "big/target shard 0 (rows 0-7): shard file big/target/c/0/0/0 is 536 bytes; its layout implies 1048740"),
    "scale deleted": (lambda u: (u / "small" / "scale" / "c" / "1" / "0").unlink(), "small/scale shard 1"),
}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_structural_damage_same_lines_as_full(clean, tmp_path: Path, kind: str) -> None:
    url = _copy(clean["plain"], tmp_path)
    damage, expect = DAMAGE[kind]
    damage(url)
    quick, full = verify_store(str(url), quick=True), verify_store(str(url))
    assert not quick.ok and any(expect in p for p in quick.problems), quick.problems
    assert quick.problems == full.problems  # one line per problem, the same line
    assert quick.notes and not full.notes


def test_data_flip_is_for_the_full_check_and_the_note_says_so(clean, tmp_path: Path) -> None:
    url = _copy(clean["plain"], tmp_path)
    _flip(_shard(url, "big", 1), 100)  # a byte inside inner chunk 0's data: only its crc32c can tell
    quick = verify_store(str(url), quick=True)
    assert quick.ok, quick.problems
    assert "no target bytes were read" in quick.notes[0] and f"`olacache verify {url}`" in quick.notes[0]
    assert any("crc32c" in p for p in verify_store(str(url)).problems)


@pytest.mark.parametrize("which", ["plain", "zstd", "hdf5"])
def test_clean_stores_pass_and_no_target_byte_is_read(clean, which: str, monkeypatch) -> None:
    """Clean fp16/int8, compressed and HDF5 stores pass; on zarr, the only bytes of target/scale shards read
    are their indexes (every store get is recorded)."""
    got: list[tuple[str, int]] = []
    orig = LocalStore.get

    async def spy(self, key, prototype=None, byte_range=None):
        buf = await orig(self, key, prototype, byte_range)
        got.append((key, 0 if buf is None else len(buf)))
        return buf

    monkeypatch.setattr(LocalStore, "get", spy)
    rep = verify_store(str(clean[which]), quick=True)
    assert rep.ok and not rep.warnings, (rep.problems, rep.warnings)
    data = [(k, n) for k, n in got if "/target/c/" in k or "/scale/c/" in k]
    if which != "hdf5":
        n_shards = 3
        assert len(data) == 2 * n_shards + n_shards  # big, small target shards + small scale shards
        assert all(n == 8 * 16 + 4 or n == 1 * 16 + 4 for _, n in data), data  # the index, nothing else


def test_extended_store_passes(clean, tmp_path: Path) -> None:
    """An extension's padding rows (PAD, never written into the old last shard) are not missing chunks."""
    url = _copy(clean["plain"], tmp_path)
    with EmbeddingStore.open(url, "r+") as s:
        extend_store(s, PATHS + ["img/new.jpg"])
        assert s.status("big")[N:SHARD * 3].tolist() == [3] * (SHARD * 3 - N)
    rep = verify_store(str(url), quick=True)
    assert all("1 image(s) missing in 1 incomplete shard(s)" in p for p in rep.problems), rep.problems  # unbuilt


def test_hdf5_unwritten_chunk_of_a_complete_shard(tmp_path: Path) -> None:
    """A shard marked complete whose chunks were never written (a build that died between writing status and
    data): found from HDF5's chunk table; a data flip is left to the full check."""
    url = tmp_path / "s.h5"
    _make(url, "hdf5", shards=(0, 2))
    with h5py.File(url, "r+") as f:
        for name in COLUMNS:
            f[f"{name}/status"][SHARD:2 * SHARD] = OK
    quick, full = verify_store(str(url), quick=True), verify_store(str(url))
    assert any("big/target shard 1 (rows 8-15): chunk rows 8-8 is not allocated" in p for p in quick.problems), \
        quick.problems
    assert any("small/scale shard 1" in p for p in quick.problems)
    assert quick.problems == full.problems


def test_cli_quick_teacher_and_help(clean, tmp_path: Path) -> None:
    url = _copy(clean["plain"], tmp_path)
    res = _cli("verify", str(url), "--quick")
    assert res.returncode == 0 and "OK" in res.stdout, res.stdout + res.stderr
    assert "no target bytes were read" in " ".join(res.stdout.split())
    _shard(url, "big", 1).unlink()
    res = _cli("verify", str(url), "--quick")
    assert res.returncode == 1, res.stdout + res.stderr
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("problem:")]
    assert len(lines) == 1 and "big/target shard 1" in lines[0] and "missing" in lines[0], res.stdout
    assert _cli("verify", str(url), "--quick", "--teacher", "small").returncode == 0  # the damage is in big
    res = _cli("verify", str(url), "--quick", "--json")
    got = json.loads(res.stdout)
    assert res.returncode == 1 and got["quick"] is True and len(got["problems"]) == 1 and got["notes"], got
    res = _cli("verify", str(url), "--quick", "--repair")  # what quick finds, --repair marks for recompute
    assert res.returncode == 1 and "repair: marked 1 damaged shard(s) [1]" in res.stdout, res.stdout
    with EmbeddingStore.open(url) as s:
        assert s.complete_shards("big").tolist() == [True, False, True]
        assert s.complete_shards("small").all()
    res = _cli("verify", str(url), "--teacher", "nope")
    assert res.returncode == 2 and res.stderr.strip().startswith("error:") and "'nope'" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr
    helptext = " ".join(_cli("verify", "--help").stdout.split())
    assert "--quick" in helptext and "full check" in helptext and "--teacher" in helptext


def test_quick_on_s3(tmp_path: Path) -> None:
    import s3fs

    with s3_server(tmp_path / "weed") as aws:
        url = f"s3://{BUCKET}/quick.zarr"
        _make(url)
        got: list[int] = []
        orig = FsspecStore.get

        async def spy(self, key, prototype=None, byte_range=None):
            buf = await orig(self, key, prototype, byte_range)
            if "/target/c/" in key:
                got.append(0 if buf is None else len(buf))
            return buf

        FsspecStore.get = spy
        try:
            assert verify_store(url, quick=True).ok
        finally:
            FsspecStore.get = orig
        assert got and max(got) <= 8 * 16 + 4, got  # indexes only
        fs = s3fs.S3FileSystem()
        key = f"{BUCKET}/quick.zarr/big/target/c/1/0/0"
        fs.pipe(key, fs.cat(key)[:-10])  # truncated
        fs.rm(f"{BUCKET}/quick.zarr/small/target/c/2/0/0")
        quick, full = verify_store(url, quick=True), verify_store(url)
        assert quick.problems == full.problems and len(quick.problems) == 2, quick.problems
        res = _cli("verify", url, "--quick", env=aws)
        assert res.returncode == 1 and "shard file small/target/c/2/0/0 is missing" in res.stdout, res.stdout


def test_format1_store_quick_equals_full(tmp_path: Path) -> None:
    """A format-1 store (no inner checksums, index crc32c still there) passes both checks alike."""
    from test_store_portable import N as N1
    from test_store_portable import make_v1_zarr

    url = tmp_path / "v1.zarr"
    vals = np.random.default_rng(1).standard_normal((N1, 4, 32), dtype=np.float32)
    make_v1_zarr(url, vals)
    quick, full = verify_store(str(url), quick=True), verify_store(str(url))
    assert quick.ok and full.ok, (quick.problems, full.problems)
    assert quick.warnings == full.warnings
