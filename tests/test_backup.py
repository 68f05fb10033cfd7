"""The backup writer, in-process (Store + writer.Backup + restore.Restore) and through the CLI
where processes must die or race: round trips with holes, excludes, incremental runs that read
nothing, changed and deleted files, a killed writer, the lock, files changing during a run."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import KEY, clean_env, make_sample, run_cli, tree_digest, write_env
from storetools import (
    backup,
    create_store,
    file_bytes,
    files,
    pack_files,
    rchar,
    restore,
    source_digest,
    store_files,
    wait_not_racy,
    walk,
)

from humiofs.backup.writer import BackupStats
from humiofs.store import packwriter
from humiofs.store.format import Generation, Identity
from humiofs.store.repository import Store

MiB = 1 << 20


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A sample node backed up by this module's tests; never modified."""
    node = make_sample(tmp_path_factory.mktemp("backup") / "node", size="8M", small_files=250,
                       seed=3, node_id=4)
    wait_not_racy(node)
    return node


@dataclass
class Run:
    store: Store
    gen: Generation
    stats: BackupStats


@pytest.fixture(scope="module")
def first(node: Path, tmp_path_factory: pytest.TempPathFactory) -> Run:
    store = create_store(tmp_path_factory.mktemp("backup-store") / "node4")
    return Run(store, *backup(store, node))


@pytest.fixture(scope="module")
def restored(first: Run, tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("backup-restored") / "data"
    restore(first.store, first.gen, target)
    return target


def test_round_trip_byte_for_byte(node: Path, restored: Path) -> None:
    assert tree_digest(restored) == source_digest(node)


def test_root_attributes_restored(node: Path, restored: Path) -> None:
    src, dst = node.stat(), restored.stat()
    assert stat.S_IMODE(dst.st_mode) == stat.S_IMODE(src.st_mode)
    assert dst.st_mtime_ns == src.st_mtime_ns


def test_sparse_files_stay_sparse(node: Path, restored: Path) -> None:
    sparse = sorted(node.glob("dataspace_*/datasource_*/*.gz.tmp"))
    assert len(sparse) >= 4
    for src in sparse:
        dst = restored / src.relative_to(node)
        s, d = src.stat(), dst.stat()
        assert d.st_size == s.st_size
        assert d.st_blocks * 512 < d.st_size, dst
        assert d.st_blocks <= s.st_blocks + 8, dst
    assert any(p.stat().st_blocks == 0 for p in sparse)


def test_jvm_tmp_skipped(node: Path, first: Run, restored: Path) -> None:
    assert any((node / "jvm-tmp").rglob("*"))
    assert not any(rel.startswith("jvm-tmp") for rel, _ in walk(first.store, first.gen.root.tree))
    assert not (restored / "jvm-tmp").exists()


def test_first_run_stats_and_identity(node: Path, first: Run) -> None:
    digest = source_digest(node)
    n_files = sum(1 for v in digest.values() if v[0] == "f")
    _, data = file_bytes(digest)
    s = first.stats
    assert (s.new, s.changed, s.unchanged, s.skipped) == (n_files, 0, 0, 0)
    assert s.bytes_read == data
    assert first.gen.stats["files"] == n_files and first.gen.stats["data_bytes"] == data
    uuid = (node / "cluster_membership.uuid").read_text().strip()
    assert first.gen.identity == Identity("4", uuid)


def test_holes_cost_no_store_bytes(node: Path, first: Run) -> None:
    apparent, _ = file_bytes(source_digest(node))
    data = first.gen.stats["data_bytes"]
    assert apparent > 2 * data  # the sample really has holes
    stored = sum(p.stat().st_size for p in (first.store.path / "packs").glob("*/*"))
    assert data < stored < data * 1.05 + MiB


def test_store_reveals_no_names(node: Path, first: Run) -> None:
    names = {p.name.encode() for p in node.rglob("*") if len(p.name) >= 12}
    uuid = (node / "cluster_membership.uuid").read_bytes()
    for p in first.store.path.rglob("*"):
        if p.is_file():
            blob = p.read_bytes()
            assert uuid not in blob, p
            assert not any(n in blob for n in names), p
        assert "dataspace" not in p.name and "segment" not in p.name


def test_incremental_run_reads_no_unchanged_file(node: Path, first: Run) -> None:
    store, gen1 = first.store, first.gen
    packs = pack_files(store.path)
    segment_bytes = sum(p.stat().st_size for p in node.glob("dataspace_*/datasource_*/segment_*"))
    assert segment_bytes > 4 * MiB
    before = rchar()
    gen2, stats = backup(store, node)
    read = rchar() - before
    # Only trees of the previous generation and the small identity files are read.
    assert read < segment_bytes / 20, read
    assert pack_files(store.path) == packs
    assert gen2.root.tree == gen1.root.tree
    assert gen2.name != gen1.name and gen2.time_ms > gen1.time_ms
    assert stats.new == stats.changed == 0 and stats.bytes_read == 0
    assert stats.unchanged == gen1.stats["files"]
    assert gen2.stats == gen1.stats


def test_exclude_patterns(node: Path, tmp_path: Path) -> None:
    space = sorted(node.glob("dataspace_*"))[0].name
    store = create_store(tmp_path / "store" / "ex")
    gen, _ = backup(store, node, excludes=("/jvm-tmp", "*.gz.tmp", f"/{space}"))
    target = tmp_path / "restored"
    restore(store, gen, target)
    want = {k: v for k, v in source_digest(node).items()
            if not k.endswith(".gz.tmp") and k != space and not k.startswith(space + "/")}
    assert tree_digest(target) == want
    assert any(k.endswith(".gz.tmp") for k in source_digest(node))


# -- a history: changed, new and deleted files -------------------------------------------------

@dataclass
class History:
    node: Path
    store: Store
    gens: list[Generation]
    changed_stats: BackupStats
    digests: list[dict[str, tuple[object, ...]]]
    changed: list[str]
    deleted: str
    deleted_bytes: bytes


@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory) -> History:
    """Three generations of a small node: as made; then with a small file appended to, a
    segment rewritten in place with its mtime put back, a new file and a deleted segment;
    then unchanged."""
    base = tmp_path_factory.mktemp("history")
    node = make_sample(base / "node", size="2M", small_files=200, seed=9)
    wait_not_racy(node)
    store = create_store(base / "store" / "hist")
    gen1, _ = backup(store, node)
    digest1 = source_digest(node)

    segments = sorted(node.glob("dataspace_*/datasource_*/segment_*.gz"))
    rewritten, deleted = segments[0], segments[1]
    deleted_bytes = deleted.read_bytes()
    st = rewritten.stat()
    with open(rewritten, "r+b") as f:
        f.seek(1000)
        f.write(b"\x00CHANGED\x00")
    os.utime(rewritten, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (rewritten.stat().st_size, rewritten.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    small = sorted(p for p in node.rglob("*") if p.is_file() and not p.is_symlink()
                   and 0 < p.stat().st_size < 4096 and "jvm-tmp" not in str(p))[0]
    with open(small, "ab") as f:
        f.write(b"appended\n")
    (node / "new-file.txt").write_bytes(b"new\n")
    deleted.unlink()
    wait_not_racy(node)
    gen2, stats2 = backup(store, node)
    digest2 = source_digest(node)
    gen3, _ = backup(store, node)
    return History(node, store, [gen1, gen2, gen3], stats2, [digest1, digest2],
                   [str(p.relative_to(node)) for p in (rewritten, small)],
                   str(deleted.relative_to(node)), deleted_bytes)


def test_changed_files_are_read_again(history: History) -> None:
    s = history.changed_stats
    assert (s.new, s.changed) == (1, 2)
    f1, f2 = (files(history.store, g) for g in history.gens[:2])
    for rel in history.changed:
        assert f1[rel].data != f2[rel].data, rel
    unchanged = [r for r in f2 if r in f1 and r not in history.changed]
    assert unchanged and all(f1[r].data == f2[r].data for r in unchanged)


def test_changed_generation_restores_exactly(history: History, tmp_path: Path) -> None:
    _, gen2, gen3 = history.gens
    restore(history.store, gen2, tmp_path / "r2")
    assert tree_digest(tmp_path / "r2") == history.digests[1]
    assert gen3.root.tree == gen2.root.tree


def test_deleted_file_gone_from_new_generation(history: History) -> None:
    f1, f2, f3 = (files(history.store, g) for g in history.gens)
    assert history.deleted in f1
    assert history.deleted not in f2 and history.deleted not in f3
    assert "new-file.txt" in f2 and "new-file.txt" not in f1


def test_old_generation_brings_deleted_file_back(history: History, tmp_path: Path) -> None:
    restore(history.store, history.gens[0], tmp_path / "r1")
    assert tree_digest(tmp_path / "r1") == history.digests[0]
    assert (tmp_path / "r1" / history.deleted).read_bytes() == history.deleted_bytes


def test_store_modes_with_umask_zero(sample_node: Path, tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        store = create_store(tmp_path / "backups" / "m")
        backup(store, sample_node)
        with store.lock():
            store.change_key("another key", None)
    finally:
        os.umask(old)
    entries = [store.path, *store.path.rglob("*")]
    assert len(entries) > 260
    for p in entries:
        mode = stat.S_IMODE(p.lstat().st_mode)
        assert mode == (0o700 if p.is_dir() else 0o600), (p, oct(mode))


# -- through the CLI: processes that die, hold the lock, or race the reader ---------------------

def wait_for(cond: Callable[[], bool], proc: subprocess.Popen[str] | None, timeout: float = 60,
             what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"process ended (rc {proc.returncode}) before {what}: {out} {err}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.001)


def progress_shown(store_path: Path, packs_before: set[str]) -> bool:
    """True once the writer has put real data into the store: a new pack, or 1 MiB in tmp/."""
    try:
        if any(p.stat().st_size >= MiB for p in (store_path / "tmp").iterdir()):
            return True
    except FileNotFoundError:
        pass
    return pack_files(store_path) != packs_before


def popen_cli(*args: str | Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "humiofs", *map(str, args)], env=clean_env(),
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.fixture(scope="module")
def big_node(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_sample(tmp_path_factory.mktemp("big") / "node", size="120M", small_files=200,
                       seed=11, node_id=2)


def test_killed_writer(tmp_path: Path, big_node: Path) -> None:
    small = make_sample(tmp_path / "small", size="1M", small_files=200, seed=12)
    backups = tmp_path / "backups"
    backups.mkdir()
    env = write_env(tmp_path / "node.env", backups, directory=small)
    store_path = backups / "node1"
    assert run_cli("backup", "-c", env).returncode == 0
    gens = sorted(os.listdir(store_path / "generations"))
    packs = pack_files(store_path)

    proc = popen_cli("backup", "-c", env, "--directory", big_node)
    wait_for(lambda: progress_shown(store_path, packs), proc, what="backup progress")
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert sorted(os.listdir(store_path / "generations")) == gens

    r = run_cli("restore", "-c", env, "--to", tmp_path / "after-kill")
    assert r.returncode == 0, r.stderr
    assert tree_digest(tmp_path / "after-kill") == source_digest(small)

    r = run_cli("backup", "-c", env, "--directory", big_node)
    assert r.returncode == 0, r.stderr
    assert os.listdir(store_path / "tmp") == []
    assert len(os.listdir(store_path / "generations")) == len(gens) + 1
    r = run_cli("restore", "-c", env, "--to", tmp_path / "after-next")
    assert r.returncode == 0, r.stderr
    assert tree_digest(tmp_path / "after-next") == source_digest(big_node)


def test_interrupted_writer_exits_130(tmp_path: Path, big_node: Path) -> None:
    backups = tmp_path / "backups"
    backups.mkdir()
    env = write_env(tmp_path / "node.env", backups, directory=big_node)
    store_path = backups / "node1"
    proc = popen_cli("backup", "-c", env)
    wait_for(lambda: progress_shown(store_path, set()), proc, what="backup progress")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    # It stops after committing a checkpoint (FORMAT.md 7.4) of what it stored, which is
    # never taken for a complete generation.
    assert err.strip().count("\n") == 0 and "interrupted; checkpoint" in err, err
    (name,) = os.listdir(store_path / "generations")
    assert Store.open(store_path, KEY).load_generation(name).checkpoint
    assert os.listdir(store_path / "tmp") == []
    r = run_cli("restore", "-c", env, "--to", tmp_path / "r")
    assert r.returncode == 2 and "only checkpoints" in r.stderr, r.stderr


@pytest.fixture()
def small_setup(tmp_path: Path) -> tuple[Path, Store]:
    node = make_sample(tmp_path / "node", size="1M", small_files=200, seed=13)
    store = create_store(tmp_path / "backups" / "node1")
    write_env(tmp_path / "node.env", tmp_path / "backups", directory=node)
    return tmp_path / "node.env", store


def test_second_writer_refused(small_setup: tuple[Path, Store]) -> None:
    env, store = small_setup
    with store.lock():
        before = store_files(store.path)
        r = run_cli("backup", "-c", env)
        assert store_files(store.path) == before
    assert r.returncode == 4
    assert r.stderr.count("\n") == 1
    assert "another humiofs writer" in r.stderr and str(store.path) in r.stderr
    assert f"pid {os.getpid()}" in r.stderr
    assert "since 20" in r.stderr and "Z" in r.stderr.split("since ")[1]     # UTC
    assert run_cli("backup", "-c", env).returncode == 0


def test_planted_lock_text_is_escaped(small_setup: tuple[Path, Store]) -> None:
    """A lock file that humiofs did not write is shown as text on one line, its control
    characters (escape sequences, newlines) escaped."""
    import fcntl

    env, store = small_setup
    (store.path / "lock").write_bytes(b"host \x1b[2J\x1b]0;pwned\x07evil\nsecond line\n")
    fd = os.open(store.path / "lock", os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        r = run_cli("backup", "-c", env)
    finally:
        os.close(fd)
    assert r.returncode == 4
    assert r.stderr.count("\n") == 1 and "\x1b" not in r.stderr and "\x07" not in r.stderr
    assert "host \\x1b[2J" in r.stderr and "evil\\nsecond line" in r.stderr


def test_sealed_host_name_is_padded(small_setup: tuple[Path, Store]) -> None:
    """The lock's sealed host name does not tell its length (FORMAT.md 8)."""
    import base64
    import json

    from humiofs.store import crypto
    _env, store = small_setup
    with store.lock():
        blob = base64.b64decode(json.loads((store.path / "lock").read_bytes())["host"])
    assert len(blob) - crypto.OBJECT_ID_LEN - crypto.TAG == 64


HOLD_LOCK = """
import os, sys
from pathlib import Path
from humiofs.store.repository import Store
store = Store.open(Path(sys.argv[1]), os.environ["TEST_STORE_KEY"])
with store.lock():
    print("locked", flush=True)
    sys.stdin.read()
"""


def test_lock_released_when_holder_dies(small_setup: tuple[Path, Store]) -> None:
    env, store = small_setup
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(store.path)],
                              env={**clean_env(), "TEST_STORE_KEY": KEY}, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline() == "locked\n"
        r = run_cli("backup", "-c", env)
        assert r.returncode == 4 and f"pid {holder.pid}" in r.stderr
        holder.kill()
        holder.wait(timeout=30)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    r = run_cli("backup", "-c", env)
    assert r.returncode == 0, r.stderr


# -- files changing while they are read ----------------------------------------------------------

BLOCK = 4096
RECORD = 64


def version_block(v: int) -> bytes:
    return struct.pack(">Q", v) * (BLOCK // 8)


def record(i: int) -> bytes:
    return f"record {i:012d} ".encode().ljust(RECORD - 1, b".") + b"\n"


class Churn:
    """Rewrites files in place, a version at a time, front to back in 16 KiB pieces, and appends
    records to another file, until stopped."""

    def __init__(self, rewrite: list[tuple[Path, int]], append: Path) -> None:
        self.rewrite = rewrite
        self.append = append
        self.stop = threading.Event()
        self.versions = 0
        self.records = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        fds = [(os.open(p, os.O_WRONLY), blocks) for p, blocks in self.rewrite]
        afd = os.open(self.append, os.O_WRONLY | os.O_APPEND)
        try:
            while not self.stop.is_set():
                self.versions += 1
                block = version_block(self.versions)
                for fd, blocks in fds:
                    for i in range(0, blocks, 4):
                        os.pwrite(fd, block * min(4, blocks - i), i * BLOCK)
                os.write(afd, record(self.records))
                self.records += 1
        finally:
            for fd, _ in fds:
                os.close(fd)
            os.close(afd)

    def __enter__(self) -> Churn:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


def existed(data: bytes) -> bool:
    """Whether `data` is a state the file really had at some instant. Versions are written
    front to back, so at any instant the file is version v+1 up to some offset and version v
    after it; a read torn across writes could hold anything else (v+2 next to v, v+1 after v)."""
    versions = [v for (v,) in struct.iter_unpack(">Q", data)]
    return (all(a >= b for a, b in zip(versions, versions[1:]))
            and versions[0] - versions[-1] <= 1)


def test_file_changing_during_backup(small_setup: tuple[Path, Store], tmp_path: Path) -> None:
    env, store = small_setup
    live = tmp_path / "node" / "live"
    live.mkdir()
    rewrite = [(live / "big.bin", 4 * MiB // BLOCK), (live / "small.bin", 64)]
    for p, blocks in rewrite:
        p.write_bytes(version_block(0) * blocks)
    (live / "append.log").write_bytes(b"")
    results = []
    with Churn(rewrite, live / "append.log") as churn:
        wait_for(lambda: churn.versions > 3, None, what="the churn thread")
        for i in range(3):
            start = churn.versions
            r = run_cli("backup", "-c", env)
            results.append(r)
            assert r.returncode in (0, 8), r.stderr
            assert churn.versions > start + 1  # the files really changed during the run
    assert churn.versions > 10
    for i, name in enumerate(store.list_generations()):
        gen = store.load_generation(name)
        target = tmp_path / f"restored-{i}"
        restore(store, gen, target)
        entries = files(store, gen)
        for p, blocks in rewrite:
            got = target / "live" / p.name
            if got.exists():
                data = got.read_bytes()
                assert len(data) == blocks * BLOCK and existed(data), (i, p.name)
                if data != data[:8] * (len(data) // 8):
                    # Caught in the middle of a rewrite: the next run must read it again.
                    assert entries[f"live/{p.name}"].ctime_ns == 0
            else:
                assert results[i].returncode == 8 and f"live/{p.name}" in results[i].stderr
        log = target / "live" / "append.log"
        if log.exists():
            data = log.read_bytes()
            n = len(data) // RECORD
            assert data == b"".join(record(j) for j in range(n))
        else:
            assert results[i].returncode == 8 and "live/append.log" in results[i].stderr


def test_just_written_file_is_read_after_its_timestamp_tick(tmp_path: Path) -> None:
    """A file changed within a timestamp tick of its read is read again once the tick has
    passed, so its ctime is trusted: the next run does not need to read it again."""
    node = tmp_path / "node"
    node.mkdir()
    (node / "cluster_membership.uuid").write_text("0f8e2c1a-0000-4000-8000-000000000001")
    store = create_store(tmp_path / "backups" / "n")
    (node / "fresh").write_bytes(b"x" * 10000)
    gen, _ = backup(store, node, host_id="1")
    entry = files(store, gen)["fresh"]
    assert entry.ctime_ns == (node / "fresh").stat().st_ctime_ns
    _, stats = backup(store, node, host_id="1")
    assert (stats.unchanged, stats.changed) == (2, 0)


def test_interrupt_right_after_a_pack_file_is_created_leaves_tmp_empty(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGINT/SIGTERM arrive as KeyboardInterrupt at any point, also between a pack's
    temporary file being created and the writer keeping hold of it: nothing may be left."""
    node = tmp_path / "node"
    node.mkdir()
    (node / "cluster_membership.uuid").write_text("0f8e2c1a-0000-4000-8000-000000000001")
    (node / "f").write_bytes(b"x" * 10000)
    store = create_store(tmp_path / "backups" / "n")
    created = packwriter.PackWriter.__init__

    def interrupted(self: packwriter.PackWriter, store: Store) -> None:
        created(self, store)
        raise KeyboardInterrupt

    monkeypatch.setattr(packwriter.PackWriter, "__init__", interrupted)
    with pytest.raises(KeyboardInterrupt):
        backup(store, node, host_id="1")
    assert os.listdir(store.path / "tmp") == []
    assert store.list_generations() == []


# -- a full disk and killed runs: what a run that does not commit leaves behind ----------------

@pytest.fixture
def tmpfs_40m(tmp_path: Path) -> Iterator[Path]:
    """A 40 MiB tmpfs as BACKUP_DIR (needs root), unmounted afterwards."""
    where = tmp_path / "disk"
    where.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m,mode=0700", "tmpfs", str(where)],
                       capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {r.stderr!r}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def unreferenced_note(env: Path) -> str:
    """The check's notes about packs no generation needs ('' if none); check must pass."""
    r = run_cli("check", "-c", env)
    assert r.returncode == 0, r.stdout + r.stderr
    return "".join(line for line in r.stdout.splitlines() if line.startswith("note:")
                   and " pack(s)" in line)


def test_freeing_the_space_a_failed_backup_needs_is_enough(tmp_path: Path,
                                                           tmpfs_40m: Path) -> None:
    """The issue's case: a 40 MiB disk, 24 MiB of node, a 20 MiB filler. The backup fails
    with exit 7; once the filler is gone there is room for the backup, and it completes (the
    failed run's packs used to stay, so every retry failed again and added more)."""
    node = tmp_path / "node"
    node.mkdir()
    (node / "cluster_membership.uuid").write_text("3b0c4f2e-6a3d-4c1f-9e2a-5d8b7c6a1f00")
    for i in range(3):
        (node / f"segment_{i}.gz").write_bytes(os.urandom(8 * MiB))
    filler = tmpfs_40m / "filler"
    filler.write_bytes(bytes(20 * MiB))
    env = write_env(tmp_path / "n.env", tmpfs_40m, directory=node, BOOTSTRAP_HOST_ID="1")
    failed = run_cli("backup", "-c", env, "--no-progress")
    assert failed.returncode == 7, failed.stdout + failed.stderr
    store = tmpfs_40m / "node1"
    left = (pack_files(store), os.listdir(store / "tmp"))
    filler.unlink()
    r = run_cli("backup", "-c", env, "--no-progress")
    assert r.returncode == 0, r.stdout + r.stderr
    assert left == (set(), [])
    assert "full" in failed.stderr and "what this run stored since its last checkpoint is " \
        "removed (a checkpoint it committed is kept" in failed.stderr
    r = run_cli("restore", "-c", env, "--to", tmp_path / "r")
    assert r.returncode == 0, r.stderr
    assert tree_digest(tmp_path / "r") == tree_digest(node)
    assert unreferenced_note(env) == ""


def kill_mid_run(env: Path, store_path: Path, source: Path) -> None:
    """Starts a backup of `source` and SIGKILLs it once it has stored a pack."""
    packs = pack_files(store_path) if store_path.exists() else set()
    proc = popen_cli("backup", "-c", env, "--directory", source, "--no-progress")
    wait_for(lambda: store_path.exists() and pack_files(store_path) - packs != set(), proc,
             what="a pack of the run")
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert pack_files(store_path) - packs, "the run was not killed mid-way"


def test_prune_removes_a_killed_first_runs_packs(tmp_path: Path, big_node: Path) -> None:
    """No generation yet, so every pack is 'newer than the newest generation': prune used to
    keep them all for good. With no writer running they are nobody's."""
    backups = tmp_path / "backups"
    backups.mkdir()
    env = write_env(tmp_path / "node.env", backups, directory=big_node)
    store_path = backups / "node1"
    kill_mid_run(env, store_path, big_node)
    assert os.listdir(store_path / "generations") == []
    r = run_cli("prune", "-c", env, "--grace", "0")
    assert r.returncode == 0, r.stdout + r.stderr
    assert pack_files(store_path) == set(), r.stdout
    assert "newer than the latest generation" not in r.stdout


def test_next_backup_removes_what_a_killed_run_stored(tmp_path: Path, big_node: Path) -> None:
    small = make_sample(tmp_path / "small", size="1M", small_files=50, seed=14)
    backups = tmp_path / "backups"
    backups.mkdir()
    env = write_env(tmp_path / "node.env", backups, directory=small)
    store_path = backups / "node1"
    assert run_cli("backup", "-c", env).returncode == 0
    kill_mid_run(env, store_path, big_node)
    assert "of a backup that is running or did not finish" in unreferenced_note(env)
    r = run_cli("backup", "-c", env)
    assert r.returncode == 0, r.stderr
    assert unreferenced_note(env) == ""
    assert os.listdir(store_path / "tmp") == []


# -- a store that lost a pack -----------------------------------------------------------------

def test_backup_over_a_lost_pack_reads_the_file_again(tmp_path: Path) -> None:
    """A backup used to carry the refs of unchanged files into the new generation even when
    their pack was gone, so the loss spread to every new generation, with exit 0. Now it reads
    those files again (the new generation is whole), names them, and exits 8."""
    node = make_sample(tmp_path / "node", size="2M", small_files=30, seed=15)
    (node / "big.bin").write_bytes(os.urandom(2 * MiB))
    wait_not_racy(node)
    backups = tmp_path / "backups"
    backups.mkdir()
    env = write_env(tmp_path / "node.env", backups, directory=node)
    assert run_cli("backup", "-c", env).returncode == 0
    store = Store.open(backups / "node1", KEY)
    first = store.load_generation(store.list_generations()[-1])
    lost = files(store, first)["big.bin"].data
    assert lost is not None
    os.unlink(store.pack_path(lost.pack))
    r = run_cli("backup", "-c", env)
    assert r.returncode == 8, r.stdout + r.stderr
    assert (f"1 file(s) read again from the node: their stored copy is in a pack missing "
            f"from the store or cut short ({lost.pack.hex()}): big.bin") in r.stderr
    assert "0 new" in r.stdout and "1 read again from the node after a lost pack" in r.stdout
    assert "humiofs check" in r.stderr
    latest = store.load_generation(store.list_generations()[-1])
    assert files(store, latest)["big.bin"].data.pack != lost.pack  # type: ignore[union-attr]
    r = run_cli("restore", "-c", env, "--to", tmp_path / "r")
    assert r.returncode == 0, r.stderr
    assert tree_digest(tmp_path / "r") == source_digest(node)
    # check still reports the loss, in the first generation only.
    r = run_cli("check", "-c", env)
    assert r.returncode == 5 and "missing" in r.stdout and "including the latest" not in r.stdout
    store.close()


def test_a_killed_store_creation_leaves_nothing_for_long(tmp_path: Path) -> None:
    """A first backup killed while it creates the store (in Argon2, say) leaves a
    `.NAME.creating-*` folder; the next backup removes it."""
    node = tmp_path / "node"
    node.mkdir()
    (node / "cluster_membership.uuid").write_text("3b0c4f2e-6a3d-4c1f-9e2a-5d8b7c6a1f00")
    for attempt in range(5):
        backups = tmp_path / f"backups{attempt}"
        backups.mkdir()
        env = write_env(tmp_path / "node.env", backups, directory=node, BOOTSTRAP_HOST_ID="1")
        proc = popen_cli("backup", "-c", env, "--no-progress")

        def creating() -> list[Path]:
            return list(backups.glob(".node1.creating-*"))
        try:
            wait_for(lambda: bool(creating()) or proc.poll() is not None, None,
                     what="the store being created")
        finally:
            proc.kill()
            proc.communicate()
        if creating() and not (backups / "node1").exists():
            break
    else:
        pytest.skip("the store creation always finished before it could be killed")
    (leftover,) = creating()
    past = time.time() - 60          # as if the next backup ran a minute later
    os.utime(leftover, (past, past))
    r = run_cli("backup", "-c", env, "--no-progress")
    assert r.returncode == 0, r.stderr
    assert creating() == [] and (backups / "node1" / "config").exists()


def test_the_lock_file_names_the_host_only_encrypted(small_setup: tuple[Path, Store]) -> None:
    """The lock file is plaintext in the store, which may be on a drive others read: it says
    which process holds it and since when, but the host name only to a writer with the key."""
    env, store = small_setup
    with store.lock():
        content = (store.path / "lock").read_text()
        r = run_cli("backup", "-c", env)
    doc = json.loads(content)
    assert set(doc) == {"version", "pid", "since_ms", "host"} and doc["pid"] == os.getpid()
    # The host field is sealed under the store's key (a short name may occur in its base64
    # by chance, so it is left out of this check).
    assert socket.gethostname() not in content.replace(doc["host"], "")
    assert r.returncode == 4
    assert f"pid {os.getpid()} on this host, since" in r.stderr, r.stderr


def test_a_file_that_vanishes_mid_backup_is_named(tmp_path: Path) -> None:
    """A file deleted (or renamed) between the listing of its folder and its read used to be
    dropped with exit 0 and no word; renamed, it may be missing under its new name too."""
    node = tmp_path / "node"
    node.mkdir()
    (node / "cluster_membership.uuid").write_text("3b0c4f2e-6a3d-4c1f-9e2a-5d8b7c6a1f00")
    (node / "a-big.bin").write_bytes(os.urandom(128 * MiB))
    for attempt in range(3):
        backups = tmp_path / f"backups{attempt}"      # a first backup: the big file is read
        backups.mkdir()
        env = write_env(tmp_path / "node.env", backups, directory=node, BOOTSTRAP_HOST_ID="1")
        store_path = backups / "node1"
        victim = node / f"z-victim-{attempt}"
        victim.write_bytes(b"soon gone")
        wait_not_racy(node)
        proc = popen_cli("backup", "-c", env, "--no-progress")
        # The big file sorts first: once its pack grows, the listing is done and the victim
        # not read yet.
        wait_for(lambda: proc.poll() is not None or progress_shown(store_path, set()), None,
                 what="the backup to read the big file")
        victim.unlink()
        out, err = proc.communicate(timeout=120)
        if proc.returncode != 0 or "vanished" in err:
            break
    assert proc.returncode == 8, out + err
    assert f"{victim.name}: vanished while the backup read it" in err
    assert "1 vanished while read" in out


# -- parts of the store replaced or gone: one line, never a traceback --------------------------

def one_line(r: "subprocess.CompletedProcess[str]", code: int, *words: str) -> None:
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    last = r.stderr.splitlines()[-1]
    assert last.startswith("humiofs: error: "), r.stderr
    for word in words:
        assert word in last, r.stderr


@pytest.mark.allow_warnings
def test_store_parts_replaced_or_missing(small_setup: tuple[Path, Store],
                                         tmp_path: Path) -> None:
    env, store = small_setup
    shutil.rmtree(store.path / "tmp")
    r = run_cli("backup", "-c", env, "--no-progress")
    assert r.returncode == 0, r.stderr          # tmp/ only ever holds a writer's files
    assert (store.path / "tmp").is_dir()

    (store.path / "tmp").rmdir()
    (store.path / "tmp").write_bytes(b"")
    one_line(run_cli("backup", "-c", env, "--no-progress"), 5, "mkdir -m 700")
    (store.path / "tmp").unlink()
    (store.path / "tmp").mkdir(mode=0o700)

    (store.path / "lock").unlink(missing_ok=True)
    (store.path / "lock").mkdir()
    one_line(run_cli("backup", "-c", env, "--no-progress"), 5, "is a folder")
    r = run_cli("check", "-c", env)
    assert r.returncode == 5 and "problem: lock has the wrong type" in r.stdout, r.stdout
    (store.path / "lock").rmdir()

    for sub in ("prune", "packs"):
        saved = store.path / f"{sub}.saved"
        if (store.path / sub).exists():
            (store.path / sub).rename(saved)
        (store.path / sub).write_bytes(b"")
        one_line(run_cli("prune", "-c", env, "--grace", "0"), 5, sub)
        (store.path / sub).unlink()
        if saved.exists():
            saved.rename(store.path / sub)

    gens = store.path / "generations"
    gens.rename(tmp_path / "generations.saved")
    one_line(run_cli("backup", "-c", env, "--no-progress"), 5, "mkdir -m 700")
    r = run_cli("check", "-c", env)
    assert r.returncode == 5 and f"mkdir -m 700 {gens}" in r.stdout, r.stdout
    (tmp_path / "generations.saved").rename(gens)
    assert run_cli("check", "-c", env).returncode == 0


def test_restore_into_an_immutable_target_is_one_line(small_setup: tuple[Path, Store],
                                                      tmp_path: Path) -> None:
    """fchown refused on the target (chattr +i, as on root-squashed NFS): exit 6, one line."""
    env, store = small_setup
    target = tmp_path / "immutable"
    target.mkdir()
    if subprocess.run(["chattr", "+i", str(target)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i does not work here")
    try:
        r = run_cli("backup", "-c", env, "--no-progress")
        assert r.returncode == 0, r.stderr
        one_line(run_cli("restore", "-c", env, "--to", target), 6, str(target))
    finally:
        subprocess.run(["chattr", "-i", str(target)])


def test_backup_says_when_the_only_copy_of_a_deleted_file_is_lost(tmp_path: Path) -> None:
    """A file deleted from the node whose pack the store then lost: the earlier generations
    that hold it cannot restore it. The backup used to exit 0 without a word."""
    node = make_sample(tmp_path / "node", size="1M", small_files=20, seed=16)
    (node / "d").mkdir()
    (node / "d" / "gone.bin").write_bytes(os.urandom(MiB))
    (node / "d" / "sub").mkdir()
    (node / "d" / "sub" / "gone-too.bin").write_bytes(os.urandom(MiB))
    wait_not_racy(node)
    backups = tmp_path / "backups"
    backups.mkdir()
    env = write_env(tmp_path / "node.env", backups, directory=node)
    assert run_cli("backup", "-c", env).returncode == 0
    store = Store.open(backups / "node1", KEY)
    first = store.load_generation(store.list_generations()[-1])
    for rel in ("d/gone.bin", "d/sub/gone-too.bin"):
        lost = files(store, first)[rel].data
        assert lost is not None
        if os.path.exists(store.pack_path(lost.pack)):
            os.unlink(store.pack_path(lost.pack))
    (node / "d" / "gone.bin").unlink()
    shutil.rmtree(node / "d" / "sub")      # a whole folder deleted
    r = run_cli("backup", "-c", env)
    assert r.returncode == 8, r.stdout + r.stderr
    assert "lost the only copy of 2 file(s) deleted from the node" in r.stderr
    assert "d/gone.bin" in r.stderr and "d/sub/gone-too.bin" in r.stderr



def test_a_damaged_folder_listing_counts_its_files_as_read_again(tmp_path: Path) -> None:
    """Every file below a folder whose stored listing fails authentication is read again
    from the node: the summary says so (not "N new"), and check's advice says what that costs
    and what to do on a full disk, instead of pointing at prune."""
    from storetools import flip
    node = tmp_path / "node"
    (node / "d" / "e").mkdir(parents=True)
    for i in range(12):
        (node / "d" / f"f{i}").write_bytes(os.urandom(100))
        (node / "d" / "e" / f"g{i}").write_bytes(os.urandom(100))
    wait_not_racy(node)
    backups = tmp_path / "backups"
    backups.mkdir()
    env = write_env(tmp_path / "node.env", backups, directory=node)
    assert run_cli("backup", "-c", env).returncode == 0
    store = Store.open(backups / "node1", KEY)
    gen = store.load_generation(store.list_generations()[-1])
    root = gen.root.tree
    store.close()
    flip(store.pack_path(root.pack), root.offset + root.stored_len // 2)
    r = run_cli("check", "-c", env)
    assert r.returncode == 5
    assert "needs about those folders' size of free space" in r.stdout
    r = run_cli("backup", "-c", env)
    assert r.returncode == 8, r.stdout + r.stderr
    assert "0 new" in r.stdout and "24 read again" in r.stdout, r.stdout
