"""Which folders of the data directory changed: Linux inotify through ctypes, and a tracker that
turns its events into a set of dirty folders for the next backup pass (watch.py).

The tracker is an optimisation with a safe fallback: whenever it may have missed something
(queue overflow, a folder moved, a watch that could not be added) it asks for a full walk.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

from humiofs.backup.scan import Excluder

log = logging.getLogger(__name__)

IN_MODIFY = 0x00000002
IN_ATTRIB = 0x00000004
IN_CLOSE_WRITE = 0x00000008
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000
IN_DONT_FOLLOW = 0x02000000
IN_EXCL_UNLINK = 0x04000000
IN_ISDIR = 0x40000000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC

WATCH_MASK = (IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE
              | IN_DELETE | IN_DELETE_SELF | IN_MOVE_SELF | IN_ONLYDIR | IN_DONT_FOLLOW
              | IN_EXCL_UNLINK)
_EVENT = struct.Struct("iIII")
_READ_SIZE = 256 * 1024

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.inotify_init1.argtypes = [ctypes.c_int]
_libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
_libc.inotify_rm_watch.argtypes = [ctypes.c_int, ctypes.c_int]


def _oserror(what: str) -> OSError:
    err = ctypes.get_errno()
    return OSError(err, f"{what}: {os.strerror(err)}")


class Inotify:
    """A non-blocking inotify instance."""

    def __init__(self) -> None:
        fd = _libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            raise _oserror("inotify_init1")
        self.fd: int = fd

    def fileno(self) -> int:
        return self.fd

    def add_watch(self, path: bytes, mask: int = WATCH_MASK) -> int:
        wd = _libc.inotify_add_watch(self.fd, path, mask)
        if wd < 0:
            raise _oserror(f"inotify_add_watch {os.fsdecode(path)}")
        return int(wd)

    def rm_watch(self, wd: int) -> None:
        _libc.inotify_rm_watch(self.fd, wd)  # EINVAL if the kernel already dropped it

    def read(self) -> Iterator[tuple[int, int, bytes]]:
        """Every queued event as (wd, mask, name), without blocking."""
        while True:
            try:
                buf = os.read(self.fd, _READ_SIZE)
            except BlockingIOError:
                return
            pos = 0
            while pos + _EVENT.size <= len(buf):
                wd, mask, _cookie, length = _EVENT.unpack_from(buf, pos)
                pos += _EVENT.size
                name = buf[pos:pos + length].rstrip(b"\0")
                pos += length
                yield wd, mask, name

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@dataclass
class Dirty:
    """What changed since the last pass. `full` asks for a walk of everything."""

    full: bool = False
    dirs: set[bytes] = field(default_factory=set)    # folders whose listing or files changed
    trees: set[bytes] = field(default_factory=set)   # folders new or replaced as a whole
    _ancestors: set[bytes] = field(default_factory=set)

    def add_dir(self, rel: bytes) -> None:
        self.dirs.add(rel)

    def add_tree(self, rel: bytes) -> None:
        self.trees.add(rel)

    def seal(self) -> None:
        """Prepares `clean` (call once, after the last add)."""
        for rel in self.dirs | self.trees:
            self._ancestors.update(_prefixes(rel))
            self._ancestors.add(b"")

    def clean(self, rel: bytes) -> bool:
        """True if the folder `rel` and all below it saw no event (the writer's `clean`)."""
        if self.full or rel in self._ancestors:
            return False
        return not any(p in self.trees for p in _prefixes(rel))

    def __bool__(self) -> bool:
        return self.full or bool(self.dirs) or bool(self.trees)


def _prefixes(rel: bytes) -> Iterator[bytes]:
    """b"a/b/c" -> b"a", b"a/b", b"a/b/c"."""
    if not rel:
        return
    pos = rel.find(b"/")
    while pos >= 0:
        yield rel[:pos]
        pos = rel.find(b"/", pos + 1)
    yield rel


def _parent(rel: bytes) -> bytes:
    pos = rel.rfind(b"/")
    return rel[:pos] if pos >= 0 else b""


def _join(rel: bytes, name: bytes) -> bytes:
    return rel + b"/" + name if rel else name


class Tracker:
    """Watches every folder below `root` (minus excluded ones and the store) and collects the
    folders that changed. `take` hands them over; anything doubtful makes it ask for a full walk.
    """

    def __init__(self, root: bytes, excluder: Excluder,
                 skip: tuple[int, int] | None = None) -> None:
        self.root = root
        self.excluder = excluder
        self.skip = skip
        self.ino = Inotify()
        self.paths: dict[int, bytes] = {}
        self.dirty = Dirty(full=True)
        self.broken = False   # watches are incomplete: every pass must walk everything

    def fileno(self) -> int:
        return self.ino.fileno()

    def close(self) -> None:
        self.ino.close()

    def rewatch(self) -> None:
        """(Re)watches every folder; forgets watches of folders that are gone or moved.

        Events queued before this call may name stale paths; the caller walks everything
        after it, so nothing is lost.
        """
        old = self.paths
        self.paths = {}
        self.broken = False
        self._watch_tree(b"")
        for wd in old.keys() - self.paths.keys():
            self.ino.rm_watch(wd)

    def _watch_tree(self, rel: bytes) -> None:
        stack = [rel]
        while stack and not self.broken:
            cur = stack.pop()
            path = os.path.join(self.root, cur) if cur else self.root
            try:
                wd = self.ino.add_watch(path)
            except OSError as exc:
                if cur and exc.errno in (errno.ENOENT, errno.ENOTDIR):
                    continue    # gone already; its parent's event covers that
                self._give_up(f"cannot watch {os.fsdecode(path)}: {exc.strerror}"
                              + (" (raise fs.inotify.max_user_watches)"
                                 if exc.errno == errno.ENOSPC else ""))
                return
            self.paths[wd] = cur
            try:
                with os.scandir(path) as it:
                    for de in it:
                        child = _join(cur, de.name)
                        if not de.is_dir(follow_symlinks=False) or \
                                self.excluder.excluded(child, de.name):
                            continue
                        if self.skip is not None:
                            st = de.stat(follow_symlinks=False)
                            if (st.st_dev, st.st_ino) == self.skip:
                                continue
                        stack.append(child)
            except OSError:
                continue        # vanished or unreadable: the walk reports it

    def _give_up(self, why: str) -> None:
        if not self.broken:
            log.warning("%s; every pass walks the whole data directory", why)
        self.broken = True

    def drain(self) -> None:
        """Reads all queued events into the dirty set."""
        d = self.dirty
        for wd, mask, name in self.ino.read():
            if mask & IN_Q_OVERFLOW:
                log.info("inotify queue overflowed; the next pass walks everything")
                d.full = True
                continue
            rel = self.paths.get(wd)
            if mask & IN_IGNORED:
                self.paths.pop(wd, None)
                continue
            if rel is None:
                continue                      # a watch forgotten by rewatch
            if not name:                      # the watched folder itself
                if mask & (IN_DELETE_SELF | IN_MOVE_SELF):
                    if not rel or mask & IN_MOVE_SELF:
                        d.full = True         # the root went away, or paths below moved
                    continue
                d.add_dir(rel)
                d.add_dir(_parent(rel))
                continue
            child = _join(rel, name)
            if self.excluder.excluded(child, name):
                continue
            d.add_dir(rel)
            if mask & IN_ISDIR:
                if mask & IN_MOVED_FROM:
                    d.full = True             # watches below it now carry stale paths
                elif mask & (IN_CREATE | IN_MOVED_TO):
                    d.add_tree(child)
                    self._watch_tree(child)

    def take(self) -> Dirty:
        """The changes since the last take; a full walk if the watches are incomplete."""
        self.drain()
        d, self.dirty = self.dirty, Dirty()
        if self.broken:
            d.full = True
        d.seal()
        return d

    def mark(self, rels: list[bytes]) -> None:
        """Makes the folders of these entries dirty again (their files were skipped)."""
        for rel in rels:
            self.dirty.add_dir(_parent(rel))

