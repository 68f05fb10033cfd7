"""`backup --watch`: the dirty-folder tracker, incremental passes that equal a full walk, and
the loop itself in a subprocess with short intervals: changes appear in time, an idle node
commits nothing, SIGTERM stops cleanly, kill -9 and a full backup disk leave a healthy store."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import KEY, ROOT, clean_env, make_sample, run_cli, tree_digest, write_env
from storetools import FAST_KDF, files, wait_not_racy

from humiofs.backup.inotify import Dirty, Tracker
from humiofs.backup.scan import DEFAULT_EXCLUDES, Excluder
from humiofs.backup.watch import Watch
from humiofs.backup.writer import Backup, BackupOptions
from humiofs.config import Config
from humiofs.errors import EXIT_IO, EXIT_OK, EXIT_WRONG_KEY
from humiofs.restore import Restore, RestoreOptions
from humiofs.store.format import Generation
from humiofs.store.repository import Store


def wait_for(cond: Callable[[], object], what: str, timeout: float = 30.0,
             proc: subprocess.Popen[bytes] | None = None) -> object:
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"watch exited with {proc.returncode} while waiting for {what}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def node_digest(node: Path) -> dict[str, tuple[object, ...]]:
    return {k: v for k, v in tree_digest(node).items()
            if k != "jvm-tmp" and not k.startswith("jvm-tmp/")}


def restored_digest(store: Store, gen: Generation, target: Path) -> dict[str, tuple[object, ...]]:
    shutil.rmtree(target, ignore_errors=True)
    Restore(store, RestoreOptions(target=target, progress=False)).run(gen)
    return tree_digest(target)


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_sample(tmp_path_factory.mktemp("watch") / "node", size="3M", small_files=60,
                       seed=11)


@pytest.fixture
def node(template: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "node"
    subprocess.run(["cp", "-a", str(template), str(dest)], check=True)
    return dest


# -- the tracker ---------------------------------------------------------------------------------

def test_dirty_clean() -> None:
    d = Dirty()
    d.add_dir(b"a/b")
    d.add_tree(b"x/new")
    d.seal()
    assert not d.clean(b"") and not d.clean(b"a") and not d.clean(b"a/b")
    assert d.clean(b"a/b/c") and d.clean(b"a/c") and d.clean(b"y")
    assert not d.clean(b"x") and not d.clean(b"x/new") and not d.clean(b"x/new/deep")
    assert d.clean(b"x/newer")


@pytest.fixture
def tracker(tmp_path: Path) -> Iterator[tuple[Path, Tracker]]:
    root = tmp_path / "t"
    (root / "a" / "b").mkdir(parents=True)
    (root / "c").mkdir()
    (root / "jvm-tmp").mkdir()
    (root / "a" / "b" / "f").write_text("x")
    t = Tracker(os.fsencode(root), Excluder(DEFAULT_EXCLUDES))
    assert t.take().full
    t.rewatch()
    yield root, t
    t.close()


def test_tracker_reports_changed_folders(tracker: tuple[Path, Tracker]) -> None:
    root, t = tracker
    assert not t.take()
    (root / "a" / "b" / "f").write_text("y")
    d = t.take()
    assert d.dirs == {b"a/b"} and not d.full
    assert d.clean(b"c") and not d.clean(b"a")
    (root / "jvm-tmp" / "scratch").write_text("ignored")
    assert not t.take()


def test_tracker_new_folder_is_walked_whole(tracker: tuple[Path, Tracker]) -> None:
    root, t = tracker
    (root / "c" / "new" / "deep").mkdir(parents=True)
    d = t.take()
    assert b"c/new" in d.trees and not d.clean(b"c/new/deep")
    (root / "c" / "new" / "deep" / "g").write_text("z")    # watched by now
    assert t.take().dirs == {b"c/new/deep"}


def test_tracker_folder_move_asks_for_full_walk(tracker: tuple[Path, Tracker]) -> None:
    root, t = tracker
    os.rename(root / "a", root / "c" / "a")
    assert t.take().full


def test_tracker_overflow_asks_for_full_walk(tracker: tuple[Path, Tracker],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    root, t = tracker
    from humiofs.backup import inotify
    monkeypatch.setattr(t.ino, "read", lambda: iter([(-1, inotify.IN_Q_OVERFLOW, b"")]))
    assert t.take().full


# -- incremental passes equal the node --------------------------------------------------------



def test_incremental_passes_match_the_node(node: Path, tmp_path: Path) -> None:
    (tmp_path / "backup").mkdir()
    store = Store.create(tmp_path / "backup" / "node1", KEY, FAST_KDF)
    cfg = Config(backup_dir=tmp_path / "backup", directory=node, backup_name="node1",
                 backup_key=KEY)
    w = Watch(store, cfg, 1.0, (), False)
    ds = sorted(node.glob("dataspace_*/datasource_*"))
    small = sorted(p for p in node.rglob("*") if p.is_file() and p.stat().st_size < 4096)
    changes: list[Callable[[], None]] = [
        lambda: (ds[0] / "segment_new.gz").write_bytes(os.urandom(200_000)),
        lambda: small[0].write_text("changed contents"),
        lambda: small[1].unlink(),
        lambda: (node / "dataspace_new" / "datasource_1").mkdir(parents=True),
        lambda: (node / "dataspace_new" / "datasource_1" / "s").write_bytes(b"1" * 5000),
        lambda: os.rename(ds[1] / next(os.scandir(ds[1])).name, ds[1] / "renamed"),
        lambda: os.chmod(small[2], 0o600),
        lambda: os.symlink("renamed", ds[1] / "link"),
        lambda: shutil.rmtree(ds[2]),
        lambda: os.rename(node / "dataspace_new", node / "dataspace_moved"),
    ]
    try:
        with store.lock():
            w.tracker = w._start_tracker()
            wait_not_racy(node)
            parent = w._pass(None)
            w.passes += 1
            assert parent is not None
            for n, change in enumerate(changes):
                change()
                last_full = w.last_full
                gen = w._pass(parent)
                w.passes += 1
                # Only moving a folder makes inotify paths stale and asks for a full walk.
                assert (w.last_full != last_full) == (n == len(changes) - 1), n
                assert gen is not None and gen is not parent, f"change {n} not committed"
                parent = gen
                assert restored_digest(store, gen, tmp_path / "r") == node_digest(node), n
                assert w._pass(parent) is parent, f"change {n}: a second pass committed again"
            full = Backup(store, BackupOptions(source=node, backup_name="node1",
                                               progress=False)).build(parent)
            assert full.stats == parent.stats
            assert full.root.tree == parent.root.tree      # same trees, nothing stored again
    finally:
        if w.tracker is not None:
            w.tracker.close()
        store.close()


# -- the loop in a subprocess --------------------------------------------------------------------

class WatchProc:
    def __init__(self, env: Path, store_path: Path, log: Path, *extra: str) -> None:
        self.store_path = store_path
        self.log = log
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "humiofs", "backup", "--config", str(env), "--watch",
             "--interval", "0.3", "-vv", *extra],
            env=clean_env(), cwd=ROOT, stdout=open(log.with_suffix(".out"), "wb"),
            stderr=open(log, "wb"))
        self._store: Store | None = None

    @property
    def store(self) -> Store:
        if self._store is None:
            wait_for(lambda: (self.store_path / "config").exists(), "the store", proc=self.proc)
            self._store = Store.open(self.store_path, KEY)
        return self._store

    def generations(self) -> list[str]:
        return self.store.list_generations()

    def latest(self) -> Generation | None:
        names = self.generations()
        return self.store.load_generation(names[-1]) if names else None

    def wait_in_store(self, node: Path, tmp: Path, timeout: float = 30.0) -> Generation:
        """Polls until the latest generation restores to exactly the node."""
        want = node_digest(node)

        def matches() -> Generation | None:
            gen = self.latest()
            if gen is not None and restored_digest(self.store, gen, tmp) == want:
                return gen
            return None
        return wait_for(matches, "the change in a generation", timeout,  # type: ignore
                        proc=self.proc)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        rc = self.proc.wait(timeout)
        if self._store is not None:
            self._store.close()
        return rc

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")

    def stdout(self) -> str:
        return self.log.with_suffix(".out").read_text(errors="replace")


@pytest.fixture
def watch(node: Path, tmp_path: Path) -> Iterator[Callable[..., WatchProc]]:
    (tmp_path / "backup").mkdir(exist_ok=True)
    procs: list[WatchProc] = []

    def start(*extra: str, backup_dir: Path | None = None, **env_extra: str) -> WatchProc:
        bdir = backup_dir or tmp_path / "backup"
        env = write_env(tmp_path / "env", bdir, directory=node, **env_extra)
        p = WatchProc(env, bdir / "node1", tmp_path / f"watch{len(procs)}.log", *extra)
        procs.append(p)
        return p
    yield start
    for p in procs:
        if p.proc.poll() is None:
            p.proc.kill()
            p.proc.wait()


def check_ok(tmp_path: Path, backup_dir: Path | None = None) -> None:
    env = write_env(tmp_path / "env-check", backup_dir or tmp_path / "backup")
    r = run_cli("check", "--config", env)
    assert r.returncode == EXIT_OK, r.stdout + r.stderr


def test_watch_follows_the_node_and_stops_cleanly(watch: Callable[..., WatchProc], node: Path,
                                                  tmp_path: Path) -> None:
    w = watch()
    first = w.wait_in_store(node, tmp_path / "r")
    ds = sorted(node.glob("dataspace_*/datasource_*"))
    (ds[0] / "segment_new.gz").write_bytes(os.urandom(300_000))
    victim = next(p for p in ds[1].iterdir() if p.is_file())
    victim.unlink()
    (node / "dataspace_9" / "datasource_9").mkdir(parents=True)
    (node / "dataspace_9" / "datasource_9" / "segment_9.gz").write_bytes(b"9" * 70_000)
    gen = w.wait_in_store(node, tmp_path / "r")
    assert gen.name != first.name
    rc = w.stop()
    assert rc == EXIT_OK, w.stderr()
    assert "Traceback" not in w.stderr()
    check_ok(tmp_path)


def test_idle_node_commits_nothing(watch: Callable[..., WatchProc], node: Path,
                                   tmp_path: Path) -> None:
    w = watch()
    w.wait_in_store(node, tmp_path / "r")
    wait_for(lambda: w.stderr().count("nothing changed") >= 2, "two idle passes", proc=w.proc)
    names = w.generations()
    seen = w.stderr().count("nothing changed")
    wait_for(lambda: w.stderr().count("nothing changed") >= seen + 3, "three more idle passes",
             proc=w.proc)
    assert w.generations() == names
    assert w.stop() == EXIT_OK


def test_kill_9_then_backup_completes(watch: Callable[..., WatchProc], node: Path,
                                      tmp_path: Path) -> None:
    w = watch()
    w.wait_in_store(node, tmp_path / "r")
    big = node / "dataspace_big"
    big.mkdir()
    (big / "segment.gz").write_bytes(os.urandom(40 << 20))
    wait_for(lambda: os.listdir(w.store_path / "tmp") or len(w.generations()) > 1,
             "the big file being stored", proc=w.proc)
    assert w.stop(signal.SIGKILL) == -signal.SIGKILL
    env = write_env(tmp_path / "env2", tmp_path / "backup", directory=node)
    r = run_cli("backup", "--config", env, "--no-progress")
    assert r.returncode == EXIT_OK, r.stderr
    check_ok(tmp_path)
    store = Store.open(tmp_path / "backup" / "node1", KEY)
    gen = store.load_generation(store.list_generations()[-1])
    assert restored_digest(store, gen, tmp_path / "r") == node_digest(node)
    store.close()


def test_sigterm_during_a_big_file(watch: Callable[..., WatchProc], node: Path,
                                   tmp_path: Path) -> None:
    w = watch()
    w.wait_in_store(node, tmp_path / "r")
    (node / "segment_big.gz").write_bytes(os.urandom(40 << 20))
    wait_for(lambda: os.listdir(w.store_path / "tmp") or len(w.generations()) > 1,
             "the big file being stored", proc=w.proc)
    assert w.stop() == EXIT_OK, w.stderr()
    check_ok(tmp_path)


def test_a_folder_in_tmp_does_not_stop_the_watch(watch: Callable[..., WatchProc], node: Path,
                                                 tmp_path: Path) -> None:
    """A folder planted in tmp/ (a store that has been backed up into once) is removed, with
    a warning, as the watch starts; the watch then runs on."""
    env = write_env(tmp_path / "env-first", tmp_path / "backup", directory=node)
    assert run_cli("backup", "--config", env, "--no-progress").returncode == EXIT_OK
    planted = tmp_path / "backup" / "node1" / "tmp" / "dd"
    (planted / "deeper").mkdir(parents=True)
    (planted / "deeper" / "file").write_bytes(b"x")
    w = watch()
    wait_for(lambda: "nothing changed" in w.stderr(), "an idle pass", proc=w.proc)
    assert not planted.exists()
    assert f"removed the folder {planted}" in w.stderr()
    assert w.stop() == EXIT_OK, w.stderr()


def test_wrong_key_exits_at_once(watch: Callable[..., WatchProc], node: Path,
                                 tmp_path: Path) -> None:
    w = watch()
    w.wait_in_store(node, tmp_path / "r")
    assert w.stop() == EXIT_OK
    env = write_env(tmp_path / "env-wrong", tmp_path / "backup", directory=node,
                    key="a different key")
    r = run_cli("backup", "--config", env, "--watch", "--interval", "0.3", timeout=60)
    assert r.returncode == EXIT_WRONG_KEY, r.stderr


def test_source_briefly_gone_is_retried(watch: Callable[..., WatchProc], node: Path,
                                        tmp_path: Path) -> None:
    w = watch()
    w.wait_in_store(node, tmp_path / "r")
    away = node.with_name("node-away")
    os.rename(node, away)
    wait_for(lambda: "trying again" in w.stderr(), "the pass to fail", proc=w.proc)
    (away / "while-away").write_text("x")
    os.rename(away, node)
    w.wait_in_store(node, tmp_path / "r")
    assert w.stop() == EXIT_OK


def test_backup_drive_gone_is_retried_not_damage(watch: Callable[..., WatchProc], node: Path,
                                                 tmp_path: Path) -> None:
    """BACKUP_DIR renamed away (the drive unmounted) fails passes, with the reason in the JSON
    error field, and never exits 5; with it back, the watch carries on with the same store."""
    w = watch("--json")
    w.wait_in_store(node, tmp_path / "r")
    backup = tmp_path / "backup"
    away = tmp_path / "backup-away"
    os.rename(backup, away)
    backup.mkdir()      # the bare mountpoint left behind
    (node / "while-away").write_text("x")
    wait_for(lambda: "is gone" in w.stderr(), "a pass to fail", proc=w.proc)
    assert not (backup / "node1").exists()      # nothing created in the bare mountpoint
    backup.rmdir()
    os.rename(away, backup)
    w.wait_in_store(node, tmp_path / "r")
    assert w.stop() == EXIT_OK, w.stderr()
    passes = [json.loads(line) for line in w.stdout().splitlines()]
    failed = [p for p in passes if p["error"]]
    assert failed and "is gone" in failed[0]["error"] and failed[0]["committed"] is False
    assert "Traceback" not in w.stderr()
    check_ok(tmp_path)


def test_a_store_put_back_as_a_copy_stops_the_watch_with_7(
        watch: Callable[..., WatchProc], node: Path, tmp_path: Path) -> None:
    """Another folder in the store's place (a drive mounted again, a copy put back): the
    writer lock is on the old one, so the watch stops with exit 7, which the unit restarts."""
    w = watch()
    w.wait_in_store(node, tmp_path / "r")
    store = tmp_path / "backup" / "node1"
    shutil.copytree(store, tmp_path / "copy")
    os.rename(store, tmp_path / "old")
    os.rename(tmp_path / "copy", store)
    assert w.proc.wait(60) == EXIT_IO, w.stderr()
    assert "not the folder this watch opened" in w.stderr()
    assert "Traceback" not in w.stderr()


def test_watch_waits_for_a_store_it_knows(watch: Callable[..., WatchProc], node: Path,
                                          tmp_path: Path) -> None:
    """A store this host backed up before that is absent when the watch starts is waited
    for, not created anew in what may be an empty mountpoint."""
    w = watch()
    w.wait_in_store(node, tmp_path / "r")
    assert w.stop() == EXIT_OK
    away = tmp_path / "node1-away"
    os.rename(tmp_path / "backup" / "node1", away)
    w2 = watch()
    wait_for(lambda: "waiting for it" in w2.stderr(), "the watch to wait", proc=w2.proc)
    assert not (tmp_path / "backup" / "node1").exists()
    os.rename(away, tmp_path / "backup" / "node1")
    (node / "after").write_text("y")
    w2.wait_in_store(node, tmp_path / "r")
    assert w2.stop() == EXIT_OK, w2.stderr()
    assert "Traceback" not in w2.stderr()


def test_quiet_watch_prints_nothing_on_success(watch: Callable[..., WatchProc], node: Path,
                                               tmp_path: Path) -> None:
    w = watch("-q")
    w.wait_in_store(node, tmp_path / "r")
    assert w.stop() == EXIT_OK
    assert w.stdout() == "" and w.stderr() == ""


def test_quiet_does_not_hold_back_json(watch: Callable[..., WatchProc], node: Path,
                                       tmp_path: Path) -> None:
    w = watch("-q", "--json")
    w.wait_in_store(node, tmp_path / "r")
    assert w.stop() == EXIT_OK
    assert json.loads(w.stdout().splitlines()[0])["watch_pass"] == 1
    env = write_env(tmp_path / "env-ls", tmp_path / "backup")
    r = run_cli("ls", "-q", "--json", "--config", env)
    assert r.returncode == EXIT_OK and json.loads(r.stdout)["store"] == "node1", r.stdout


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """An 8 MiB tmpfs as BACKUP_DIR (needs root)."""
    where = tmp_path / "small-disk"
    where.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m,mode=0700", "tmpfs", str(where)],
                       capture_output=True)
    if r.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_full_disk_stops_and_corrupts_nothing(watch: Callable[..., WatchProc], node: Path,
                                              tmp_path: Path, small_disk: Path) -> None:
    w = watch(backup_dir=small_disk)
    before = w.wait_in_store(node, tmp_path / "r")
    (node / "segment_huge.gz").write_bytes(os.urandom(12 << 20))
    rc = w.proc.wait(60)
    assert rc == EXIT_IO, w.stderr()
    assert "full" in w.stderr()
    assert os.listdir(small_disk / "node1" / "tmp") == []
    check_ok(tmp_path, small_disk)
    store = Store.open(small_disk / "node1", KEY)
    gen = store.load_generation(store.list_generations()[-1])
    assert gen.name == before.name
    (node / "segment_huge.gz").unlink()
    assert restored_digest(store, gen, tmp_path / "r") == node_digest(node)
    store.close()


@pytest.mark.allow_warnings
def test_a_lost_pack_is_not_carried_into_the_next_generation(
        watch: Callable[..., WatchProc], node: Path, tmp_path: Path) -> None:
    """A pass reuses the folders inotify saw no change in without reading their listings; if
    the store lost a pack one of them refers to, the next generation must not refer to it."""
    w = watch()
    first = w.wait_in_store(node, tmp_path / "r")
    ds = sorted(node.glob("dataspace_*/datasource_*"))
    victim = ds[0] / "segment_lost.gz"
    victim.write_bytes(os.urandom(2 << 20))           # in a pack of its own
    with_victim = w.wait_in_store(node, tmp_path / "r")
    assert with_victim.name != first.name
    lost = files(w.store, with_victim)[str(victim.relative_to(node))].data
    assert lost is not None
    os.unlink(w.store.pack_path(lost.pack))
    w.store.close()         # its open packs would still read the lost one
    (ds[1] / "segment_other.gz").write_bytes(os.urandom(100_000))   # another folder changes
    wait_for(lambda: w.generations()[-1] > with_victim.name, "the next generation", proc=w.proc)
    latest = w.latest()
    assert latest is not None
    assert restored_digest(w.store, latest, tmp_path / "r") == node_digest(node)
    assert w.stop() == EXIT_OK
    assert "1 file(s) read again from the node: their stored copy is in a pack missing" \
        in w.stderr() and "segment_lost.gz" in w.stderr()
    r = run_cli("check", "--config", write_env(tmp_path / "env-check", tmp_path / "backup"))
    if with_victim.name in w.generations():
        assert r.returncode == 5 and "segment_lost.gz" in r.stdout, r.stdout
        assert "including the latest" not in r.stdout, r.stdout
    else:
        # The watch's own prune (every PRUNE_EVERY passes) dropped the damaged generation:
        # the latest holds all it held, so retention may. Nothing refers to the lost pack now.
        assert r.returncode == EXIT_OK, r.stdout


@pytest.mark.allow_warnings
def test_no_prune_while_the_store_stands_rolled_back(
        watch: Callable[..., WatchProc], node: Path, tmp_path: Path) -> None:
    """The newest generation gone from the store (this host committed it): the watch's prunes
    delete nothing, so that putting the generation back still works."""
    w = watch(DELETE_BACKUP_AFTER_MILLIS="0")
    w.wait_in_store(node, tmp_path / "r")
    extra = node / "added.bin"
    extra.write_bytes(os.urandom(1 << 20))
    second = w.wait_in_store(node, tmp_path / "r")
    ref = files(w.store, second)["added.bin"].data
    assert ref is not None
    assert w.stop() == EXIT_OK
    extra.unlink()
    (w.store_path / "generations" / second.name).rename(tmp_path / "held-back")
    w2 = watch(DELETE_BACKUP_AFTER_MILLIS="0")
    wait_for(lambda: "prune skipped: the store stands rolled back" in w2.stderr(),
             "the prune to be skipped", proc=w2.proc)
    assert w2.stop() == EXIT_OK
    assert w2.store.pack_path(ref.pack).exists()
