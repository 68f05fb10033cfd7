"""What every backend's errors share (store/backend/__init__.py): NotRegularFile for what is
planted under a store file's name, and the one-line errors for a backup disk that is full or
not writable. The file primitives themselves (O_NOFOLLOW opens, write, fsync, rename, fsync of
the folder) are the local backend's (backend/local.py).
"""
from __future__ import annotations

import errno

from humiofs.errors import StoreIOError


class NotRegularFile(OSError):
    """A store file's name holds a symlink, FIFO, device, socket or folder. An OSError, so
    that every caller's handling of an unreadable store file applies; its strerror says
    what is there."""


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
