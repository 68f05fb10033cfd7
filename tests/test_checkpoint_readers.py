"""Readers next to checkpoints (FORMAT.md 7.4): a checkpoint a writer deletes between a
reader's listing and its reading is not damage; superseded checkpoints stay out of the mount;
a checkpoint whose base is gone is reported; rollback records name complete generations only."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import KEY, ROOT, clean_env, run_cli, write_env
from storetools import backup, create_store

from humiofs.check import Checker
from humiofs.errors import ConfigError, StoreError
from humiofs.mount.sources import Source
from humiofs.store import generations
from humiofs.store.format import Generation
from humiofs.store.localstate import LocalState
from humiofs.store.repository import Store, new_generation_name

HOST_ID = "1a2b3c4d-5e6f-4a1b-9c2d-3e4f5a6b7c8d"


def _node(root: Path, files: int = 3) -> Path:
    root.mkdir(parents=True)
    (root / "cluster_membership.uuid").write_text("0b2f3c4d-5e6f-4a1b-9c2d-3e4f5a6b7c8d")
    for i in range(files):
        (root / f"segment_{i}").write_bytes(os.urandom(4096) * (i + 1))
    old = time.time() - 60
    for p in [root, *root.iterdir()]:
        os.utime(p, (old, old))
    return root


def _checkpoint(store: Store, of: Generation, time_ms: int, base: str | None) -> Generation:
    """Commits a checkpoint holding what `of` holds, at `time_ms`, based on `base`."""
    cp = dataclasses.replace(of, name=new_generation_name(time_ms), time_ms=time_ms,
                             checkpoint=True, base=base)
    store.commit_generation(cp)
    return cp


def _store(tmp_path: Path) -> tuple[Store, Generation]:
    store = create_store(tmp_path / "backup" / "node1")
    first, _ = backup(store, _node(tmp_path / "node"), host_id=HOST_ID)
    return store, first


# -- 1: a checkpoint superseded between listing and reading ----------------------------------

def test_check_takes_a_checkpoint_deleted_after_its_listing_for_superseded_not_damaged(
        tmp_path: Path) -> None:
    store, first = _store(tmp_path)
    cp = _checkpoint(store, first, first.time_ms + 1000, first.name)
    checker = Checker(store, KEY)
    checker._layout()                               # lists generations/ ...
    os.unlink(store.path / "generations" / cp.name)     # ... a writer supersedes cp ...
    gens = checker._generations()                   # ... then check reads them
    assert [g.name for g in gens] == [first.name]
    assert checker.report.healthy, [p.message for p in checker.report.problems.values()]
    assert checker.gen_names == [first.name]


def test_readers_skip_a_generation_file_gone_since_the_listing(tmp_path: Path) -> None:
    store, first = _store(tmp_path)
    cp = _checkpoint(store, first, first.time_ms + 1000, first.name)
    listed = store.list_generations()
    os.unlink(store.path / "generations" / cp.name)
    assert generations.load_listed(store, listed[-1]) is None       # gone: not damage
    assert generations.load_listed(store, listed[0]) == first
    # The mount's source: no "damaged generation" warning, and it is not shown.
    source = Source(store, None)
    assert source.generation(cp.name) is None and not source.bad
    source.refresh()
    assert source.names == [first.name] and source.current == first
    # A file that is there but does not read back is still damage.
    (store.path / "generations" / cp.name).write_bytes(b"HUMIOFG\1" + b"\0" * 40)
    with pytest.raises(StoreError):
        generations.load_listed(store, cp.name)


@pytest.mark.allow_warnings
def test_check_and_ls_stay_clean_while_the_writer_commits_and_supersedes_checkpoints(
        tmp_path: Path, _test_state_dir: Path) -> None:
    """A real writer committing a checkpoint after every file (each deleting the one before):
    every check and ls meanwhile is healthy, names no rollback and no damage."""
    node = _node(tmp_path / "node", 0)
    (tmp_path / "backup").mkdir()
    for i in range(40):
        (node / f"segment_{i:02d}").write_bytes(os.urandom(256 << 10))
    old = time.time() - 60
    for p in [node, *node.iterdir()]:
        os.utime(p, (old, old))
    env_file = write_env(tmp_path / "env", tmp_path / "backup", directory=node,
                         BACKUP_CHECKPOINT_BYTES="1", BACKUP_CHECKPOINT_SECONDS="0")
    store_path = tmp_path / "backup" / "node1"
    first = run_cli("backup", "-c", env_file, "--no-progress")   # a base, and the record
    assert first.returncode == 0, first.stderr
    for p in node.iterdir():
        p.write_bytes(os.urandom(256 << 10))
        os.utime(p, (old, old))
    os.utime(node, (old, old))
    proc = subprocess.Popen([sys.executable, "-m", "humiofs", "backup", "-c", str(env_file),
                             "--no-progress"], env=clean_env(), text=True, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    store = Store.open(store_path, KEY)
    state = LocalState.of(_test_state_dir)
    assert state is not None
    runs = 0
    try:
        while proc.poll() is None or runs == 0:
            report = Checker(store, KEY).run()
            assert report.healthy, [p.message for p in report.problems.values()]
            assert state.observe(store, report.newest) is None
            runs += 1
    finally:
        proc.kill()
        out, err = proc.communicate()
    assert proc.returncode == 0, out + err
    assert runs > 1


# -- 2: rollback records name complete generations only; a dry run records nothing ------------

def test_prune_records_a_checkpoints_base_and_a_dry_run_records_nothing(
        tmp_path: Path, _test_state_dir: Path) -> None:
    store, first = _store(tmp_path)
    cp = _checkpoint(store, first, first.time_ms + 1000, first.name)
    env_file = write_env(tmp_path / "env", tmp_path / "backup")
    r = run_cli("prune", "-c", env_file, "--dry-run")
    assert r.returncode == 0, r.stderr
    state = LocalState.of(_test_state_dir)
    assert state is not None and state.recorded(store.store_id, store.path) is None
    r = run_cli("prune", "-c", env_file)
    assert r.returncode == 0, r.stderr
    assert state.recorded(store.store_id, store.path) == first.name != cp.name


# -- 3, 4, 5: restore and the mount with checkpoints left behind ------------------------------

def test_restore_of_a_checkpoint_by_name_finishes_with_warnings(tmp_path: Path) -> None:
    store, first = _store(tmp_path)
    cp = _checkpoint(store, first, first.time_ms + 1000, first.name)
    env_file = write_env(tmp_path / "env", tmp_path / "backup")
    r = run_cli("restore", "-c", env_file, "--at", cp.name, "--to", tmp_path / "r", "-q",
                "--no-progress")
    assert r.returncode == 8, r.stdout + r.stderr
    r = run_cli("restore", "-c", env_file, "--to", tmp_path / "r2", "--no-progress")
    assert r.returncode == 0, r.stdout + r.stderr


def test_a_superseded_checkpoint_is_not_in_the_mounts_generations(tmp_path: Path) -> None:
    """A first backup killed between its final commit and deleting its checkpoint: the old
    checkpoint is no folder of .generations, and --at its time names the later generation."""
    store, first = _store(tmp_path)
    cp = _checkpoint(store, first, first.time_ms - 1000, None)   # the first run's checkpoint
    source = Source(store, None)
    source.refresh()
    assert source.names == [first.name]
    assert [n for _, n in source.time_names()] == [first.name]
    at = generations.parse_at(generations.folder_time(cp.time_ms))
    with pytest.raises(StoreError, match="finished later, as generation .*" + first.name) as e:
        generations.pick(store, at)
    assert "first backup that has not finished" not in str(e.value)


def test_a_checkpoint_whose_base_is_gone_is_a_problem_and_restore_names_the_base(
        tmp_path: Path) -> None:
    store, first = _store(tmp_path)
    cp = _checkpoint(store, first, first.time_ms + 1, first.name)
    os.unlink(store.path / "generations" / first.name)
    report = Checker(store, KEY).run()
    assert not report.healthy
    messages = [p.message for p in report.problems.values()]
    assert any(first.name in m and "last complete restore point" in m for m in messages)
    with pytest.raises(StoreError, match=f"based on generation {first.name}.*missing"):
        generations.pick(store)
    # A checkpoint superseded by a later complete generation is no problem without its base.
    second, _ = backup(store, tmp_path / "node", host_id=HOST_ID)
    assert cp.name not in store.list_generations()      # the run from it deleted it
    _checkpoint(store, first, second.time_ms - 1, first.name)
    assert Checker(store, KEY).run().healthy


# -- 6: backup --watch stopped during its first pass ------------------------------------------

@pytest.mark.parametrize("json_out", [False, True])
def test_a_watch_stopped_in_its_first_pass_says_it_committed_a_checkpoint(
        tmp_path: Path, json_out: bool) -> None:
    import json
    import signal

    from test_checkpoint import _wait_stopped, make_node
    node = make_node(tmp_path / "node")
    env_file = write_env(tmp_path / "env", tmp_path / "backup", directory=node,
                         BACKUP_CHECKPOINT_BYTES="0", BACKUP_CHECKPOINT_SECONDS="0")
    env = clean_env()
    env["HUMIOFS_FAILPOINT"] = "pack:8"
    proc = subprocess.Popen([sys.executable, "-m", "humiofs", "backup", "-c", str(env_file),
                             "--watch", "--no-progress"] + (["--json"] if json_out else []),
                            env=env, text=True, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _wait_stopped(proc)
        proc.send_signal(signal.SIGTERM)
        proc.send_signal(signal.SIGCONT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, out + err
    store = Store.open(tmp_path / "backup" / "node1", KEY)
    (cp,) = store.list_generations()
    if json_out:
        (line,) = [json.loads(x) for x in out.splitlines() if x.strip()]
        assert line["checkpoint"] == cp and line["interrupted"] is True, line
        assert line["committed"] is False and line["generation"] is None, line
    else:
        assert f"0 generation(s) committed; committed checkpoint {cp}" in out, out
        assert "the next run resumes" in out, out


# -- 7: messages -------------------------------------------------------------------------------

def test_ls_counts_checkpoints_apart_and_restore_help_has_no_watch(tmp_path: Path) -> None:
    store, first = _store(tmp_path)
    _checkpoint(store, first, first.time_ms + 1, first.name)
    env_file = write_env(tmp_path / "env", tmp_path / "backup")
    r = run_cli("ls", "-c", env_file)
    assert r.returncode == 0 and "node1: 1 generation(s), 1 checkpoint(s)" in r.stdout, r.stdout
    r = run_cli("restore", "--help")
    assert "--json" in r.stdout and "--watch" not in r.stdout, r.stdout
    r = run_cli("backup", "--help")
    assert "one per pass with --watch" in " ".join(r.stdout.split()), r.stdout


@pytest.mark.allow_warnings
def test_the_mount_says_a_store_holds_only_a_checkpoint_of_an_unfinished_first_backup(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from humiofs.mount import tree
    store, first = _store(tmp_path)
    _checkpoint(store, first, first.time_ms + 1, None)
    os.unlink(store.path / "generations" / first.name)
    model = tree.Tree.from_backup_dir(tmp_path / "backup", KEY)
    try:
        assert "only a checkpoint of a first backup that has not finished" in caplog.text
        assert "has no generation yet" not in caplog.text
    finally:
        model.close()


# -- 8: the checkpoint settings ------------------------------------------------------------------

@pytest.mark.parametrize("name", ["BACKUP_CHECKPOINT_SECONDS", "BACKUP_CHECKPOINT_BYTES",
                                  "DELETE_BACKUP_AFTER_MILLIS"])
@pytest.mark.parametrize("raw, why", [
    ("+5", "whole number"), ("10_000", "whole number"), ("-0", "negative"),
    ("-5", "negative"), ("\u0665", "whole number"), ("５", "whole number"), ("1.5", "whole number"),
    ("9" * 30, "too large"), (str(1 << 63), "too large")])
def test_integer_settings_take_ascii_digits_only(name: str, raw: str, why: str) -> None:
    from test_config import NO_FLAGS

    from humiofs.config import load
    with pytest.raises(ConfigError, match=f"{name}.*{why}"):
        load(NO_FLAGS, environ={name: raw})


@pytest.mark.allow_warnings
def test_checkpoint_settings_blanks_and_a_tiny_size(caplog: pytest.LogCaptureFixture) -> None:
    from test_config import NO_FLAGS

    from humiofs.config import DEFAULT_CHECKPOINT_S, load
    assert load(NO_FLAGS, environ={"BACKUP_CHECKPOINT_SECONDS": " 5 "}).checkpoint_s == 5
    assert load(NO_FLAGS, environ={"BACKUP_CHECKPOINT_SECONDS": ""}).checkpoint_s == \
        DEFAULT_CHECKPOINT_S
    assert not caplog.records
    assert load(NO_FLAGS, environ={"BACKUP_CHECKPOINT_BYTES": "4096"}).checkpoint_bytes == 4096
    assert "after nearly every file" in caplog.text
