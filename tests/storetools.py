"""Helpers for the store, backup and restore tests: in-process runs, tree walks, snapshots of a
store's files. Plain functions, no fixtures (those live in conftest.py and the test files)."""
from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import cast

from conftest import KEY, tree_digest

from humiofs.backup import readfile
from humiofs.backup.writer import Backup, BackupOptions, BackupStats
from humiofs.restore import Restore, RestoreOptions, RestoreStats
from humiofs.store.format import DIR, FILE, Entry, Generation, Ref
from humiofs.store.keys import KdfParams
from humiofs.store.repository import Store

# The cheapest KDF parameters a reader accepts: store opens stay fast in tests.
FAST_KDF = KdfParams(iterations=2, memory_kib=19456, lanes=1)


def create_store(path: Path, key: str = KEY) -> Store:
    path.parent.mkdir(parents=True, exist_ok=True)
    return Store.create(path, key, FAST_KDF)


def backup(store: Store, source: Path, settle: bool = False,
           **options: object) -> tuple[Generation, BackupStats]:
    """One backup run in-process, as `humiofs backup` does it. With `settle`, first waits
    until every source file is past the writer's racy window (see wait_not_racy)."""
    with store.lock():
        store.clean_tmp()
        names = store.list_generations()
        parent = store.load_generation(names[-1]) if names else None
        if settle:
            wait_not_racy(source)
        run = Backup(store, BackupOptions(source=source, backup_name=store.name,
                                          progress=False, **options))  # type: ignore[arg-type]
        gen = run.run(parent)
    return gen, run.stats


def restore(store: Store, gen: Generation, target: Path, **options: object) -> RestoreStats:
    return Restore(store, RestoreOptions(target=target, progress=False,
                                         **options)).run(gen)  # type: ignore[arg-type]


def walk(store: Store, ref: Ref, prefix: str = "") -> Iterator[tuple[str, Entry]]:
    """Every entry of the tree at `ref`, depth first, with its relative path."""
    for e in store.read_tree(ref):
        rel = prefix + os.fsdecode(e.name)
        yield rel, e
        if e.type == DIR:
            assert e.subtree is not None
            yield from walk(store, e.subtree, rel + "/")


def files(store: Store, gen: Generation) -> dict[str, Entry]:
    return {rel: e for rel, e in walk(store, gen.root.tree) if e.type == FILE}


def source_digest(node: Path) -> dict[str, tuple[object, ...]]:
    """tree_digest of a node without jvm-tmp/, which backups skip."""
    return {k: v for k, v in tree_digest(node).items()
            if k != "jvm-tmp" and not k.startswith("jvm-tmp/")}


def file_bytes(digest: dict[str, tuple[object, ...]]) -> tuple[int, int]:
    """(apparent size, data bytes) summed over the files of a tree_digest."""
    apparent = data = 0
    for v in digest.values():
        if v[0] == "f":
            apparent += cast(int, v[3])
            data += sum(n for _, n in cast("tuple[tuple[int, int], ...]", v[5]))
    return apparent, data


def store_files(store_path: Path) -> dict[str, tuple[int, int, int]]:
    """Every file and folder of a store with (mtime_ns, size, inode): equal before and after
    means nothing was written."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(store_path):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            out[os.path.relpath(p, store_path)] = (st.st_mtime_ns, st.st_size, st.st_ino)
    return out


def pack_files(store_path: Path) -> set[str]:
    return {p.name for p in (store_path / "packs").glob("*/*")}


def wait_not_racy(root: Path, timeout: float = 10.0) -> None:
    """Waits until every file under `root` changed longer ago than the writer's racy window,
    so that a backup now records real ctimes and a later run can trust them."""
    newest = max(os.lstat(os.path.join(d, n)).st_ctime_ns
                 for d, dirs, fs in os.walk(root) for n in dirs + fs)
    deadline = time.monotonic() + timeout
    while time.time_ns() <= newest + readfile.RACY_NS + 1_000_000:
        assert time.monotonic() < deadline, "clock does not advance"
        time.sleep(0.01)


def rchar() -> int:
    """Bytes this process has read through read(2) and friends so far."""
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("rchar:"):
                return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


def flip(path: Path, offset: int) -> None:
    """Flips one bit of the byte at `offset` of a store file (tampering)."""
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x40]))


Digest = dict[str, tuple[object, ...]]


def backups_within_one_second(store: Store, node: Path,
                              timeout: float = 30.0) -> list[tuple[Generation, Digest]]:
    """Two backups of `node` committed within one second, each after adding a file to it:
    the generations, with the node's source_digest at each."""
    deadline = time.monotonic() + timeout
    while True:
        assert time.monotonic() < deadline, "no two backups within one second"
        while time.time() % 1 > 0.3:        # start early in a second (polled, no fixed sleep)
            time.sleep(0.01)
        out = []
        for _ in range(2):
            (node / f"file{len(store.list_generations())}").write_bytes(b"x")
            gen = backup(store, node, host_id="1")[0]
            out.append((gen, source_digest(node)))
        if out[0][0].time_ms // 1000 == out[1][0].time_ms // 1000:
            return out
