"""The mount of a store on S3 reads through its pack cache (BACKUP_CACHE_DIR,
BACKUP_CACHE_BYTES): a real mount in a subprocess over the local server (scripts/s3-server)."""
from __future__ import annotations

import hashlib
import random
import stat
from pathlib import Path

import pytest

from conftest import run_cli, write_env
from mountutil import Mount, tiny_node
from s3util import S3Server

pytestmark = pytest.mark.s3

MiB = 1 << 20


def s3_env(tmp_path: Path, server: S3Server, bucket: str, **extra: str) -> Path:
    return write_env(tmp_path / "node.env", f"s3://{bucket}/backups",  # type: ignore[arg-type]
                     directory=tmp_path / "node", **server.settings, **extra)


def test_mount_reads_through_a_bounded_cache(s3_server: S3Server, s3_bucket: str,
                                             tmp_path: Path) -> None:
    data = random.Random(7).randbytes(6 * MiB + 12345)
    tiny_node(tmp_path / "node", {"segments/big": data, "small": b"small file"})
    cache = tmp_path / "cache"
    env = s3_env(tmp_path, s3_server, s3_bucket, BACKUP_CACHE_DIR=str(cache),
                 BACKUP_CACHE_BYTES=str(3 * MiB))
    res = run_cli("backup", "--config", env, "-q")
    assert res.returncode == 0, res.stderr
    with Mount(env, tmp_path / "mnt") as m:
        node = m.path / "node1"
        assert (node / "small").read_bytes() == b"small file"
        with open(node / "segments" / "big", "rb") as f:
            assert hashlib.sha256(f.read()).digest() == hashlib.sha256(data).digest()
            f.seek(5 * MiB + 3)
            assert f.read(100_000) == data[5 * MiB + 3:5 * MiB + 100_003]
        blocks = [p for p in cache.glob("??/*") if not p.name.startswith(".")]
        assert blocks
        assert sum(p.stat().st_size for p in blocks) <= 3 * MiB
        assert stat.S_IMODE(cache.stat().st_mode) == 0o700
        assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in blocks)
        assert m.stderr() == ""


@pytest.mark.allow_warnings
def test_a_cache_folder_that_cannot_be_made_leaves_the_mount_without_cache(
        s3_server: S3Server, s3_bucket: str, tmp_path: Path) -> None:
    """A BACKUP_CACHE_DIR that cannot be made (a read-only disk, a file in the way): one
    warning, and the mount reads without the cache rather than not at all."""
    tiny_node(tmp_path / "node", {"segments/big": b"x" * 300_000, "small": b"small file"})
    (tmp_path / "file").write_text("")
    env = s3_env(tmp_path, s3_server, s3_bucket, BACKUP_CACHE_DIR=str(tmp_path / "file"))
    assert run_cli("backup", "--config", env).returncode == 0
    with Mount(env, tmp_path / "mnt") as m:
        assert (m.path / "node1" / "segments" / "big").read_bytes() == b"x" * 300_000
        assert (m.path / "node1" / "small").read_bytes() == b"small file"
        err = m.stderr()
    assert err.count("\n") == 1 and f"BACKUP_CACHE_DIR {tmp_path / 'file'}" in err, err
    assert "without the cache" in err, err
