"""The local backend's file primitives (local.py): opening a store file without following a
symlink or blocking on a FIFO, reading it, writing a new file durably, fsync of a folder, and
moving a file into place without replacing one.
"""
from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from humiofs.store.durable import NotRegularFile

# Every open of a store file (FORMAT.md 11, threat model): a symlink planted in the store is
# never followed, and a FIFO or device under a store file's name neither blocks the open nor
# is read (open_store_file checks the file is a regular one).
_STORE_OPEN = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def _kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "a symlink, not part of a humiofs store"
    if stat.S_ISDIR(mode):
        return "a folder, not a file"
    if stat.S_ISFIFO(mode):
        return "a FIFO, not a file"
    return "not a regular file"


def open_store_file(path: Path | str, flags: int = os.O_RDONLY, mode: int = 0o600) -> int:
    """An fd of the regular store file `path`, opened with `flags` but never through a
    symlink (even as the last component) and never blocking on a FIFO. Raises
    NotRegularFile (an OSError with errno ELOOP or EINVAL) if something else is there, and
    the open's own OSError otherwise. The fd is left non-blocking: on a regular file that
    changes nothing."""
    try:
        fd = os.open(path, flags | _STORE_OPEN, mode)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENXIO, errno.EISDIR):
            try:
                kind = _kind(os.lstat(path).st_mode)
            except OSError:
                raise exc from None
            raise NotRegularFile(exc.errno, kind, str(path)) from None
        raise
    try:
        st = os.fstat(fd)
    except OSError:
        os.close(fd)
        raise
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise NotRegularFile(errno.EINVAL, _kind(st.st_mode), str(path))
    return fd


def read_fd(fd: int, limit: int | None = None) -> bytes:
    """The rest of the file `fd` from its position, at most `limit` bytes."""
    chunks = []
    left = limit if limit is not None else -1
    while left != 0:
        want = 1 << 20 if left < 0 else min(left, 1 << 20)
        b = os.read(fd, want)
        if not b:
            break
        chunks.append(b)
        if left > 0:
            left -= len(b)
    return b"".join(chunks)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def write_new(path: Path, data: bytes) -> None:
    """Creates the file `path` (0600, never through a symlink) holding `data`, fsynced."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    try:
        write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def link_or_rename(src: Path, dst: Path) -> None:
    """Moves `src` to `dst`; FileExistsError if `dst` exists. A hard link makes the check and
    the move one step; on a filesystem without hard links (exFAT, some network shares) the
    check comes first (the names written so carry 64 random bits or more)."""
    try:
        os.link(src, dst, follow_symlinks=False)
    except FileExistsError:
        raise
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK,
                             errno.ENOSYS, errno.EXDEV):
            raise
        if os.path.lexists(dst):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst)) from None
        os.rename(src, dst)
        return
    os.unlink(src)
