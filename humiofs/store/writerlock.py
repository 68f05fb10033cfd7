"""The writer lock (docs/FORMAT.md 8): the backend's lock `lock` (an flock on NAME/lock on a
local store) held for a writer's whole run, taken for an instant by prune to learn that no
writer runs, and the lock file's account of who holds it, with the host name sealed under the
store's key.
"""
from __future__ import annotations

import base64
import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from humiofs.errors import IntegrityError, StoreError, StoreLocked, show
from humiofs.store import crypto
from humiofs.store.backend import Busy
from humiofs.store.durable import NotRegularFile, store_io_error
from humiofs.store.storemeta import refuse_planted

if TYPE_CHECKING:
    from humiofs.store.repository import Store

WAIT_S = 1.0    # how long a writer waits for the writer lock before it gives up
LOCK_NAME = "lock"
HOST_PAD = 64   # the sealed host name is padded with NULs to a multiple of this (FORMAT.md 8)


def running(store: Store) -> bool:
    """True if a writer holds the writer lock now (or that cannot be told). Takes the lock for
    an instant, so a writer starting at that moment waits for it (see `hold`)."""
    return store.backend.locked(LOCK_NAME)


@contextmanager
def hold(store: Store) -> Iterator[None]:
    """Holds the exclusive writer lock; raises StoreLocked if another process has it (after
    up to WAIT_S: a prune takes it for an instant). The lock file says who holds it: process
    id and start time, and the host name sealed, which only a reader with the key (another
    writer) can read."""
    lock_path = store.at(LOCK_NAME)
    refuse_planted(store.backend)
    oid = crypto.new_object_id()
    host = socket.gethostname().encode()
    host += b"\0" * (-len(host) % HOST_PAD or (HOST_PAD if not host else 0))
    sealed = store.cipher(crypto.KIND_LOCK_HOST, oid).seal(host)
    info = {"version": 1, "pid": os.getpid(), "since_ms": int(time.time() * 1000),
            "host": base64.b64encode(oid + sealed).decode()}
    try:
        held = store.backend.lock(LOCK_NAME, json.dumps(info).encode() + b"\n", WAIT_S)
    except Busy as busy:
        holder = _holder(store, busy.info)
        raise StoreLocked(f"another humiofs writer is using {store.path}"
                          + (f" ({holder})" if holder else "")) from None
    except NotRegularFile as exc:
        # Put there after refuse_planted looked: the same one line.
        raise StoreError(f"{lock_path} is {exc.strerror}: move it out of the store (the "
                         "writer makes the file again)") from None
    except OSError as exc:
        # The first write of every writer: a read-only backup disk (EROFS) or one this user
        # may not write (EACCES) ends here, with one line and exit 7.
        raise store_io_error(exc, lock_path) from None
    with held:
        yield


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
