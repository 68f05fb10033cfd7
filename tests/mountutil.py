"""Helpers for the mount tests: in-process backups, finding a file's blob in a store, and a real
mount in a subprocess that is always unmounted. Plain functions and classes, no fixtures."""
from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from conftest import KEY, ROOT, clean_env, tree_digest

from humiofs.backup.writer import Backup, BackupOptions
from humiofs.mount import tree
from humiofs.store.format import DIR, Entry, Generation
from humiofs.store.keys import KdfParams
from humiofs.store.repository import Store

FAST_KDF = KdfParams(iterations=2, memory_kib=19456, lanes=1)
DEADLINE_S = 20.0


def create_store(path: Path, key: str = KEY) -> Store:
    path.parent.mkdir(parents=True, exist_ok=True)
    return Store.create(path, key, FAST_KDF)


def backup(store: Store, source: Path) -> Generation:
    """One backup run in-process, as `humiofs backup` does it."""
    with store.lock():
        names = store.list_generations()
        parent = store.load_generation(names[-1]) if names else None
        gen = Backup(store, BackupOptions(source=source, backup_name=store.name, host_id="1",
                                          progress=False)).run(parent)
    # Generation names carry the commit time in ms; keep the next one in a later second so
    # that folder names under .generations stay at their plain, to-the-second form.
    while int(time.time()) == gen.time_ms // 1000:
        time.sleep(0.02)
    return gen


def tiny_node(root: Path, files: dict[str, bytes]) -> Path:
    """A small node folder with a cluster_membership.uuid and the given files."""
    for rel, data in {"cluster_membership.uuid": b"0b5a6c1e-8d3f-4c2a-9e71-2f6d8a9b0c13",
                      **files}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def entries(store: Store, gen: Generation) -> Iterator[tuple[str, Entry]]:
    """Every entry of a generation with its relative path."""
    todo = [("", gen.root.tree)]
    while todo:
        prefix, ref = todo.pop()
        for e in store.read_tree(ref):
            rel = prefix + os.fsdecode(e.name)
            yield rel, e
            if e.type == DIR:
                assert e.subtree is not None
                todo.append((rel + "/", e.subtree))


def tamper_file_data(store: Store, gen: Generation, rel: str, at: int = 100) -> None:
    """Flips one byte of the stored data of file `rel`, `at` bytes into its blob."""
    entry = dict(entries(store, gen))[rel]
    assert entry.data is not None
    path = store.pack_path(entry.data.pack)
    os.chmod(path, 0o600)
    with open(path, "r+b") as f:
        f.seek(entry.data.offset + at)
        byte = f.read(1)
        f.seek(entry.data.offset + at)
        f.write(bytes([byte[0] ^ 0x40]))


def resolve(model: tree.Tree, path: bytes) -> tree.Attr:
    """The attributes at a slash-separated path below the mount's root."""
    attr = model.getattr(tree.ROOT_INODE)
    for name in path.split(b"/"):
        attr = model.lookup(attr.inode, name)
    return attr


def listdir(model: tree.Tree, inode: int) -> dict[bytes, tree.Attr]:
    """A folder's children by name (without `.` and `..`)."""
    listing = model.opendir(inode)
    return {name: attr for name, attr in map(listing.item, range(len(listing)))
            if name not in (b".", b"..")}


async def read_all(model: tree.Tree, inode: int, step: int = 100_000) -> bytes:
    """A file's bytes through the model, read in odd-sized steps."""
    fh = model.open(inode)
    try:
        out = bytearray()
        while piece := await model.read(fh, len(out), step):
            out += piece
        return bytes(out)
    finally:
        model.release(fh)


def source_digest(source: Path, extents: bool = True) -> dict[str, tuple[object, ...]]:
    """tree_digest of a node, less what a backup leaves out (jvm-tmp)."""
    return {k: v if extents or v[0] != "f" else v[:5] for k, v in tree_digest(source).items()
            if k != "jvm-tmp" and not k.startswith("jvm-tmp/")}


def mounted_digest(node: Path, extents: bool = True) -> dict[str, tuple[object, ...]]:
    """tree_digest of a node as mounted or copied, less the synthetic globaldata folder.
    Without `extents` the holes are left out: on the mount itself SEEK_HOLE finds none
    (pyfuse3 has no lseek), which is what st_blocks is for."""
    return {k: v if extents or v[0] != "f" else v[:5] for k, v in tree_digest(node).items()
            if k != "globaldata" and not k.startswith("globaldata/")}


def is_mounted(path: Path) -> bool:
    target = os.path.abspath(path)
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == target for line in f)


def mount_line(path: Path) -> list[str]:
    target = os.path.abspath(path)
    with open("/proc/self/mounts") as f:
        for line in f:
            if line.split()[1] == target:
                return line.split()
    raise AssertionError(f"{path} is not mounted")


def wait_for(predicate: object, what: str, deadline_s: float = DEADLINE_S) -> None:
    deadline = time.monotonic() + deadline_s
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def pid_gone(pid: int) -> bool:
    """True once a process has exited (a zombie that nobody reaps counts as exited)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return any(line.startswith("State:") and "Z" in line.split()[1] for line in f)
    except FileNotFoundError:
        return True


class Mount:
    """`humiofs mount --foreground` in a subprocess: up on enter (or the test fails at once
    with the process's stderr), unmounted on exit, the process waited for."""

    def __init__(self, env_file: Path, mountpoint: Path, *args: str) -> None:
        self.env_file = env_file
        self.path = mountpoint
        self.args = args
        self.log = mountpoint.parent / f"{mountpoint.name}.stderr"
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Mount:
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.log, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "humiofs", "mount", "--foreground", "--config",
                 str(self.env_file), str(self.path), *self.args],
                stdout=subprocess.DEVNULL, stderr=err, env=clean_env(), cwd=ROOT)
        try:
            deadline = time.monotonic() + DEADLINE_S
            while not os.path.ismount(self.path):
                if self.proc.poll() is not None:
                    raise AssertionError(f"mount exited with {self.proc.returncode}: "
                                         f"{self.stderr()}")
                if time.monotonic() > deadline:
                    raise AssertionError(f"mount did not come up: {self.stderr()}")
                time.sleep(0.01)
        except BaseException:
            self.__exit__()
            raise
        return self

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")

    def __exit__(self, *exc: object) -> None:
        assert self.proc is not None
        try:
            if is_mounted(self.path):
                done = subprocess.run(["fusermount3", "-u", str(self.path)], capture_output=True)
                if done.returncode != 0:  # a test left a file open: detach anyway
                    subprocess.run(["fusermount3", "-u", "-z", str(self.path)],
                                   capture_output=True)
            self.proc.wait(timeout=DEADLINE_S)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
            raise AssertionError(f"mount process did not exit after unmount: {self.stderr()}")


class _Dirent64(ctypes.Structure):
    """glibc's struct dirent64 (the same on every Linux architecture)."""

    _fields_ = [("d_ino", ctypes.c_uint64), ("d_off", ctypes.c_int64),
                ("d_reclen", ctypes.c_ushort), ("d_type", ctypes.c_ubyte),
                ("d_name", ctypes.c_char * 256)]


def readdir(path: Path) -> list[tuple[bytes, int, int]]:
    """(name, d_ino, d_type) of every entry libc readdir(3) returns, in its order, `.` and `..`
    included (os.scandir and os.listdir leave those two out)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.opendir.restype = ctypes.c_void_p
    libc.opendir.argtypes = [ctypes.c_char_p]
    libc.readdir64.restype = ctypes.POINTER(_Dirent64)
    libc.readdir64.argtypes = [ctypes.c_void_p]
    libc.closedir.argtypes = [ctypes.c_void_p]
    d = libc.opendir(os.fsencode(path))
    if not d:
        raise OSError(ctypes.get_errno(), f"opendir {path}")
    try:
        out = []
        while True:
            ctypes.set_errno(0)
            ent = libc.readdir64(d)
            if not ent:
                if ctypes.get_errno():
                    raise OSError(ctypes.get_errno(), f"readdir {path}")
                return out
            out.append((ent.contents.d_name, ent.contents.d_ino, ent.contents.d_type))
    finally:
        libc.closedir(d)


def copy_backup_dir(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest
