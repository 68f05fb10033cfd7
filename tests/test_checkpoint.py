"""Checkpoints of a long backup (FORMAT.md 7.4): the format, how readers and retention treat
them, and resuming after a kill -9 at several points of a first backup."""
from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import KEY, ROOT, clean_env, run_cli, tree_digest, write_env
from storetools import backup, create_store

from humiofs import prune
from humiofs.errors import IntegrityError, StoreError
from humiofs.store import format, generations
from humiofs.store.format import Generation, Ref, RootAttrs

MiB = 1 << 20
FILES = 20                  # 1 MiB each (a pack each), in 4 folders: 20 MiB in all
FILE_SIZE = 1 << 20
NODE_BYTES = FILES * FILE_SIZE
CHECKPOINT_BYTES = NODE_BYTES // 10


def make_node(root: Path, seed: int = 7) -> Path:
    """A node of FILES files of FILE_SIZE random bytes; also creates BACKUP_DIR next to it."""
    (root.parent / "backup").mkdir(exist_ok=True)
    rnd = random.Random(seed)
    for i in range(FILES):
        d = root / f"dataspace_{i % 4}" / f"datasource_{i % 3}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"segment_{i:03d}").write_bytes(rnd.randbytes(FILE_SIZE))
    (root / "cluster_membership.uuid").write_text("0b2f3c4d-5e6f-4a1b-9c2d-3e4f5a6b7c8d")
    # Old enough that no file is in the writer's racy window (which would read it twice).
    old = time.time() - 60
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames:
            os.utime(os.path.join(dirpath, name), (old, old))
    return root


# -- the format and the readers ---------------------------------------------------------------

def _gen(name: str, checkpoint: bool = False, base: str | None = None) -> Generation:
    ref = Ref(b"\1" * 16, b"\2" * 16, 8, 32, 16)
    return Generation(name, format.generation_time(name), "n", "h", "/d",
                      RootAttrs(0o755, 0, 0, 0, ref), None, {"files": 1}, checkpoint, base)


def test_checkpoint_plaintext_is_version_2_and_a_complete_generation_stays_version_1() -> None:
    base = "1764000000000-00000000000000aa"
    cp = _gen("1764000000001-00000000000000bb", checkpoint=True, base=base)
    doc = json.loads(format.encode_generation(cp))
    assert doc["version"] == 2 and doc["checkpoint"] == {"base": base}
    back = format.decode_generation(format.encode_generation(cp), cp.name)
    assert back.checkpoint and back.base == base
    full = _gen(base)
    assert json.loads(format.encode_generation(full))["version"] == 1
    assert not format.decode_generation(format.encode_generation(full), base).checkpoint


def test_version_2_without_its_checkpoint_is_refused() -> None:
    name = "1764000000001-00000000000000bb"
    doc = json.loads(format.encode_generation(_gen(name)))
    doc["version"] = 2
    with pytest.raises(IntegrityError, match="without its checkpoint"):
        format.decode_generation(json.dumps(doc).encode(), name)
    doc["version"] = True       # JSON true is not the integer 1
    with pytest.raises(IntegrityError, match="unsupported version"):
        format.decode_generation(json.dumps(doc).encode(), name)


def test_retention_drops_a_checkpoint_only_once_a_complete_generation_is_newer() -> None:
    day = 86_400_000
    now = 1764000000000 + 30 * day
    names = [f"{now - (5 - i) * day:013d}-{i:016x}" for i in range(5)]
    gens = [(names[0], _gen(names[0])),
            (names[1], _gen(names[1], checkpoint=True)),       # superseded by names[2]
            (names[2], _gen(names[2])),
            (names[3], _gen(names[3])),
            (names[4], _gen(names[4], checkpoint=True))]       # newest: a run resumes from it
    decided = {d.name: d for d in prune.plan(gens, now, 7 * day, lambda g, n: None)}
    assert not decided[names[1]].keep
    assert decided[names[4]].keep and "checkpoint" in decided[names[4]].reason
    # The complete ones are decided as if the checkpoints were not there: names[3] is the
    # latest (not the checkpoint after it), names[2] the last of its day.
    assert "latest" in decided[names[3]].reason
    assert decided[names[2]].keep and "latest" not in decided[names[2]].reason


# -- through the CLI: kill -9 at several points ------------------------------------------------

def _popen(env_file: Path, failpoint: str | None, **extra: str) -> subprocess.Popen[str]:
    env = clean_env()
    if failpoint:
        env["HUMIOFS_FAILPOINT"] = failpoint
    env.update(extra)
    return subprocess.Popen([sys.executable, "-m", "humiofs", "backup", "-c", str(env_file),
                             "--no-progress"], env=env, text=True, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _wait_stopped(proc: subprocess.Popen[str], timeout: float = 60) -> None:
    """Waits until `proc` stopped itself at its failpoint (state T), failing if it ends."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"backup ended (rc {proc.returncode}) before its failpoint: {out}{err}")
        with open(f"/proc/{proc.pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "T":
                return
        assert time.monotonic() < deadline, "the backup never reached its failpoint"
        time.sleep(0.005)


_UNITS = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}


def _read_bytes(summary: str) -> float:
    m = re.search(r"read ([\d.]+) (B|KiB|MiB|GiB)", summary)
    assert m, summary
    return float(m.group(1)) * _UNITS[m.group(2)]


def _checkpoints(store_path: Path) -> list[str]:
    from humiofs.store.repository import Store
    store = Store.open(store_path, KEY)
    return [n for n in store.list_generations() if store.load_generation(n).checkpoint]


@pytest.mark.parametrize("failpoint, at_most", [
    ("checkpoint:1", 0.95),     # right after the first checkpoint
    ("pack:9", 0.9),            # between two checkpoints, packs in the journal
    ("committing:4", 0.8),      # the 4th checkpoint announced in the journal, not written
    ("checkpoint:6", 0.5),      # 60% of the node: the target
])
def test_kill_9_during_a_first_backup_resumes_from_the_last_checkpoint(
        tmp_path: Path, failpoint: str, at_most: float) -> None:
    node = make_node(tmp_path / "node")
    env_file = write_env(tmp_path / "env", tmp_path / "backup", directory=node,
                         BACKUP_CHECKPOINT_BYTES=str(CHECKPOINT_BYTES),
                         BACKUP_CHECKPOINT_SECONDS="0")
    store_path = tmp_path / "backup" / "node1"
    proc = _popen(env_file, failpoint)
    try:
        _wait_stopped(proc)
    finally:
        proc.kill()
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    # What the kill left: a valid store whose only generations are checkpoints.
    left = _checkpoints(store_path)
    assert left and len(left) == len(os.listdir(store_path / "generations"))
    r = run_cli("check", "-c", env_file)
    assert r.returncode == 0, r.stdout + r.stderr
    r = run_cli("ls", "-c", env_file)
    assert "checkpoint (partial)" in r.stdout and "(latest)" not in r.stdout, r.stdout
    r = run_cli("restore", "-c", env_file, "--to", tmp_path / "r0")
    assert r.returncode == 2 and "only checkpoints" in r.stderr, r.stderr
    # Prune keeps the newest checkpoint and every pack it needs.
    r = run_cli("prune", "-c", env_file, "--grace", "0")
    assert r.returncode == 0, r.stdout + r.stderr
    assert _checkpoints(store_path)[-1] == left[-1]
    r = run_cli("check", "-c", env_file)
    assert r.returncode == 0, r.stdout + r.stderr

    r = run_cli("backup", "-c", env_file, "--no-progress")
    assert r.returncode == 0, r.stdout + r.stderr
    assert _read_bytes(r.stdout) <= at_most * NODE_BYTES, r.stdout
    assert re.search(r" [1-9]\d* unchanged files", r.stdout), r.stdout
    assert f"(resumed from checkpoint {left[-1]})" in r.stdout, r.stdout
    # The resumed run's generation is complete and the only one; nothing is left in tmp/.
    assert _checkpoints(store_path) == []
    assert len(os.listdir(store_path / "generations")) == 1
    assert os.listdir(store_path / "tmp") == []
    r = run_cli("check", "-c", env_file)
    assert r.returncode == 0, r.stdout + r.stderr
    r = run_cli("restore", "-c", env_file, "--to", tmp_path / "r1", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert tree_digest(tmp_path / "r1") == tree_digest(node)
    # What the killed run stored and the resumed one did not use, prune removes.
    r = run_cli("prune", "-c", env_file, "--grace", "0")
    assert r.returncode == 0, r.stderr
    r = run_cli("check", "-c", env_file)
    assert r.returncode == 0 and "unreferenced" not in r.stdout + r.stderr, r.stdout + r.stderr


def test_sigterm_commits_a_checkpoint_and_the_next_run_resumes(tmp_path: Path) -> None:
    node = make_node(tmp_path / "node")
    env_file = write_env(tmp_path / "env", tmp_path / "backup", directory=node,
                         BACKUP_CHECKPOINT_BYTES="0", BACKUP_CHECKPOINT_SECONDS="0")
    store_path = tmp_path / "backup" / "node1"
    proc = _popen(env_file, "pack:10")
    try:
        _wait_stopped(proc)
        proc.send_signal(signal.SIGTERM)
        proc.send_signal(signal.SIGCONT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, out + err
    assert "checkpoint" in err and "Traceback" not in err, err
    assert len(_checkpoints(store_path)) == 1
    r = run_cli("backup", "-c", env_file, "--no-progress")
    assert r.returncode == 0, r.stdout + r.stderr
    assert _read_bytes(r.stdout) <= 0.6 * NODE_BYTES, r.stdout
    assert _checkpoints(store_path) == [] and os.listdir(store_path / "tmp") == []


@pytest.mark.allow_warnings
def test_an_incremental_run_checkpoints_the_parents_entries_it_has_not_reached(
        tmp_path: Path) -> None:
    """A checkpoint of a run with a parent holds the parent's entries for what the run had
    not reached: it is as good a parent, and never the latest for readers."""
    node = make_node(tmp_path / "node")
    store = create_store(tmp_path / "backup" / "node1")
    first, _ = backup(store, node)
    for i in range(0, FILES, 2):                        # half of the files change
        p = next(node.glob(f"*/*/segment_{i:03d}"))
        p.write_bytes(random.Random(i).randbytes(FILE_SIZE))
    os.utime(node, None)
    proc_env = write_env(tmp_path / "env", tmp_path / "backup", directory=node,
                         BACKUP_CHECKPOINT_BYTES=str(CHECKPOINT_BYTES),
                         BACKUP_CHECKPOINT_SECONDS="0")
    proc = _popen(proc_env, "checkpoint:2")
    try:
        _wait_stopped(proc)
    finally:
        proc.kill()
        proc.communicate()
    # Stopped right after writing checkpoint 2, before deleting checkpoint 1.
    older, cp_name = _checkpoints(store.path)
    cp = store.load_generation(cp_name)
    assert cp.base == first.name
    from storetools import files
    assert set(files(store, cp)) == set(files(store, first))     # nothing left out
    assert generations.pick(store).generation.name == first.name
    assert generations.latest_readable(store).name == cp_name   # the next run's parent
    # --at a time at or after the checkpoint takes the complete generation before it.
    assert generations.pick(store, generations.At.from_ms(cp.time_ms)).generation.name \
        == first.name
    with pytest.raises(StoreError):
        generations.pick(store, generations.parse_at("@1"))
    assert generations.pick(store, generations.parse_at(cp_name)).generation.checkpoint


@pytest.mark.allow_warnings
def test_the_mount_never_shows_a_checkpoint(tmp_path: Path) -> None:
    """NAME/ shows the latest complete generation and .generations/ leaves out the checkpoint
    a killed run left behind, also when the checkpoint holds a file the complete one lacks."""
    from mountutil import listdir, resolve

    from humiofs.mount import tree
    from humiofs.store.repository import Store
    node = make_node(tmp_path / "node")
    store = create_store(tmp_path / "backup" / "node1")
    first, _ = backup(store, node)
    (node / "dataspace_0" / "aaa_new").write_bytes(b"x" * (3 << 20))
    os.utime(node / "dataspace_0", (time.time() - 60, time.time() - 60))
    env_file = write_env(tmp_path / "env", tmp_path / "backup", directory=node,
                         BACKUP_CHECKPOINT_BYTES="1", BACKUP_CHECKPOINT_SECONDS="0")
    proc = _popen(env_file, "checkpoint:1")
    try:
        _wait_stopped(proc)
    finally:
        proc.kill()
        proc.communicate()
    assert _checkpoints(store.path)
    model = tree.Tree([Store.open(store.path, KEY)])
    shown = listdir(model, resolve(model, b"node1/dataspace_0").inode)
    assert b"aaa_new" not in shown
    gens = listdir(model, resolve(model, b".generations/node1").inode)
    assert [n.decode() for n in gens] == [generations.folder_time(first.time_ms)]


def test_a_stopped_first_watch_pass_commits_a_checkpoint_not_a_generation(
        tmp_path: Path) -> None:
    """`backup --watch` stopped during its first pass: what it had not read yet is not in
    the store, so it commits a checkpoint (never a complete generation lacking those files),
    exits 0, and the next run resumes from it."""
    node = make_node(tmp_path / "node")
    env_file = write_env(tmp_path / "env", tmp_path / "backup", directory=node,
                         BACKUP_CHECKPOINT_BYTES="0", BACKUP_CHECKPOINT_SECONDS="0")
    store_path = tmp_path / "backup" / "node1"
    env = clean_env()
    env["HUMIOFS_FAILPOINT"] = "pack:8"
    proc = subprocess.Popen([sys.executable, "-m", "humiofs", "backup", "-c", str(env_file),
                             "--watch", "--no-progress"], env=env, text=True, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _wait_stopped(proc)
        proc.send_signal(signal.SIGTERM)
        proc.send_signal(signal.SIGCONT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, out + err
    assert len(_checkpoints(store_path)) == len(os.listdir(store_path / "generations")) == 1
    r = run_cli("backup", "-c", env_file, "--no-progress")
    assert r.returncode == 0, r.stdout + r.stderr
    assert _read_bytes(r.stdout) <= 0.7 * NODE_BYTES, r.stdout
    assert _checkpoints(store_path) == []


def test_prune_next_to_a_running_writer_keeps_its_checkpoint_and_its_newer_packs(
        tmp_path: Path) -> None:
    node = make_node(tmp_path / "node")
    env_file = write_env(tmp_path / "env", tmp_path / "backup", directory=node,
                         BACKUP_CHECKPOINT_BYTES=str(CHECKPOINT_BYTES),
                         BACKUP_CHECKPOINT_SECONDS="0")
    store_path = tmp_path / "backup" / "node1"
    proc = _popen(env_file, "pack:9")       # alive, holding the writer lock, between checkpoints
    try:
        _wait_stopped(proc)
        r = run_cli("prune", "-c", env_file, "--grace", "0")
        assert r.returncode == 0, r.stdout + r.stderr
        r = run_cli("check", "-c", env_file)
        assert r.returncode == 0, r.stdout + r.stderr
        proc.send_signal(signal.SIGCONT)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, out + err
    r = run_cli("check", "-c", env_file)
    assert r.returncode == 0, r.stdout + r.stderr
    r = run_cli("restore", "-c", env_file, "--to", tmp_path / "r", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert tree_digest(tmp_path / "r") == tree_digest(node)
    assert _checkpoints(store_path) == []
