"""The walk of a backup run: each folder depth first, deciding per entry whether the parent
generation's copy still holds or it is stored anew, and each folder's tree after its children.

Memory holds one listing per level, and a file's data is streamed through a fixed buffer.
"""
from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Callable
from dataclasses import replace
from operator import itemgetter

from humiofs.backup import checkpoint, scan, xattrs
from humiofs.backup.ledger import Ledger
from humiofs.backup.options import BackupOptions, BackupStats, TreeCounts
from humiofs.backup.packs import RunPacks
from humiofs.backup.readfile import FileReader, make_entry
from humiofs.errors import HumiofsError, SourceChanged, os_reason, show
from humiofs.progress import Progress
from humiofs.store import crypto, format
from humiofs.store.format import DIR, FILE, SYMLINK, Entry, Ref, Xattrs
from humiofs.store.repository import Store

log = logging.getLogger(__name__)

READ_ATTEMPTS = 3


class Walker:
    """Walks the source for one run, storing into `packs` what changed since the parent
    generation and counting into `stats`; calls `on_checkpoint()` when `policy` says one is
    due (writer.Backup commits it). Reads the parent's trees from `store`."""

    def __init__(self, store: Store, options: BackupOptions, packs: RunPacks,
                 stats: BackupStats, progress: Progress, should_stop: Callable[[], bool],
                 policy: checkpoint.Policy | None, on_checkpoint: Callable[[], None]) -> None:
        self.opt = options
        self.packs = packs
        self.stats = stats
        self._progress = progress
        self.should_stop = should_stop
        self._policy = policy
        self._checkpoint = on_checkpoint
        self.excluder = scan.Excluder(options.excludes)
        self.ledger = Ledger(store, stats)
        self.files = FileReader(store, packs, stats, progress, self._xattrs)
        # (st_dev, st_ino) of the store's folder: never backed up into itself.
        self.store_ino: tuple[int, int] | None = None
        # Counts of every tree this run stored or reused, for the next run's `tree_counts`.
        self.tree_counts_seen: dict[Ref, TreeCounts] = {}
        # (st_dev, st_ino) -> the entry stored for the first name of a hard-linked file.
        self._links: dict[tuple[int, int], Entry] = {}
        # Paths of the files with more than one name that this run saw (for watch.py).
        self.linked_files: list[bytes] = []
        # Every pack the generation refers to through a folder this run walked (backup --watch
        # keeps the union of these, for the folders it reuses without walking them).
        self.packs_used: set[bytes] = set()
        self.levels: list[checkpoint.Level] = []      # the folders the walk is inside of

    def _counts(self) -> TreeCounts:
        s = self.stats
        return (s.files, s.dirs, s.symlinks, s.specials, s.bytes, s.data_bytes)

    def reuse(self, rel: bytes, prev_ref: Ref | None) -> Ref | None:
        """`prev_ref`, counted into the stats, if the caller says `rel` is clean; else None."""
        if prev_ref is None or self.opt.clean is None or self.opt.tree_counts is None:
            return None
        counts = self.opt.tree_counts.get(prev_ref)
        if counts is None or not self.opt.clean(rel):
            return None
        s = self.stats
        s.files += counts[0]
        s.dirs += counts[1]
        s.symlinks += counts[2]
        s.specials += counts[3]
        s.bytes += counts[4]
        s.data_bytes += counts[5]
        s.unchanged += counts[0]
        self._progress.update(counts[0], counts[5])
        self.tree_counts_seen[prev_ref] = counts
        return prev_ref

    def store_dir(self, dfd: int, rel: bytes, prev_ref: Ref | None) -> tuple[Ref, int]:
        """Stores the folder open as `dfd` (and everything below it) unless its tree is
        unchanged; returns its tree's ref and the number of subfolders it holds."""
        before = self._counts()
        ref, subdirs = self._walk_dir(dfd, rel, prev_ref)
        a, b = self._counts(), before
        self.tree_counts_seen[ref] = (a[0] - b[0], a[1] - b[1], a[2] - b[2], a[3] - b[3],
                                      a[4] - b[4], a[5] - b[5])
        return ref, subdirs

    def _walk_dir(self, dfd: int, rel: bytes, prev_ref: Ref | None) -> tuple[Ref, int]:
        prev_plain, prev = self.ledger.previous_tree(prev_ref, rel)
        # Entries from a version 1 tree have no xattrs or link counts yet: read those anew.
        meta_stale = prev_plain is not None and prev_plain[2] == 1
        with os.scandir(dfd) as it:
            items = sorted(((os.fsencode(de.name), de) for de in it), key=itemgetter(0))
        entries: list[Entry] = []
        level = checkpoint.Level(rel, entries, prev)
        self.levels.append(level)
        try:
            return self._walk_entries(dfd, rel, prev_ref, prev_plain, prev, meta_stale, items,
                                      level)
        finally:
            self.levels.pop()

    def _walk_entries(self, dfd: int, rel: bytes, prev_ref: Ref | None,
                      prev_plain: bytes | None, prev: dict[bytes, Entry], meta_stale: bool,
                      items: list[tuple[bytes, os.DirEntry[str]]], level: checkpoint.Level
                      ) -> tuple[Ref, int]:
        entries = level.entries
        policy = self._policy
        # True while every entry is the previous generation's, unchanged: then so is the tree,
        # and encoding it can be skipped (most folders of most runs).
        same = prev_plain is not None and prev_plain[2] == format.TREE_VERSION
        # Per entry costs count: a no-change run over a million files does this a million times.
        excluder = self.excluder if self.excluder.applies_at(
            rel.count(b"/") + 2 if rel else 1) else None
        used = self.packs_used
        subdirs = 0
        for name, de in items:
            child_rel = rel + b"/" + name if rel else name
            if excluder is not None and excluder.excluded(child_rel, name):
                continue
            level.pos = name
            old = prev.get(name)
            if old is not None and meta_stale:
                old = replace(old, ctime_ns=-1)  # never equal to a real ctime: read the metadata
            try:
                entry = self._child(dfd, de, name, child_rel, old)
            except HumiofsError:
                raise
            except Exception as exc:  # one entry never ends the run (see _problem)
                entry = self.ledger.skip(child_rel, _problem(exc), old)
            if entry is not None:
                entries.append(entry)
                if same and entry is not old and entry != old:
                    same = False
                if entry.data is not None:
                    used.add(entry.data.pack)
                elif entry.subtree is not None:
                    used.add(entry.subtree.pack)
                    subdirs += 1
            if policy is not None and policy.due(self.stats.bytes_stored):
                self._checkpoint()
        if prev:
            present = {name for name, _ in items}
            for name, gone in prev.items():
                if name not in present:
                    self.ledger.gone(rel + b"/" + name if rel else name, gone)
        if same and len(entries) == len(prev) and prev_ref is not None:
            used.add(prev_ref.pack)
            return prev_ref, subdirs
        plain = self._encode(entries, rel, prev)
        if plain == prev_plain and prev_ref is not None:
            used.add(prev_ref.pack)
            return prev_ref, subdirs
        ref = self.packs.tree_pack().add(crypto.KIND_TREE, plain)
        used.add(ref.pack)
        self.stats.trees_stored += 1
        self.stats.bytes_stored += ref.stored_len
        self.packs.rotate()
        return ref, subdirs

    def _encode(self, entries: list[Entry], rel: bytes, prev: dict[bytes, Entry]) -> bytes:
        """The tree of `entries`; an entry the format cannot hold is skipped with a warning
        (the previous generation's copy kept, if it had one) instead of failing the folder."""
        try:
            return format.encode_tree(entries)
        except (ValueError, OverflowError):
            pass
        kept = []
        for e in entries:
            try:
                format.encode_tree([e])
            except (ValueError, OverflowError) as exc:
                child_rel = rel + b"/" + e.name if rel else e.name
                old = self.ledger.skip(child_rel, f"cannot be stored: {exc}", prev.get(e.name))
                if old is not None:
                    kept.append(old)
                continue
            kept.append(e)
        return format.encode_tree(kept)

    def _child(self, dfd: int, de: os.DirEntry[str], name: bytes, rel: bytes,
               old: Entry | None) -> Entry | None:
        """The entry for one name in a folder, or None if it is gone or not kept."""
        try:
            st = de.stat(follow_symlinks=False)
        except FileNotFoundError:
            return self.ledger.vanished(rel)
        if len(name) > format.NAME_MAX:
            raise OSError(errno.ENAMETOOLONG, f"its name is longer than {format.NAME_MAX} bytes")
        mode = st.st_mode
        if stat.S_ISREG(mode):
            return self._file(dfd, name, rel, st, old)
        if stat.S_ISDIR(mode):
            return self._subdir(dfd, name, rel, st, old)
        if stat.S_ISLNK(mode):
            return self._symlink(dfd, name, rel, st, old)
        if stat.S_ISSOCK(mode):
            self.stats.skipped += 1
            self.ledger.warn(f"{_show(rel)}: a socket cannot be backed up (the program that listens on "
                       "it makes it anew); skipped. Exclude it with BACKUP_EXCLUDE to silence this")
            return None
        etype = _SPECIAL_TYPES.get(stat.S_IFMT(mode))
        if etype is None:
            raise OSError(errno.EINVAL, f"unknown file type {stat.S_IFMT(mode):o}")
        return self._special(dfd, name, rel, st, etype, old)

    def _subdir(self, dfd: int, name: bytes, rel: bytes, st: os.stat_result,
                old: Entry | None) -> Entry | None:
        if self.store_ino == (st.st_dev, st.st_ino):
            log.info("skipping %s: it is the backup store itself", _show(rel))
            return None
        prev = old.subtree if old is not None and old.type == DIR else None
        if (old is not None and old.ino == st.st_ino and old.mtime_ns == st.st_mtime_ns
                and (reused := self.reuse(rel, prev)) is not None):
            self.stats.dirs += 1
            return make_entry(name, st, DIR, subtree=reused, nlink=old.nlink,
                          xattrs=self._xattrs(old, st, xattrs.at(dfd, name), rel))
        try:
            fd = os.open(name, _DIR_FLAGS, dir_fd=dfd)
        except FileNotFoundError:
            return self.ledger.vanished(rel)
        level = self.levels[-1]
        try:
            st = os.fstat(fd)
            attrs = self._xattrs(old, st, fd, rel)
            level.sub = (st, attrs, old)
            sub, subdirs = self.store_dir(fd, rel, prev)
        except FileNotFoundError:
            return self.ledger.vanished(rel)
        finally:
            level.sub = None
            os.close(fd)
        self.stats.dirs += 1
        return make_entry(name, st, DIR, subtree=sub, nlink=2 + subdirs, xattrs=attrs)

    def _symlink(self, dfd: int, name: bytes, rel: bytes, st: os.stat_result,
                 old: Entry | None) -> Entry | None:
        try:
            target = os.readlink(name, dir_fd=dfd)
        except FileNotFoundError:
            return self.ledger.vanished(rel)
        self.stats.symlinks += 1
        return make_entry(name, st, SYMLINK, target=target,
                      xattrs=self._xattrs(old, st, xattrs.at(dfd, name), rel))

    def _special(self, dfd: int, name: bytes, rel: bytes, st: os.stat_result, etype: int,
                 old: Entry | None) -> Entry:
        """A FIFO or a device node: its attributes and device number; nothing is opened."""
        self.stats.specials += 1
        rdev = (os.major(st.st_rdev), os.minor(st.st_rdev)) if etype != format.FIFO else (0, 0)
        return make_entry(name, st, etype, rdev=rdev, nlink=st.st_nlink,
                      xattrs=self._xattrs(old, st, xattrs.at(dfd, name), rel))

    def _xattrs(self, old: Entry | None, st: os.stat_result, target: int | bytes,
                rel: bytes) -> Xattrs:
        """The entry's extended attributes: the previous generation's if the inode's ctime
        (which every xattr change moves) is the same, else read from `target`. If they cannot
        be read (more than the kernel will list, say), the entry is stored without them and
        named in a warning: its data matters more."""
        if old is not None and old.ctime_ns == st.st_ctime_ns and old.ino == st.st_ino:
            return old.xattrs
        try:
            return xattrs.read(target)
        except FileNotFoundError:
            raise
        except OSError as exc:
            self.stats.skipped += 1
            self.stats.skipped_paths.append(rel)
            self.ledger.warn(f"{_show(rel)}: its extended attributes cannot be read "
                       f"({os_reason(exc)}); stored without them")
            return ()

    def _file(self, dfd: int, name: bytes, rel: bytes, st: os.stat_result,
              old: Entry | None) -> Entry | None:
        link = (st.st_dev, st.st_ino) if st.st_nlink > 1 else None
        if link is not None:
            self.linked_files.append(rel)
            first = self._links.get(link)
            if first is not None and _same_inode_state(first, st):
                # Another name of an inode this run already stored: the same entry, data once.
                if old is None or old.type != FILE:
                    self.stats.new += 1
                elif _unchanged(old, st):
                    self.stats.unchanged += 1
                else:
                    self.stats.changed += 1
                self.stats.files += 1
                self._progress.update(1, 0)
                return replace(first, name=name)
        entry = self._file_entry(dfd, name, rel, st, old)
        if entry is not None:
            self.ledger.count_file(entry)
            if link is not None:
                self._links[link] = entry
        return entry

    def _file_entry(self, dfd: int, name: bytes, rel: bytes, st: os.stat_result,
                    old: Entry | None) -> Entry | None:
        # Never reuse a ref into a pack the store lost, nor fall back on it below.
        healed = False
        if old is not None and old.type == FILE and _unchanged(old, st):
            kept = self.ledger.lost(rel, old)
            healed = kept is None
            old = kept
        if old is not None and old.type == FILE and _unchanged(old, st):
            self.stats.unchanged += 1
            entry = old
            if (old.mode, old.uid, old.gid) != (st.st_mode & 0o7777, st.st_uid, st.st_gid):
                entry = replace(old, mode=st.st_mode & 0o7777, uid=st.st_uid, gid=st.st_gid)
            self._progress.update(1, entry.data_bytes)
            return entry
        if self.should_stop():
            # Stopping: keep what the last generation had instead of reading more.
            return self.ledger.keep_old(old)
        last_error = ""
        for _attempt in range(READ_ATTEMPTS):
            try:
                entry = self.files.store_file(dfd, name, rel, old)
            except SourceChanged as exc:
                last_error = str(exc)
                continue
            except FileNotFoundError:
                return self.ledger.vanished(rel)
            if healed:
                pass                    # counted as read again (stats.healed), not as new
            elif old is None and self.ledger.rereading(rel):
                self.stats.healed += 1  # its folder's listing was lost: read again, not new
            elif old is None or old.type != FILE:
                self.stats.new += 1
            else:
                self.stats.changed += 1
            return entry
        return self.ledger.skip(rel, last_error, old, counted=False)



_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_SPECIAL_TYPES = {stat.S_IFIFO: format.FIFO, stat.S_IFCHR: format.CHR, stat.S_IFBLK: format.BLK}


def _problem(exc: Exception) -> str:
    """What went wrong with one entry, for its warning."""
    if isinstance(exc, OSError):
        return os_reason(exc)
    if isinstance(exc, RecursionError):
        return "it is nested too deeply"
    return f"{type(exc).__name__}: {exc}"


def _same_inode_state(first: Entry, st: os.stat_result) -> bool:
    """True if a hard-linked inode is as it was when this run stored it under another name."""
    return (first.size == st.st_size and first.mtime_ns == st.st_mtime_ns
            and (first.ctime_ns == st.st_ctime_ns or first.ctime_ns == 0))


def _unchanged(old: Entry, st: os.stat_result) -> bool:
    return (old.ctime_ns != 0 and old.size == st.st_size and old.mtime_ns == st.st_mtime_ns
            and old.ctime_ns == st.st_ctime_ns and old.ino == st.st_ino)


_show = show
