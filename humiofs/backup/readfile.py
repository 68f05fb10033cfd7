"""Reading one regular file into blobs as it was at one moment: the live-file rules of
docs/FORMAT.md 7.3 (racy ctimes, files being written, files written anew)."""
from __future__ import annotations

import hashlib
import os
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

from humiofs.backup import scan
from humiofs.backup.options import BackupStats
from humiofs.backup.packs import RunPacks
from humiofs.errors import SourceChanged
from humiofs.progress import Progress
from humiofs.store import crypto
from humiofs.store.format import FILE, SYMLINK, Entry, Ref, Xattrs
from humiofs.store.repository import Store

SMALL_FILE = 1 << 20
# A file whose ctime is this close to the moment it was read may have been modified again
# within the same timestamp tick (a jiffy, at most 10 ms) without its ctime moving; its ctime
# is stored as 0 so that the next run reads it again (git's "racy clean" problem).
RACY_NS = 100_000_000
# A file found empty, whose previous copy was not, and emptied less than this long ago is
# most likely being written anew (`cp` over it truncates first). Under load `cp` can pause
# longer than RACY_NS between the truncation and its first write, so the writer waits until
# the emptying is this old before it believes it (FORMAT.md 7.3).
EMPTIED_SETTLE_NS = 1_000_000_000




class FileReader:
    """Stores the data of one file at a time into the run's packs, counting into `stats` and
    `progress`; `xattrs_of(old, st, fd, rel)` gives the file's extended attributes."""

    def __init__(self, store: Store, packs: RunPacks, stats: BackupStats, progress: Progress,
                 xattrs_of: Callable[[Entry | None, os.stat_result, int, bytes], Xattrs]
                 ) -> None:
        self.store = store
        self.packs = packs
        self.stats = stats
        self._progress = progress
        self._xattrs = xattrs_of

    def store_file(self, dfd: int, name: bytes, rel: bytes, old: Entry | None) -> Entry:
        """Reads and stores one file as it was at one moment (FORMAT.md 7.3).

        Raises SourceChanged if the file shrank, stopped being a file, or was rewritten in
        place while it was read; the caller tries again.
        """
        read_ns = time.time_ns()
        fd = _open_source(name, dfd)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise SourceChanged("it is no longer a regular file")
            # Changed within a timestamp tick of this read: a write during the read might not
            # move the ctime, so the before/after comparison alone could miss a torn read.
            # Wait the tick out; a file that stays unchanged meanwhile is read as usual (and
            # its ctime trusted), one that changed again is being written: it is read twice.
            racy = st.st_ctime_ns >= read_ns - RACY_NS
            if racy:
                time.sleep(_wait_s(st.st_ctime_ns + RACY_NS, RACY_NS))
                again = os.fstat(fd)
                racy = scan.Signature.of(again) != scan.Signature.of(st)
                st = again
            if (st.st_size == 0 and old is not None and old.type == FILE and old.size > 0
                    and st.st_ctime_ns >= time.time_ns() - EMPTIED_SETTLE_NS):
                time.sleep(_wait_s(st.st_ctime_ns + EMPTIED_SETTLE_NS, EMPTIED_SETTLE_NS))
                if scan.Signature.of(os.fstat(fd)) != scan.Signature.of(st):
                    raise SourceChanged("it was being written anew from the start")
            attrs = self._xattrs(old, st, fd, rel)
            extents = scan.data_extents(fd, st.st_size)
            data_len = sum(length for _, length in extents)
            ref: Ref | None = None
            if data_len == 0:
                after = self._after_read(fd, st, racy, old)
                if after is not None and not _reads_again_as(fd, st.st_size, extents,
                                                             _blake2b(b"")):
                    raise SourceChanged("it was rewritten while it was read")
            elif data_len < SMALL_FILE:
                data = b"".join(bytes(v) for v in scan.iter_extent_data(fd, extents))
                after = self._after_read(fd, st, racy, old)
                if after is not None and not _reads_again_as(fd, st.st_size, extents,
                                                             _blake2b(data)):
                    raise SourceChanged("it was rewritten while it was read")
                ref = self.packs.small_pack().add(crypto.KIND_DATA, data)
                self.packs.rotate()
            else:
                ref, after = self._store_large(fd, st, extents, data_len, racy, old)
        finally:
            os.close(fd)
        self.stats.bytes_read += data_len
        if ref is not None:
            self.stats.bytes_stored += ref.stored_len
        self._progress.update(1, 0 if data_len >= SMALL_FILE else data_len)
        entry = make_entry(name, st, FILE, data=ref, extents=tuple(extents), nlink=st.st_nlink,
                       xattrs=attrs)
        if after is not None:
            # Read twice and stored as of the size it had when opened (it is being written):
            # a ctime of 0 makes the next run read it again.
            entry = replace(entry, ctime_ns=0)
            self.stats.live += 1
        return entry

    def _after_read(self, fd: int, before: os.stat_result, racy: bool,
                    old: Entry | None) -> os.stat_result | None:
        """None if the file is provably as it was when opened; else its stat now, and the
        caller must read it a second time to know that the first read was not torn (it grew,
        or changed within a timestamp tick of being opened). Raises SourceChanged if it
        shrank, if it changed during the read without having been racy when opened (the next
        attempt will be, and checks its read by reading twice), or if it is being written
        anew from the start (FORMAT.md 7.3): empty when opened, but not before (the previous
        generation's copy) or after. That empty state is real, but it is a file truncated to
        be written again (`cp` over it), not one worth a generation."""
        after = os.fstat(fd)
        same = scan.Signature.of(after) == scan.Signature.of(before)
        if same and not racy:
            return None
        if after.st_size < before.st_size:
            raise SourceChanged("it shrank while it was read")
        if not racy:
            raise SourceChanged("it changed while it was read")
        if before.st_size == 0 and (after.st_size > 0 or (
                old is not None and old.type == FILE and old.size > 0)):
            raise SourceChanged("it was being written anew from the start")
        return after

    def _store_large(self, fd: int, st: os.stat_result, extents: list[tuple[int, int]],
                     data_len: int, racy: bool, old: Entry | None
                     ) -> tuple[Ref, os.stat_result | None]:
        pack = self.store.new_pack()
        # Only a racy file can end up read twice; only then is the first read hashed.
        digest = hashlib.blake2b(digest_size=32) if racy else None
        try:
            with scan.ReadAhead(fd, extents) as reader:
                def pieces() -> Iterator[memoryview]:
                    for view in reader:
                        self._progress.update(0, len(view))
                        if digest is not None:
                            digest.update(view)
                        yield view
                try:
                    ref = pack.add_stream(crypto.KIND_DATA, pieces(), data_len)
                except ValueError as exc:
                    raise SourceChanged(str(exc)) from None
            after = self._after_read(fd, st, racy, old)
            if after is not None:
                assert digest is not None
                if not _reads_again_as(fd, st.st_size, extents, digest.digest()):
                    raise SourceChanged("it was rewritten while it was read")
        except BaseException:
            pack.abort()
            raise
        self.packs.finish_later(pack)
        return ref, after


def _wait_s(until_ns: int, at_most_ns: int) -> float:
    """Seconds from now until `until_ns` (wall clock), but never more than `at_most_ns`: a
    ctime in the future (the clock was set back, or another host's clock on a network
    filesystem) must not stall the run."""
    return min(max(0, until_ns - time.time_ns()), at_most_ns) / 1e9


def _blake2b(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=32).digest()


def _reads_again_as(fd: int, size: int, extents: list[tuple[int, int]], first: bytes) -> bool:
    """True if `[0, size)` of the file has the same extents as the first read, and bytes
    whose blake2b digest is `first` (a comparison, not a defence: the file is ours to read)."""
    if scan.data_extents(fd, size) != extents:
        return False
    again = hashlib.blake2b(digest_size=32)
    try:
        for view in scan.iter_extent_data(fd, extents):
            again.update(view)
    except SourceChanged:
        return False
    return again.digest() == first


def _open_source(name: bytes, dfd: int) -> int:
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    try:
        return os.open(name, flags | os.O_NOATIME, dir_fd=dfd)
    except PermissionError:
        return os.open(name, flags, dir_fd=dfd)


def make_entry(name: bytes, st: os.stat_result, etype: int, **kw: Any) -> Entry:
    # A symlink's size is its stored target's length (FORMAT.md 7.1), not st_size, which is
    # another link's if it was replaced between the lstat and the readlink.
    size = st.st_size if etype == FILE else len(kw["target"]) if etype == SYMLINK else 0
    return Entry(name, etype, st.st_mode & 0o7777, st.st_uid, st.st_gid,
                 st.st_mtime_ns, st.st_ctime_ns, st.st_ino, size, **kw)

