"""The local folder backend: BACKUP_DIR is a folder, each store a folder in it, each store
file a file (docs/FORMAT.md 2, 11).

Every open of a store file is O_NOFOLLOW|O_NONBLOCK and checks the file is a regular one
(NotRegularFile otherwise), so a symlink planted in the store is never followed and a FIFO
never blocks or is read. Whole files are written under tmp/ and renamed into place; files,
and the folders they are renamed into, are fsynced. Files are made 0600, folders 0700.
Locks are flocks on the lock file. Packs being read stay open in an LRU cache of fds, and
`read_into(nowait=True)` reads them with RWF_NOWAIT (only what is in the page cache).
"""
from __future__ import annotations

import builtins
import errno
import fcntl
import logging
import math
import os
import re
import shutil
import stat
import threading
import time
from collections import OrderedDict
from pathlib import Path

from humiofs.store.backend import FILE, FOLDER, OTHER, Backend, Busy, Item, Location, Lock, Upload
from humiofs.store.backend.localfiles import (
    fsync_dir,
    link_or_rename,
    open_store_file,
    read_fd,
    unlink_quietly,
    write_all,
    write_new,
)

log = logging.getLogger(__name__)

_DEAD_CREATION_S = 10.0     # younger, a creation folder may not be locked by its creator yet
_LOCK_POLL_S = 0.02
MAX_OPEN_FILES = 64         # packs kept open for reading


def _item(name: str, st: os.stat_result) -> Item:
    mode = st.st_mode
    if stat.S_ISREG(mode):
        return Item(name, FILE, st.st_size, st.st_mtime, mtime_ns=st.st_mtime_ns)
    if stat.S_ISDIR(mode):
        return Item(name, FOLDER, 0, st.st_mtime, mtime_ns=st.st_mtime_ns)
    return Item(name, OTHER, 0, st.st_mtime, symlink=stat.S_ISLNK(mode), mtime_ns=st.st_mtime_ns)


class _OpenFile:
    """An open pack with a reference count, so a cached fd is never closed under a reader."""

    __slots__ = ("fd", "users", "evicted")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.users = 0
        self.evicted = False


class LocalUpload(Upload):
    """A file written under tmp/ and renamed into place by `commit`."""

    def __init__(self, backend: LocalBackend, name: str) -> None:
        self._final = backend._path(name)
        self._tmp = backend._tmp_path()
        self._fd = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                           | os.O_CLOEXEC, 0o600)

    def write(self, data: bytes | memoryview) -> None:
        write_all(self._fd, data)

    def commit(self) -> None:
        try:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = -1
            try:
                os.rename(self._tmp, self._final)
            except FileNotFoundError:
                self._remake_folder()
                os.rename(self._tmp, self._final)
            fsync_dir(self._final.parent)
        except OSError:
            self.abort()
            raise

    def _remake_folder(self) -> None:
        """Makes the folder the file goes in (packs/xx) again if it was removed (an empty
        folder, say by `find -empty -delete`): it only ever holds packs, so one made anew is
        what was there. Only that folder: a store that lost packs/ is not written into.
        Raises the rename's FileNotFoundError if it was not the folder that was missing."""
        folder = self._final.parent
        if os.path.lexists(folder) or not os.path.lexists(self._tmp):
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(self._final))
        try:
            os.mkdir(folder, 0o700)
        except FileExistsError:
            return          # another writer's, just now
        fsync_dir(folder.parent)
        log.warning("%s was missing; made it again (it holds only packs)", folder)

    def abort(self) -> None:
        self._fd = _close_quietly(self._fd)
        try:
            unlink_quietly(self._tmp)
        except OSError:
            pass


def _close_quietly(fd: int) -> int:
    """Closes `fd` unless it is -1, ignoring errors (an abort or release never raises);
    returns -1, the handle's new value."""
    if fd >= 0:
        try:
            os.close(fd)
        except OSError:
            pass
    return -1


class LocalLock(Lock):
    def __init__(self, fd: int) -> None:
        self._fd = fd

    def release(self) -> None:
        self._fd = _close_quietly(self._fd)


class LocalBackend(Backend):
    """The store in the folder `root` (BACKUP_DIR/NAME; it may be a symlink, the operator's
    choice, but nothing inside it is followed)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.location = str(root)
        self.local_path = root
        self.max_open_files = MAX_OPEN_FILES
        self._open: OrderedDict[str, _OpenFile] = OrderedDict()
        self._open_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"LocalBackend({self.location!r})"

    def _path(self, name: str) -> Path:
        if name.startswith("/") or ".." in name.split("/"):
            raise ValueError(f"not a store file name: {name!r}")
        return self.root / name if name else self.root

    def _tmp_path(self) -> Path:
        return self.root / "tmp" / f"{os.urandom(8).hex()}.tmp"

    # -- reading ----------------------------------------------------------------------------

    def read(self, name: str, limit: int | None = None) -> bytes:
        fd = open_store_file(self._path(name))
        try:
            return read_fd(fd, limit)
        finally:
            os.close(fd)

    def _acquire(self, name: str) -> _OpenFile:
        with self._open_lock:
            of = self._open.get(name)
            if of is not None:
                self._open.move_to_end(name)
                of.users += 1
                return of
        fd = open_store_file(self._path(name))
        with self._open_lock:
            of = self._open.get(name)
            if of is not None:
                os.close(fd)
            else:
                of = _OpenFile(fd)
                self._open[name] = of
                while len(self._open) > self.max_open_files:
                    _, old = self._open.popitem(last=False)
                    old.evicted = True
                    if old.users == 0:
                        os.close(old.fd)
            of.users += 1
            return of

    def _release(self, of: _OpenFile) -> None:
        with self._open_lock:
            of.users -= 1
            if of.evicted and of.users == 0:
                os.close(of.fd)

    def read_into(self, name: str, offset: int, out: memoryview, nowait: bool = False) -> bool:
        """See Backend.read_into. With `nowait`, False when the file is not open yet or its
        bytes are not all in the page cache (RWF_NOWAIT)."""
        if nowait:
            with self._open_lock:
                of = self._open.get(name)
                if of is None:
                    return False
                of.users += 1
        else:
            of = self._acquire(name)
        try:
            got = 0
            while got < len(out):
                if nowait:
                    try:
                        n = os.preadv(of.fd, [out[got:]], offset + got, os.RWF_NOWAIT)
                    except BlockingIOError:
                        return False
                    if n < len(out) - got:  # partly cached, or truncated: ask without nowait
                        return False
                else:
                    n = os.preadv(of.fd, [out[got:]], offset + got)
                if not n:
                    raise EOFError(f"{name} ends at {offset + got}")
                got += n
        finally:
            self._release(of)
        return True

    def stat(self, name: str) -> Item:
        return _item(name, os.lstat(self._path(name)))

    def list(self, folder: str = "", recursive: bool = False) -> list[Item]:
        out: list[Item] = []
        self._list(folder, recursive, out)
        out.sort(key=lambda item: item.name)
        return out

    def _list(self, folder: str, recursive: bool, out: builtins.list[Item]) -> None:
        prefix = f"{folder}/" if folder else ""
        subs = []
        with os.scandir(self._path(folder)) as it:
            for de in it:
                try:
                    item = _item(prefix + de.name, de.stat(follow_symlinks=False))
                except FileNotFoundError:
                    continue        # removed since the listing
                if recursive and item.kind == FOLDER:
                    subs.append(item.name)
                else:
                    out.append(item)
        for sub in subs:
            try:
                self._list(sub, True, out)
            except (FileNotFoundError, NotADirectoryError):
                continue

    # -- writing ----------------------------------------------------------------------------

    def write(self, name: str, data: bytes, exclusive: bool = True) -> None:
        final = self._path(name)
        tmp = self._tmp_path()
        try:
            write_new(tmp, data)
            if exclusive:
                link_or_rename(tmp, final)
            else:
                os.rename(tmp, final)
            fsync_dir(final.parent)
        finally:
            unlink_quietly(tmp)

    def create(self, name: str) -> Upload:
        return LocalUpload(self, name)

    def append(self, name: str, data: bytes, sync: bool) -> None:
        fd = open_store_file(self._path(name), os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        try:
            write_all(fd, data)
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)

    def delete(self, name: str) -> None:
        with self._open_lock:
            of = self._open.pop(name, None)
            if of is not None:
                of.evicted = True
                if of.users == 0:
                    os.close(of.fd)
        unlink_quietly(self._path(name))

    def delete_folder(self, folder: str) -> None:
        """See Backend.delete_folder: shutil.rmtree, which works on fds here (it never follows
        a symlink, even one swapped in while it runs) and refuses a symlink at `folder`. The
        first failure (other than something gone already) is raised once the rest is removed,
        naming the path that failed."""
        failed: list[OSError] = []

        def onerror(func: object, path: str, exc_info: tuple[type, BaseException, object]) -> None:
            exc = exc_info[1]
            if isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError) and not failed:
                # rmtree works relative to folder fds: its errors name only the last component.
                failed.append(OSError(exc.errno, exc.strerror or str(exc), path))

        shutil.rmtree(self._path(folder), onerror=onerror)
        if failed:
            raise failed[0]

    def rename(self, src: str, dst: str) -> None:
        link_or_rename(self._path(src), self._path(dst))

    def make_folder(self, folder: str) -> None:
        path = self._path(folder)
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            return
        fsync_dir(path.parent)

    def sync(self, folder: str = "") -> None:
        fsync_dir(self._path(folder))

    # -- locks ------------------------------------------------------------------------------

    def lock(self, name: str, info: bytes, wait_s: float = 0.0) -> Lock:
        """See Backend.lock: an flock on the file `name`, made if missing; opened for
        writing only if `info` is to be stored (so that a store this user cannot write can
        still be locked for reading). OSError if the file cannot be opened or made."""
        fd = open_store_file(self._path(name), (os.O_RDWR if info else os.O_RDONLY) | os.O_CREAT)
        try:
            deadline = time.monotonic() + wait_s
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | (0 if math.isinf(wait_s) else fcntl.LOCK_NB))
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        try:
                            held = os.pread(fd, 4096, 0)
                        except OSError:
                            held = b""
                        raise Busy(held) from None
                    time.sleep(_LOCK_POLL_S)
            if info:
                os.ftruncate(fd, 0)
                os.pwrite(fd, info, 0)
        except BaseException:
            os.close(fd)
            raise
        return LocalLock(fd)

    def locked(self, name: str) -> bool:
        try:
            fd = open_store_file(self._path(name), os.O_RDONLY | os.O_CREAT)
        except OSError:
            return True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return False
        except OSError:
            return True
        finally:
            os.close(fd)

    def planted(self, folders: tuple[str, ...], files: tuple[str, ...]) -> str | None:
        """See Backend.planted: a symlink at any of `folders` or `files` (or a folder of
        packs/), a non-folder at one of `folders`, a non-regular file at one of `files`."""
        for name in folders + files:
            where = self.root / name
            try:
                mode = os.lstat(where).st_mode
            except OSError:
                continue        # missing: what needs it says so
            if stat.S_ISLNK(mode):
                return f"{where} is a symlink, not part of a humiofs store: move it out"
            if name in folders and not stat.S_ISDIR(mode):
                return (f"{where} is not a folder, so nothing can be written into the store: "
                        "move it out of the store, then put the folder back from a copy of "
                        f"the store (or, for tmp, `mkdir -m 700 {where}`)")
            if name in files and not stat.S_ISREG(mode):
                what = "a folder" if stat.S_ISDIR(mode) else "not a regular file"
                return (f"{where} is {what}, not the {name} file of a humiofs store: move it "
                        "out of the store (the next run makes the file again)")
        try:
            with os.scandir(self.root / "packs") as it:
                for de in it:
                    if de.is_symlink():
                        return (f"{self.root / 'packs' / de.name} is a symlink, not part of a "
                                "humiofs store: move it out")
        except OSError:
            pass
        return None

    def close(self) -> None:
        with self._open_lock:
            for of in self._open.values():
                of.evicted = True
                if of.users == 0:
                    os.close(of.fd)
            self._open.clear()


class LocalLocation(Location):
    """BACKUP_DIR as a local folder."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.location = str(path)
        self.local_path = path

    def names(self) -> list[str]:
        return sorted(n for n in os.listdir(self.path) if not n.startswith("."))

    def store(self, name: str) -> LocalBackend:
        return LocalBackend(self.path / name)

    def create_store(self, name: str, files: dict[str, bytes], folders: list[str]) -> Backend:
        """See Location.create_store: made in `.NAME.creating-<hex8>`, which is flocked until
        it is renamed to NAME (remove_dead_creations removes what a killed creation left).
        NotADirectoryError if BACKUP_DIR is a file."""
        parent = self.path
        if not parent.is_dir():
            if parent.exists():
                raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(parent))
            # Never create BACKUP_DIR: if it is an unmounted network drive, the backup would
            # silently fill the local disk instead.
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(parent))
        path = parent / name
        staging = parent / f".{name}.creating-{os.urandom(4).hex()}"
        held = -1
        try:
            os.mkdir(staging, 0o700)
            # Locked until it is renamed: a folder of this name that can be locked was left by
            # a creation that died (remove_dead_creations).
            held = os.open(staging, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            fcntl.flock(held, fcntl.LOCK_EX)
            for folder in folders:
                os.mkdir(staging / folder, 0o700)
            for fname, data in files.items():
                write_new(staging / fname, data)
            for folder in sorted({f.partition("/")[0] for f in folders} | {"."}):
                fsync_dir(staging / folder)
            os.rename(staging, path)
        except OSError as exc:
            shutil.rmtree(staging, ignore_errors=True)
            if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
                raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(path)) from None
            raise
        finally:
            if held >= 0:
                os.close(held)
        fsync_dir(parent)
        return LocalBackend(path)

    def remove_dead_creations(self, name: str) -> None:
        """Removes the `.NAME.creating-*` folders that creations of the store `name` left
        when they were killed: those no process holds locked (create_store holds its own
        until the rename), and that have not changed for a while."""
        pattern = re.compile(rf"^\.{re.escape(name)}\.creating-[0-9a-f]{{8}}$")
        try:
            names = [n for n in os.listdir(self.path) if pattern.match(n)]
        except OSError:
            return
        for found in names:
            folder = self.path / found
            try:
                fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                if time.time() - os.fstat(fd).st_mtime < _DEAD_CREATION_S:
                    continue
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    continue            # its creator is still at work
                shutil.rmtree(folder, ignore_errors=True)
                log.info("removed %s, left by a store creation that was interrupted", folder)
            finally:
                os.close(fd)
