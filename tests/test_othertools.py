"""Other tools pointed at the mount, and a mount started before any backup: restic's change
detection (path, size, mtime, ctime, inode) reads only what changed after a remount and a new
generation; stores created after the mount started appear in it."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import write_env
from mountutil import Mount, backup, create_store, tiny_node, wait_for

pytestmark = pytest.mark.skipif(not shutil.which("restic"), reason="restic is not installed "
                                "(scripts/setup installs it)")

FILES = {f"dataspace/ds{i}/segment_{j}.gz": os.urandom(20_000 + i * 1000 + j)
         for i in range(3) for j in range(4)}


def restic_backup(repo: Path, path: Path) -> tuple[dict[str, object], dict[str, str]]:
    """restic backup --json -vv of `path`: its summary, and the action it took per file
    ("new", "modified", "unchanged"), by path relative to `path`."""
    env = {**os.environ, "RESTIC_PASSWORD": "restic-test", "RESTIC_REPOSITORY": str(repo),
           "RESTIC_CACHE_DIR": str(repo.parent / "restic-cache")}
    done = subprocess.run(["restic", "backup", "--json", "-vv", str(path)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    summary: dict[str, object] = {}
    actions: dict[str, str] = {}
    for line in done.stdout.splitlines():
        msg = json.loads(line)
        if msg.get("message_type") == "summary":
            summary = msg
        elif msg.get("message_type") == "verbose_status" and not msg["item"].endswith("/"):
            actions[os.path.relpath(msg["item"], path)] = msg["action"]
    assert summary, done.stdout
    return summary, actions


def test_restic_reads_only_the_changed_file_after_remount_and_new_generation(
        tmp_path: Path) -> None:
    src = tiny_node(tmp_path / "src", FILES)
    store = create_store(tmp_path / "backup" / "node1")
    backup(store, src)
    env = write_env(tmp_path / "m.env", tmp_path / "backup")
    repo = tmp_path / "restic"
    subprocess.run(["restic", "init"], env={**os.environ, "RESTIC_PASSWORD": "restic-test",
                                            "RESTIC_REPOSITORY": str(repo)},
                   check=True, capture_output=True)
    mnt = tmp_path / "mnt"
    with Mount(env, mnt):
        first, _ = restic_backup(repo, mnt / "node1")
        before = {rel: os.lstat(mnt / "node1" / rel) for rel in FILES}
    assert first["files_new"] == len(FILES) + 2     # + cluster_membership.uuid and the seed
    changed = "dataspace/ds1/segment_2.gz"
    (src / changed).write_bytes(os.urandom(30_000))
    backup(store, src)
    with Mount(env, mnt):
        # Another order of first visits than in the first mount: numbers must not depend on it.
        after = {rel: os.lstat(mnt / "node1" / rel) for rel in reversed(FILES)}
        second, actions = restic_backup(repo, mnt / "node1")
    for rel in FILES:
        if rel != changed:
            assert (after[rel].st_ino, after[rel].st_ctime_ns, after[rel].st_mtime_ns) == \
                (before[rel].st_ino, before[rel].st_ctime_ns, before[rel].st_mtime_ns), rel
    assert after[changed].st_ino != before[changed].st_ino
    # Read again: the changed file, and the seed file, whose mtime is its generation's time.
    read = {rel for rel, action in actions.items() if action != "unchanged"}
    seed = {rel for rel in read if rel.startswith("globaldata/cluster_membership-")}
    assert read - seed == {changed} and len(seed) == 1, actions
    assert second["files_changed"] == 2 and second["files_new"] == 0
    assert second["files_unmodified"] == len(FILES)
    assert second["data_added"] < 40_000   # the changed file's 30,000 bytes and little else


def test_mount_starts_before_any_backup_and_shows_new_stores(tmp_path: Path) -> None:
    backup_dir = tmp_path / "backup"        # does not exist yet
    env = write_env(tmp_path / "m.env", backup_dir, name=None)
    with Mount(env, tmp_path / "mnt") as m:
        assert os.listdir(m.path) == [".generations"]
        assert "no backups in" in m.stderr()
        store = create_store(backup_dir / "node1")
        wait_for(lambda: os.listdir(m.path / ".generations") == ["node1"], "the new store")
        assert os.listdir(m.path) == [".generations"]   # no generation yet
        src = tiny_node(tmp_path / "src", {"a": b"one"})
        backup(store, src)
        wait_for(lambda: "node1" in os.listdir(m.path), "the first generation")
        assert (m.path / "node1" / "a").read_bytes() == b"one"
        (src / "a").write_bytes(b"two")
        backup(store, src)
        wait_for(lambda: (m.path / "node1" / "a").read_bytes() == b"two", "the new generation")
        other = create_store(backup_dir / "node2")
        backup(other, tiny_node(tmp_path / "src2", {"b": b"three"}))
        wait_for(lambda: (m.path / "node2" / "b").exists(), "a second store")
        assert (m.path / "node2" / "b").read_bytes() == b"three"
        assert m.proc is not None and m.proc.poll() is None
