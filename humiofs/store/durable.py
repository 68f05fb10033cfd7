"""Write-once store files (docs/FORMAT.md section 2): write, fsync, rename, fsync of the
folder; and the one-line errors for a backup disk that is full or not writable.
"""
from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from humiofs.errors import StoreIOError

# Every open of a store file (FORMAT.md 11, threat model): a symlink planted in the store is
# never followed, and a FIFO or device under a store file's name neither blocks the open nor
# is read (open_store_file checks the file is a regular one).
_STORE_OPEN = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class NotRegularFile(OSError):
    """A store file's name holds a symlink, FIFO, device, socket or folder. An OSError, so
    that every caller's handling of an unreadable store file applies; its strerror says
    what is there."""


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


def read_store_file(path: Path | str, limit: int | None = None) -> bytes:
    """The whole of the regular store file `path` (see open_store_file for what it refuses);
    with `limit`, at most that many bytes."""
    fd = open_store_file(path)
    try:
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
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_all(fd: int, data: bytes | memoryview, what: str) -> None:
    view = memoryview(data)
    try:
        while view:
            n = os.write(fd, view)
            view = view[n:]
    except OSError as exc:
        raise store_io_error(exc, what) from None


def store_io_error(exc: OSError, what: str) -> StoreIOError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StoreIOError(f"backup disk is full while writing {what}; nothing stored before "
                            "was changed, and what this run stored since its last checkpoint "
                            "is removed (a checkpoint it committed is kept: the next run "
                            "resumes from it). Free space (the disk's other files, or prune) "
                            "and run again")
    if exc.errno == errno.EROFS:
        return StoreIOError(f"the backup disk is read-only (cannot write {what}); mount it "
                            "read-write to back up, prune or change the key. check, ls, "
                            "restore and mount work on a read-only store")
    return StoreIOError(f"cannot write {what}: {exc.strerror}")


def write_new(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    try:
        write_all(fd, data, str(path))
        os.fsync(fd)
    finally:
        os.close(fd)


def unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
