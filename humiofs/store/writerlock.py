"""The writer lock (docs/FORMAT.md 8): an flock on NAME/lock held for a writer's whole run,
taken for an instant by prune to learn that no writer runs, and the lock file's account of who
holds it, with the host name sealed under the store's key.
"""
from __future__ import annotations

import base64
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from humiofs.errors import IntegrityError, StoreError, StoreLocked, show
from humiofs.store import crypto
from humiofs.store.durable import NotRegularFile, open_store_file, store_io_error
from humiofs.store.storemeta import refuse_planted

if TYPE_CHECKING:
    from humiofs.store.repository import Store

WAIT_S = 1.0    # how long a writer waits for the writer lock before it gives up
HOST_PAD = 64   # the sealed host name is padded with NULs to a multiple of this (FORMAT.md 8)


def running(store: Store) -> bool:
    """True if a writer holds the writer lock now (or that cannot be told). Takes the lock for
    an instant, so a writer starting at that moment waits for it (see `hold`)."""
    try:
        fd = open_store_file(store.path / "lock", os.O_RDONLY | os.O_CREAT)
    except OSError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


@contextmanager
def hold(store: Store) -> Iterator[None]:
    """Holds the exclusive writer lock; raises StoreLocked if another process has it (after
    up to WAIT_S: a prune takes it for an instant). The lock file says who holds it: process
    id and start time, and the host name sealed, which only a reader with the key (another
    writer) can read."""
    lock_path = store.path / "lock"
    refuse_planted(store.path)
    try:
        fd = open_store_file(lock_path, os.O_RDWR | os.O_CREAT)
    except NotRegularFile as exc:
        # Put there after refuse_planted looked: the same one line.
        raise StoreError(f"{lock_path} is {exc.strerror}: move it out of the store (the "
                         "writer makes the file again)") from None
    except OSError as exc:
        # The first write of every writer: a read-only backup disk (EROFS) or one this user
        # may not write (EACCES) ends here, with one line and exit 7.
        raise store_io_error(exc, str(lock_path)) from None
    try:
        try:
            deadline = time.monotonic() + WAIT_S
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.02)
        except BlockingIOError:
            holder = _holder(store, os.pread(fd, 4096, 0))
            raise StoreLocked(f"another humiofs writer is using {store.path}"
                              + (f" ({holder})" if holder else "")) from None
        except OSError as exc:
            raise StoreError(f"cannot lock {lock_path}: {exc.strerror}") from None
        oid = crypto.new_object_id()
        host = socket.gethostname().encode()
        host += b"\0" * (-len(host) % HOST_PAD or (HOST_PAD if not host else 0))
        sealed = store.cipher(crypto.KIND_LOCK_HOST, oid).seal(host)
        info = {"version": 1, "pid": os.getpid(), "since_ms": int(time.time() * 1000),
                "host": base64.b64encode(oid + sealed).decode()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode() + b"\n", 0)
        yield
    finally:
        os.close(fd)


def _holder(store: Store, raw: bytes) -> str:
    """Who holds the writer lock, for the message of a writer that finds it held."""
    try:
        info = json.loads(raw)
        pid, since = int(info["pid"]), int(info["since_ms"])
        blob = base64.b64decode(info["host"], validate=True)
        oid, sealed = blob[:crypto.OBJECT_ID_LEN], blob[crypto.OBJECT_ID_LEN:]
        if not 0 < len(sealed) <= 1024 + crypto.TAG:
            raise ValueError("bad host")
        host = show(store.cipher(crypto.KIND_LOCK_HOST, oid).open(
            sealed, len(sealed) - crypto.TAG).rstrip(b"\0"))
        started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(since / 1000))
    except (ValueError, KeyError, TypeError, IntegrityError, OverflowError, OSError):
        # Written by an earlier version (plaintext), or not by humiofs at all: shown, never
        # trusted, and escaped so that it can neither break the line nor act on a terminal.
        return show(raw.strip()[:200])
    where = "this host" if host == show(socket.gethostname().encode()) else f"host {host}"
    return f"pid {pid} on {where}, since {started}"
