"""A teacher column replaced under a running training, detected inside a DataLoader worker (num_workers=2, fork):
the user sees one `error:` line from the CLI naming the store, the teacher and what to do; no traceback (the
main process's or a worker's), no hang, and the exit code of a run that started and failed (1)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import EXAMPLES, ROOT

from olacache.store import EmbeddingStore

# The reader re-checks a column's generation at most every GENERATION_CHECK_S (5 s) per process. The launcher sets
# it to 0 in the main process BEFORE the DataLoader forks its workers, so every worker fetch re-checks: the same
# code path as a real run, only without waiting 5 s per worker.
LAUNCH = ("import sys, olacache.store.reader as r; r.GENERATION_CHECK_S = 0.0; sys.argv[0] = 'olatrain'; "
          "from cli import olatrain_app; olatrain_app()")


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One build for the module; each test replaces a column in its own copy."""
    url = tmp_path_factory.mktemp("built") / "s.zarr"
    res = subprocess.run([sys.executable, "-m", "olacache", "build", str(EXAMPLES / "sample.json"),
                          str(EXAMPLES / "images"), "--teachers", "gen", "--batch-size", "4", "--shard-size", "8",
                          "--workers", "0", "--device", "cpu", "--out", str(url)],
                         env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    return url


def _store(built: Path, tmp_path: Path) -> Path:
    shutil.copytree(built, tmp_path / "s.zarr")
    return tmp_path / "s.zarr"


def test_column_replaced_under_workers_is_one_error_line(built: Path, tmp_path: Path) -> None:
    url = _store(built, tmp_path)
    raw = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    raw["stages"] = {k: v for k, v in raw["stages"].items() if k == "pt"}
    cfg = tmp_path / "tiny-pt.yaml"
    cfg.write_text(yaml.safe_dump(raw, sort_keys=False))
    run_dir = tmp_path / "run"
    sets = [f"data.annotations={EXAMPLES / 'sample.json'}", f"data.image_root={EXAMPLES / 'images'}",
            f"data.store={url}", f"output_dir={run_dir}", "data.num_workers=2", "data.max_length=1024",
            "train.batch_size=2", "train.max_steps=100000", "train.save_every=0", "train.log_every=1",
            "loss.weights.depth=0", "loss.weights.seg=0"]  # gen only: the store holds just that teacher
    args = [sys.executable, "-c", LAUNCH, "run", str(cfg)] + [x for s in sets for x in ("--set", s)]
    proc = subprocess.Popen(args, env=_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        metrics = run_dir / "pt" / "metrics.jsonl"
        deadline = time.monotonic() + 240
        while not (metrics.exists() and metrics.read_text().strip()):  # training is under way (step 1 done)
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "training never reached step 1"
            time.sleep(0.2)
        # what `olacache build ... --overwrite-teacher gen` does to the column first (olacache/build.py)
        with EmbeddingStore.open(url, "r+") as s:
            s.add_teacher("gen", s.target_shape("gen"), dtype=s.target_dtype("gen"), replace=True)
        out, err = proc.communicate(timeout=120)  # no hang: the run stops by itself
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    text = out + err
    assert proc.returncode == 1, text  # a run that started and failed (cli.py's documented exit codes)
    errors = [ln for ln in text.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, text
    line = errors[0]
    assert str(url) in line and "'gen'" in line and "replaced" in line and "restart" in line, line
    assert "olacache verify" not in line, line  # verify would say the store is fine: not the advice here
    for noise in ("Traceback", "DataLoader worker", "File \"", "Exception ignored"):
        assert noise not in text, text


def test_column_replaced_main_process_message(built: Path, tmp_path: Path) -> None:
    """The same line without workers: the dataset's read in the main process (``_fetch`` alone: a dataset
    without its text side, which this read never touches)."""
    from olacache.store import TargetReader
    from olatrain.data.dataset import ConversationDataset

    url = _store(built, tmp_path)
    reader = TargetReader(url, ["gen"])
    ds = ConversationDataset.__new__(ConversationDataset)
    ds.reader = reader
    paths = reader.image_paths[:2]
    ds._fetch(paths)
    with EmbeddingStore.open(url, "r+") as s:
        s.add_teacher("gen", s.target_shape("gen"), dtype=s.target_dtype("gen"), replace=True)
    reader._checked_at = float("-inf")  # the next fetch re-checks now (as after GENERATION_CHECK_S)
    from olatrain.data import DataError

    with pytest.raises(DataError) as e:
        ds._fetch(paths)
    msg = str(e.value)
    assert str(url) in msg and "'gen'" in msg and "restart" in msg and "olacache verify" not in msg, msg
    reader.close()
