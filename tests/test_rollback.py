"""Rollback detection: this host's record of each store's newest generation (BACKUP_STATE_DIR,
outside the store), and the warnings of backup, check, restore and the mount when the store's
newest generation is older than the one recorded (FORMAT.md 9.1)."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import KEY, clean_env, make_sample, run_cli, write_env
from mountutil import Mount
from storetools import wait_not_racy

pytestmark = pytest.mark.allow_warnings


@pytest.fixture
def two_generations(tmp_path: Path) -> tuple[Path, Path, list[str]]:
    """A node backed up twice through the CLI: (env file, store, generation names)."""
    node = make_sample(tmp_path / "node", size="1M", small_files=20, seed=31)
    wait_not_racy(node)
    (tmp_path / "backups").mkdir()
    env = write_env(tmp_path / "node.env", tmp_path / "backups", directory=node)
    for i in range(2):
        (node / f"added-{i}").write_text(str(i))
        r = run_cli("backup", "-c", env)
        assert r.returncode == 0, r.stderr
    store = tmp_path / "backups" / "node1"
    return env, store, sorted(os.listdir(store / "generations"))


def test_deleting_the_newest_generation_is_noticed(two_generations: tuple[Path, Path, list[str]],
                                                   tmp_path: Path,
                                                   _test_state_dir: Path) -> None:
    env, store, (older, newest) = two_generations
    (store / "generations" / newest).unlink()

    r = run_cli("check", "-c", env)
    assert r.returncode == 5, r.stdout + r.stderr
    assert "was rolled back" in r.stdout and newest in r.stdout and older in r.stdout

    r = run_cli("restore", "-c", env, "--to", tmp_path / "r")
    assert r.returncode == 8, r.stdout + r.stderr
    assert "was rolled back" in r.stderr and older in r.stdout
    assert not (tmp_path / "r" / "added-1").exists()

    r = run_cli("ls", "-c", env)
    assert r.returncode == 0 and "was rolled back" in r.stderr, r.stdout + r.stderr

    # Prune deletes nothing while the rollback stands: putting the generation back must work.
    packs_before = sorted(p.name for p in (store / "packs").glob("*/*"))
    penv = write_env(tmp_path / "prune.env", store.parent, DELETE_BACKUP_AFTER_MILLIS="0")
    r = run_cli("prune", "-c", penv, "--grace", "0")
    assert r.returncode == 5 and "rolled back" in r.stderr, r.stdout + r.stderr
    assert sorted(p.name for p in (store / "packs").glob("*/*")) == packs_before

    log = tmp_path / "mount.log"
    mount_env = write_env(tmp_path / "mount.env", store.parent, name=None)
    with Mount(mount_env, tmp_path / "m", "--log", str(log)):
        pass
    assert "was rolled back" in log.read_text() and newest in log.read_text()

    # The next backup warns as well, then commits a newer generation: the warning stops.
    r = run_cli("backup", "-c", env)
    assert r.returncode == 8 and "was rolled back" in r.stderr, r.stdout + r.stderr
    r = run_cli("check", "-c", env)
    assert r.returncode == 0, r.stdout + r.stderr

    # The record holds the store id and a generation name, never the key.
    (record,) = _test_state_dir.glob("*.json")
    doc = json.loads(record.read_text())
    assert set(doc) == {"version", "store_id", "store", "newest", "recorded_ms"}
    assert KEY not in record.read_text()


def test_an_older_copy_of_the_whole_store_is_noticed(tmp_path: Path) -> None:
    """The store replaced by an older copy of itself (same store id), as a sync tool that
    went the wrong way would leave it."""
    node = make_sample(tmp_path / "node", size="1M", small_files=20, seed=32)
    (tmp_path / "backups").mkdir()
    env = write_env(tmp_path / "node.env", tmp_path / "backups", directory=node)
    assert run_cli("backup", "-c", env).returncode == 0
    store = tmp_path / "backups" / "node1"
    shutil.copytree(store, tmp_path / "old-copy")
    (node / "later").write_text("x")
    assert run_cli("backup", "-c", env).returncode == 0
    shutil.rmtree(store)
    shutil.copytree(tmp_path / "old-copy", store)
    r = run_cli("check", "-c", env)
    assert r.returncode == 5 and "was rolled back" in r.stdout, r.stdout + r.stderr


def test_a_clone_of_the_store_elsewhere_is_no_rollback(tmp_path: Path) -> None:
    """Two copies of one store (same store id) in two places, both backed up from this host:
    neither is taken for a rollback of the other, however the backups alternate."""
    node = make_sample(tmp_path / "node", size="1M", small_files=20, seed=33)
    (tmp_path / "backups").mkdir()
    env = write_env(tmp_path / "node.env", tmp_path / "backups", directory=node)
    assert run_cli("backup", "-c", env).returncode == 0
    (tmp_path / "clones").mkdir()
    shutil.copytree(tmp_path / "backups" / "node1", tmp_path / "clones" / "node1")
    clone_env = write_env(tmp_path / "clone.env", tmp_path / "clones", directory=node)
    for i in range(2):
        (node / f"later-{i}").write_text(str(i))
        for e in (env, clone_env):
            r = run_cli("backup", "-c", e)
            assert r.returncode == 0 and "rolled back" not in r.stderr, r.stderr


def test_a_state_dir_that_cannot_be_written_is_one_warning(
        two_generations: tuple[Path, Path, list[str]], tmp_path: Path) -> None:
    env, store, _ = two_generations
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    r = run_cli("backup", "-c", env,
                env={**clean_env(), "BACKUP_STATE_DIR": str(blocker / "state")})
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stderr.count("rollback detection (BACKUP_STATE_DIR) is off") == 1, r.stderr


def test_a_generation_committed_after_the_listing_is_no_rollback(tmp_path: Path) -> None:
    """check lists the generations, a writer then commits one and records it, and only then
    does check read the record (seen with writers and checks running at once)."""
    from storetools import backup, create_store

    from humiofs.store.localstate import LocalState
    node = tmp_path / "node"
    node.mkdir()
    (node / "f").write_bytes(b"1")
    store = create_store(tmp_path / "backup" / "node1")
    first, _ = backup(store, node, settle=True, host_id="1")
    listed = store.list_generations()
    (node / "f").write_bytes(b"22")
    second, _ = backup(store, node, settle=True, host_id="1")
    state = LocalState(tmp_path / "state")
    assert state.observe(store, second.name) is None         # the writer records it
    assert state.observe(store, first.name, listed) is None
    # A generation really gone from the store is still noticed.
    os.unlink(store.path / "generations" / second.name)
    assert "rolled back" in (state.observe(store, first.name, listed) or "")
