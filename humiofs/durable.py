"""Write-once store files (docs/FORMAT.md section 2): write, fsync, rename, fsync of the
folder; and the one-line errors for a backup disk that is full or not writable.
"""
from __future__ import annotations

import errno
import os
from pathlib import Path

from humiofs.errors import StoreIOError


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
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
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
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
