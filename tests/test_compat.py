"""A store written by humiofs 0.1 (version 1 trees, tests/data/v1-store) still restores,
mounts, checks, and takes new backups, which write version 2 trees (docs/FORMAT.md 7.1.1)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from conftest import KEY, run_cli, write_env
from mountutil import Mount

from humiofs.errors import EXIT_OK
from humiofs.store import crypto
from humiofs.store.repository import Store

V1_STORE = Path(__file__).parent / "data" / "v1-store"
MTIME_NS = 1735787045_123456789      # 2025-01-02T03:04:05.123456789Z, as `touch -d` set it
DIR_MTIME_NS = 1735787045_000000000


@pytest.fixture
def v1(tmp_path: Path) -> Path:
    """A copy of the version 1 store in a BACKUP_DIR; returns the env file."""
    backup_dir = tmp_path / "backup"
    shutil.copytree(V1_STORE, backup_dir / "v1node")
    # git keeps no empty folders: lay out what a store created by 0.1 had (FORMAT.md 2).
    for sub in ["tmp"] + [f"packs/{i:02x}" for i in range(256)]:
        (backup_dir / "v1node" / sub).mkdir(parents=True, exist_ok=True)
    for dirpath, dirnames, filenames in os.walk(backup_dir):
        for name in filenames:
            os.chmod(os.path.join(dirpath, name), 0o600)
        for name in dirnames:
            os.chmod(os.path.join(dirpath, name), 0o700)
    return write_env(tmp_path / "v1.env", backup_dir, name="v1node")


def check_node(root: Path) -> None:
    assert (root / "dataspace_1" / "datasource_1" / "segment_1").read_bytes() == b"seg"
    assert (root / "big").read_bytes() == b"z" * 70000
    assert (root / "sparse").stat().st_size == 1 << 20 and (root / "sparse").stat().st_blocks == 0
    assert os.readlink(root / "humiodata.current") == "dataspace_1"
    assert (root / "big").stat().st_mtime_ns == MTIME_NS
    assert (root / "dataspace_1").stat().st_mtime_ns == DIR_MTIME_NS


def test_the_store_holds_version_1_trees(v1: Path) -> None:
    store = Store.open(v1.parent / "backup" / "v1node", KEY)
    gen = store.load_generation(store.list_generations()[-1])
    assert store.read_blob(gen.root.tree, crypto.KIND_TREE)[:3] == b"HT\x01"


def test_version_1_store_restores_and_checks(v1: Path, tmp_path: Path) -> None:
    r = run_cli("restore", "--config", v1, "--to", tmp_path / "r")
    assert r.returncode == EXIT_OK, r.stderr
    check_node(tmp_path / "r")
    r = run_cli("check", "--config", v1, "--read-data")
    assert r.returncode == EXIT_OK, r.stdout + r.stderr


def test_version_1_store_mounts(v1: Path, tmp_path: Path) -> None:
    with Mount(v1, tmp_path / "mnt") as m:
        node = m.path / "v1node"
        check_node(node)
        # Version 1 did not count subfolders: 1 ("not counted"), never a wrong 2.
        assert (node / "dataspace_1").stat().st_nlink == 1
        assert os.listxattr(node / "big") == []


def test_new_backup_into_a_version_1_store(v1: Path, tmp_path: Path) -> None:
    r = run_cli("restore", "--config", v1, "--to", tmp_path / "node")
    assert r.returncode == EXIT_OK, r.stderr
    os.setxattr(tmp_path / "node" / "big", b"user.new", b"1")
    env = write_env(tmp_path / "new.env", v1.parent / "backup", name="v1node",
                    directory=tmp_path / "node")
    r = run_cli("backup", "--config", env)
    assert r.returncode == EXIT_OK, r.stderr
    store = Store.open(v1.parent / "backup" / "v1node", KEY)
    gen = store.load_generation(store.list_generations()[-1])
    assert store.read_blob(gen.root.tree, crypto.KIND_TREE)[:3] == b"HT\x02"
    r = run_cli("restore", "--config", v1, "--to", tmp_path / "again")
    assert r.returncode == EXIT_OK, r.stderr
    check_node(tmp_path / "again")
    assert os.getxattr(tmp_path / "again" / "big", b"user.new") == b"1"
    r = run_cli("check", "--config", v1, "--read-data")
    assert r.returncode == EXIT_OK, r.stdout + r.stderr
