"""The node's identity: its cluster_membership.uuid and node id, for the seed file
`globaldata/cluster_membership-NODEID-UUID.uuid` that the mount presents.
"""
from __future__ import annotations

import errno
import logging
import os
import re
import stat
from pathlib import Path
from typing import BinaryIO

from humiofs.store.format import Identity

log = logging.getLogger(__name__)

UUID_FILE = "cluster_membership.uuid"
SNAPSHOT_FILE = "global-data-snapshot.json"
_UUID = re.compile(r"^[0-9A-Za-z._-]{1,100}$")
_ID_KEYS = ("vhost", "nodeId", "hostId", "id")
_WINDOW = 4096
_BLOCK = 1 << 20


def detect(directory: Path, host_id: str | None) -> Identity | None:
    """The node's identity, or None if the directory has no usable cluster_membership.uuid.

    The node id comes from `host_id` (BOOTSTRAP_HOST_ID) if given, else from the host entry in
    global-data-snapshot.json that carries the node's uuid, else it is `unknown`.
    """
    try:
        with _open_regular(directory / UUID_FILE) as f:
            raw = f.read(200)
    except FileNotFoundError:
        log.warning("%s has no %s; the backup will not present a seed file",
                    directory, UUID_FILE)
        return None
    except OSError as exc:
        log.warning("cannot read %s: %s", directory / UUID_FILE, exc.strerror)
        return None
    uuid = raw.decode("utf-8", "replace").strip()
    if not _UUID.match(uuid):
        log.warning("%s does not hold a plain uuid; no seed file will be presented",
                    directory / UUID_FILE)
        return None
    node_id = host_id.strip() if host_id else None
    if not node_id:
        node_id = node_id_from_snapshot(directory / SNAPSHOT_FILE, uuid)
    if not node_id or not _UUID.match(node_id):
        log.warning("node id not found (set BOOTSTRAP_HOST_ID); the seed file will say 'unknown'")
        node_id = "unknown"
    return Identity(node_id, uuid)


def node_id_from_snapshot(path: Path, uuid: str) -> str | None:
    """Finds the id of the host entry that names `uuid` in a global data snapshot.

    The snapshot can be hundreds of MB, so it is scanned in blocks with bounded memory: around
    each occurrence of the uuid, the enclosing JSON object is searched for an id member.
    """
    needle = uuid.encode()
    key_re = re.compile(rb'"(' + b"|".join(k.encode() for k in _ID_KEYS)
                        + rb')"\s*:\s*"?(\d{1,9})"?')
    try:
        with _open_regular(path) as f:
            return _scan(f, needle, key_re)
    except OSError:   # unreadable or not a file: the id is not found, the backup goes on
        return None


def _open_regular(path: Path) -> BinaryIO:
    """`path` opened for reading; OSError unless it is a regular file. Never blocks (a FIFO
    of that name would block a plain open until something writes to it)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def _scan(f: BinaryIO, needle: bytes, key_re: re.Pattern[bytes]) -> str | None:
    tail = b""
    while True:
        block = f.read(_BLOCK)
        data = tail + block
        start = 0
        while (hit := data.find(needle, start)) >= 0:
            found = _id_near(data, hit, len(needle), key_re)
            if found:
                return found
            start = hit + 1
        if not block:
            return None
        tail = data[-(_WINDOW + len(needle)):]


def _id_near(data: bytes, hit: int, n: int, key_re: re.Pattern[bytes]) -> str | None:
    lo = data.rfind(b"{", max(0, hit - _WINDOW), hit)
    hi = data.find(b"}", hit + n, hit + n + _WINDOW)
    if lo < 0 or hi < 0:
        return None
    obj = data[lo:hi]
    best = None
    for m in key_re.finditer(obj):
        rank = _ID_KEYS.index(m.group(1).decode())
        if best is None or rank < best[0]:
            best = (rank, m.group(2).decode())
    return best[1] if best else None
