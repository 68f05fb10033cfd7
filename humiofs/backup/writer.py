"""One backup run: walk the data directory, store what changed, commit a generation last.

Directories are processed depth first and each one's tree is stored after its children, so
memory holds one listing per level, and a file's data is streamed through a fixed buffer.
"""
from __future__ import annotations

import errno
import hashlib
import logging
import os
import socket
import stat
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from operator import itemgetter
from pathlib import Path
from typing import Any

from humiofs import failpoint
from humiofs.backup import checkpoint, identity, scan, xattrs
from humiofs.errors import (
    HumiofsError,
    Interrupted,
    NoSuchObject,
    SourceChanged,
    StoreError,
    os_reason,
    show,
)
from humiofs.progress import Progress
from humiofs.store import crypto, format, journal
from humiofs.store.format import DIR, FILE, SYMLINK, Entry, Generation, Ref, RootAttrs, Xattrs
from humiofs.store.repository import PackWriter, Store, list_packs, new_generation_name

log = logging.getLogger(__name__)

SMALL_FILE = 1 << 20
PACK_TARGET = 16 << 20
READ_ATTEMPTS = 3
# Packs are made durable (fsync, rename, fsync of the folder) on a background thread so the
# disk flushes one pack while the next is read and encrypted. At most this many wait.
MAX_PENDING_PACKS = 4
# A file whose ctime is this close to the moment it was read may have been modified again
# within the same timestamp tick (a jiffy, at most 10 ms) without its ctime moving; its ctime
# is stored as 0 so that the next run reads it again (git's "racy clean" problem).
RACY_NS = 100_000_000
# A file found empty, whose previous copy was not, and emptied less than this long ago is
# most likely being written anew (`cp` over it truncates first). Under load `cp` can pause
# longer than RACY_NS between the truncation and its first write, so the writer waits until
# the emptying is this old before it believes it (FORMAT.md 7.3).
EMPTIED_SETTLE_NS = 1_000_000_000


# A path relative to the source, as raw bytes, and a pack id (`bytes` is shadowed inside
# BackupStats).
RelPath = bytes
PackId = bytes


@dataclass
class BackupStats:
    """What a run did; the one-line summary and the generation's stats come from here."""

    new: int = 0
    changed: int = 0
    unchanged: int = 0
    skipped: int = 0
    dirs: int = 0
    symlinks: int = 0
    specials: int = 0
    files: int = 0
    bytes: int = 0
    data_bytes: int = 0
    bytes_read: int = 0
    bytes_stored: int = 0
    trees_stored: int = 0
    live: int = 0           # files being written: read twice, stored as they were when opened
    healed: int = 0         # unchanged files and folders read again: their stored copy was lost
    vanished: int = 0       # entries deleted or renamed on the node while the run read them
    lost_packs: set[PackId] = field(default_factory=set)   # the missing packs they were in
    healed_paths: list[RelPath] = field(default_factory=list)   # the files of `healed`
    # Files of the parent generation, deleted from the node since, whose only stored copy is
    # in a pack the store lost: earlier generations cannot restore them.
    lost_deleted: list[RelPath] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    skipped_paths: list[RelPath] = field(default_factory=list)

    def generation_stats(self) -> dict[str, int]:
        return {"files": self.files, "dirs": self.dirs, "symlinks": self.symlinks,
                "specials": self.specials, "bytes": self.bytes, "data_bytes": self.data_bytes}


# Counts of what a tree holds, all levels below it: files, dirs, symlinks, specials, bytes,
# data bytes. A tree's encoding is deterministic, so a tree ref always has the same counts.
TreeCounts = tuple[int, int, int, int, int, int]


@dataclass
class BackupOptions:
    source: Path
    backup_name: str
    excludes: tuple[str, ...] = scan.DEFAULT_EXCLUDES
    host_id: str | None = None
    progress: bool | None = None
    # Continuous backup (watch.py): `clean(rel)` promises that the directory `rel` (relative to
    # the source, b"" for the source itself) and everything below it are unchanged since the
    # parent generation. Such a directory keeps its previous tree without being listed, if its
    # inode and mtime still match and `tree_counts` knows the counts of that tree.
    clean: Callable[[bytes], bool] | None = None
    tree_counts: dict[Ref, TreeCounts] | None = None
    # Checkpoints (FORMAT.md 7.4): with `checkpoints`, one is committed every
    # `checkpoint_s` seconds or `checkpoint_bytes` stored (0: not on that trigger), and on
    # SIGTERM/SIGINT, after which the run stops (Interrupted).
    checkpoints: bool = False
    checkpoint_s: int = 0
    checkpoint_bytes: int = 0
    # With checkpoints: when `should_stop` turns true, commit a checkpoint and stop
    # (Interrupted) instead of finishing with the previous generation's entries.
    checkpoint_on_stop: bool = False


class Backup:
    """A single backup run into an opened store; the caller holds the store lock."""

    def __init__(self, store: Store, options: BackupOptions,
                 should_stop: Callable[[], bool] = lambda: False) -> None:
        self.store = store
        self.opt = options
        self.should_stop = should_stop
        self.stats = BackupStats()
        self.excluder = scan.Excluder(options.excludes)
        self._small: PackWriter | None = None
        self._trees: PackWriter | None = None
        self._progress = Progress(enabled=options.progress)
        self._store_ino: tuple[int, int] | None = None
        self._finisher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pack-finish")
        self._pending: list[Future[None]] = []
        # Every pack made durable is listed here first, so that if the run fails or dies
        # before its generation is committed, its packs are removed (discard, or the next
        # writer's store.clean_tmp) and never stay behind taking space.
        self._journal = journal.RunJournal(store)
        # Counts of every tree this run stored or reused, for the next run's `tree_counts`.
        self.tree_counts_seen: dict[Ref, TreeCounts] = {}
        # (st_dev, st_ino) -> the entry stored for the first name of a hard-linked file.
        self._links: dict[tuple[int, int], Entry] = {}
        # Paths of the files with more than one name that this run saw (for watch.py).
        self.linked_files: list[bytes] = []
        # The packs in the store (id -> size), listed when a ref is first reused: a ref into a
        # pack that is gone (or too short for it) is never carried into the new generation.
        self._present: dict[bytes, int] | None = None
        self._reread_dirs: list[bytes] = []     # folders whose stored listing was unreadable
        # Every pack the generation refers to through a folder this run walked (backup --watch
        # keeps the union of these, for the folders it reuses without walking them).
        self.packs_used: set[bytes] = set()
        self._policy = (checkpoint.Policy(options.checkpoint_s, options.checkpoint_bytes,
                                          stop=should_stop if options.checkpoint_on_stop
                                          else None)
                        if options.checkpoints else None)
        self._levels: list[checkpoint.Level] = []      # the folders the walk is inside of
        self._parent: Generation | None = None
        self._root: tuple[os.stat_result, Xattrs] | None = None
        self._last_ms = 0
        # Checkpoints a generation of this run supersedes: its own, and its parent if that
        # is one. Deleted once a newer generation of the run is committed.
        self._superseded: list[str] = []
        self.checkpoints = 0
        self._ident: tuple[identity.Identity | None] | None = None

    # -- the run -----------------------------------------------------------------------------

    def run(self, parent: Generation | None) -> Generation:
        """Stores the current state of the source and commits it as a new generation. With
        checkpoints, SIGTERM/SIGINT commit a checkpoint, then raise Interrupted (exit 130)."""
        if self._policy is None:
            gen = self.build(parent)
        else:
            with checkpoint.stop_requests(self._policy):
                gen = self.build(parent)
        self.commit(gen)
        return gen

    def build(self, parent: Generation | None) -> Generation:
        """Stores what changed since `parent` and returns the new generation, not committed.

        Every pack it refers to is durable; the caller commits it with `commit` (or drops it
        with `discard`, if it equals the parent). If it raises, what the run stored is gone.
        """
        src = self.opt.source
        try:
            root_fd = os.open(src, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except NotADirectoryError:
            raise StoreError(f"DIRECTORY {src} is not a directory", 2) from None
        except OSError as exc:
            raise StoreError(f"cannot read DIRECTORY {src}: {exc.strerror}", 2) from None
        try:
            gen = self._build(parent, root_fd)
            self._report_lost()
            return gen
        except BaseException:
            self._discard_after_failure()
            raise
        finally:
            os.close(root_fd)

    def commit(self, gen: Generation) -> None:
        """Writes `gen`, built by this run, as the store's newest generation."""
        try:
            self._journal.committing(gen.name)
            failpoint.reached("committing")
            self.store.commit_generation(gen)
        except BaseException:
            # Keeps the packs if the generation reached the store after all.
            self._discard_after_failure()
            raise
        self._journal.close(committed=True)
        checkpoint.remove_superseded(self.store, self._superseded)
        self._superseded = []

    def discard(self) -> None:
        """Removes every pack this run stored (none is referenced unless its generation was
        committed) and its temporary files; for a run that failed or changed nothing."""
        self._journal.close(committed=False)
        self.store.clean_tmp()

    def _discard_after_failure(self) -> None:
        """discard(), for a run that is failing: the run's own error is the one to report."""
        try:
            self.discard()
        except Exception as exc:
            log.warning("could not remove what this run stored (%s); the next backup does", exc)

    def _build(self, parent: Generation | None, root_fd: int) -> Generation:
        src = self.opt.source
        root_st = os.fstat(root_fd)
        self._parent = parent
        if parent is not None:
            self._last_ms = parent.time_ms
            if parent.checkpoint:
                self._superseded = checkpoint.chain(self.store, parent.name)
        try:
            # Not store access: the store's folder, left out of a backup of a node it is in.
            if self.store.backend.local_path is not None:
                st = os.stat(self.store.backend.local_path)
                self._store_ino = (st.st_dev, st.st_ino)
        except OSError:
            pass
        if self._progress.enabled:
            self._progress.total_bytes = _estimate_bytes(parent, src)
        prev_root = parent.root.tree if parent else None
        root_ref = None
        if parent is not None and parent.root.mtime_ns == root_st.st_mtime_ns:
            root_ref = self._reuse(b"", prev_root)
        try:
            root_xattrs = xattrs.read(root_fd)
        except OSError as exc:
            root_xattrs = parent.root.xattrs if parent is not None else ()
            self._warn(f"the extended attributes of {src} cannot be read ({exc.strerror}); "
                       "keeping the previous ones")
            self.stats.skipped += 1
        self._root = (root_st, root_xattrs)
        try:
            if root_ref is None:
                with scan.deep_walk():
                    root_ref, _ = self._dir(root_fd, b"", prev_root)
            self._finish_packs()
        except BaseException:
            self._abort_packs()
            raise
        finally:
            self._progress.close()
            self._finisher.shutdown(wait=True)
        # The identity comes from files in the source's own folder: unchanged if it was reused.
        ident = (parent.identity if parent is not None and root_ref == prev_root
                 and self.opt.clean is not None and self.opt.clean(b"")
                 else self._identity())
        return self._generation(root_ref, ident, partial=False)

    def _identity(self) -> identity.Identity | None:
        """The node's identity, read once per run (a node keeps it; warnings once)."""
        if self._ident is None:
            self._ident = (identity.detect(self.opt.source, self.opt.host_id),)
        return self._ident[0]

    def _generation(self, root_ref: Ref, ident: identity.Identity | None,
                    partial: bool) -> Generation:
        """A generation of this run (a checkpoint if `partial`) named after every earlier one
        (its parent's and its checkpoints' names sort before it)."""
        assert self._root is not None
        root_st, root_xattrs = self._root
        now_ms = max(int(time.time() * 1000), self._last_ms + 1)
        if now_ms >= format.LAST_GENERATION_MS:
            # Its name would need a 14th digit, and no reader would see it (FORMAT.md 2).
            raise StoreError(f"the time to commit this generation, {now_ms} ms after 1970, is "
                             "past 2286-11-20, the last a generation name can hold; check "
                             "the system clock", 2)
        self._last_ms = now_ms
        parent = self._parent
        base = None if parent is None else parent.base if parent.checkpoint else parent.name
        return Generation(
            name=new_generation_name(now_ms), time_ms=now_ms,
            backup_name=self.opt.backup_name, host=socket.gethostname(),
            directory=str(self.opt.source),
            root=RootAttrs(root_st.st_mode & 0o7777, root_st.st_uid, root_st.st_gid,
                           root_st.st_mtime_ns, root_ref, root_xattrs),
            identity=ident,
            stats=self.stats.generation_stats(), checkpoint=partial,
            base=base if partial else None)

    def _checkpoint(self) -> None:
        """Commits a checkpoint of what the run has finished (FORMAT.md 7.4): the partial
        trees of the folders it is inside of go into a tree pack, every pack is made durable,
        the checkpoint is written, and a new journal is started for the packs that follow."""
        assert self._policy is not None

        def store_tree(entries: list[Entry]) -> Ref:
            try:
                plain = format.encode_tree(entries)
            except (ValueError, OverflowError):
                # An entry the format cannot hold is left out (the folder's own tree, once
                # finished, names it in a warning).
                plain = format.encode_tree([e for e in entries if _encodable(e)])
            ref = self._tree_pack().add(crypto.KIND_TREE, plain)
            self.stats.bytes_stored += ref.stored_len
            return ref

        def dir_entry(name: bytes, st: os.stat_result, sub: Ref, nlink: int,
                      attrs: Xattrs) -> Entry:
            return _entry(name, st, DIR, subtree=sub, nlink=nlink, xattrs=attrs)

        root_ref = checkpoint.partial_root(self._levels, store_tree, dir_entry)
        self._finish_packs()
        gen = self._generation(root_ref, self._identity(), partial=True)
        self._journal.committing(gen.name)
        failpoint.reached("committing")
        self.store.commit_generation(gen)
        self._journal.close(committed=True)
        failpoint.reached("checkpoint")
        self._journal = journal.RunJournal(self.store)
        checkpoint.remove_superseded(self.store, self._superseded)
        self._superseded = [gen.name]
        self.checkpoints += 1
        self._policy.done(self.stats.bytes_stored)
        log.info("checkpoint %s committed: %d files so far", gen.name, self.stats.files)
        if self._policy.requested:
            raise Interrupted(f"interrupted; checkpoint {gen.name} committed: the next backup "
                              "resumes from it")

    # -- packs --------------------------------------------------------------------------------

    def _tree_pack(self) -> PackWriter:
        if self._trees is None:
            self._trees = self.store.new_pack()
        return self._trees

    def _small_pack(self) -> PackWriter:
        if self._small is None:
            self._small = self.store.new_pack()
        return self._small

    def _finish_later(self, pack: PackWriter) -> None:
        """Queues `pack` to be made durable; raises the error of any finished one that failed."""
        self._pending.append(self._finisher.submit(self._make_durable, pack))
        while len(self._pending) > MAX_PENDING_PACKS or (self._pending and self._pending[0].done()):
            self._pending.pop(0).result()

    def _rotate(self) -> None:
        for attr in ("_small", "_trees"):
            pack = getattr(self, attr)
            if pack is not None and pack.size >= PACK_TARGET:
                self._finish_later(pack)
                setattr(self, attr, None)

    def _finish_packs(self) -> None:
        """Makes every pack durable. Only after this may the generation be written: it must
        never reach the disk before the data and trees it refers to."""
        for attr in ("_small", "_trees"):
            pack = getattr(self, attr)
            if pack is not None:
                self._finish_later(pack)
                setattr(self, attr, None)
        while self._pending:
            self._pending.pop(0).result()

    def _make_durable(self, pack: PackWriter) -> None:
        try:
            self._journal.add(pack.pack_id)     # listed before it can appear under packs/
        except BaseException:
            pack.abort()
            raise
        pack.finish()
        failpoint.reached("pack")

    def _abort_packs(self) -> None:
        # An interrupt (SIGINT/SIGTERM arrive as KeyboardInterrupt anywhere) can land between
        # a pack's temporary file being created and its writer being recorded here; discard()
        # then empties tmp/ (the run holds the writer lock, so all of it is this run's).
        for attr in ("_small", "_trees"):
            pack = getattr(self, attr)
            if pack is not None:
                pack.abort()
                setattr(self, attr, None)
        for fut in self._pending:
            fut.exception()
        self._pending.clear()

    # -- directories --------------------------------------------------------------------------

    def _previous_tree(self, ref: Ref | None, rel: bytes) -> tuple[bytes | None, dict[bytes, Entry]]:
        if ref is None:
            return None, {}
        try:
            plain = self.store.read_blob(ref, crypto.KIND_TREE)
            return plain, {e.name: e for e in format.decode_tree(plain)}
        except StoreError as exc:
            # Its files are counted as read again (not as new) as they come: see _file_entry.
            self._reread_dirs.append(rel)
            if isinstance(exc, NoSuchObject):
                self.stats.lost_packs.add(ref.pack)
            self._warn(f"previous backup of {_show(rel)}/ is unreadable ({exc}); reading it anew "
                       "(the backup needs about its size of free space on the backup disk)")
            return None, {}

    def _rereading(self, rel: bytes) -> bool:
        """True if `rel` is below a folder whose stored listing could not be read."""
        return any(not d or rel.startswith(d + b"/") for d in self._reread_dirs)

    def _stored(self, ref: Ref) -> bool:
        """True if the pack of `ref` is in the store and long enough to hold the blob."""
        if self._present is None:
            self._present = {pid: item.size for pid, item in list_packs(self.store).items()}
        size = self._present.get(ref.pack)
        return size is not None and ref.offset + ref.stored_len <= size

    def _lost(self, rel: bytes, old: Entry | None) -> Entry | None:
        """`old`, unless its data is in a pack the store lost: then None, with a warning that
        the file is read again from the source (which stores it anew, healing the store)."""
        if old is None or old.type != FILE or old.data is None or self._stored(old.data):
            return old
        self.stats.healed += 1
        self.stats.lost_packs.add(old.data.pack)
        self.stats.healed_paths.append(rel)
        return None

    def _gone(self, rel: bytes, gone: Entry) -> None:
        """Notes the files of `gone`, deleted from the node since the parent generation (a
        folder: everything below it), whose only stored copy is in a pack the store lost."""
        if gone.type == FILE and gone.data is not None and not self._stored(gone.data):
            self.stats.lost_deleted.append(rel)
            self.stats.lost_packs.add(gone.data.pack)
        elif gone.type == DIR and gone.subtree is not None:
            try:
                entries = self.store.read_tree(gone.subtree)
            except StoreError:
                return          # check reports a folder listing that cannot be read
            for e in entries:
                self._gone(rel + b"/" + e.name, e)

    def _report_lost(self) -> None:
        """One warning for the files read again after a lost pack, one for deleted files
        whose only copy was in one (a warning per file would bury everything else)."""
        s = self.stats
        packs = ", ".join(sorted(p.hex() for p in s.lost_packs)[:3]) + (
            ", ..." if len(s.lost_packs) > 3 else "")
        if s.healed_paths:
            self._warn(f"{len(s.healed_paths)} file(s) read again from the node: their stored "
                       f"copy is in a pack missing from the store or cut short ({packs}): "
                       + _some(s.healed_paths))
        if s.lost_deleted:
            self._warn(f"the store lost the only copy of {len(s.lost_deleted)} file(s) deleted "
                       f"from the node since the last backup ({packs}): the earlier generations "
                       "that hold them cannot restore them (humiofs check names them): "
                       + _some(s.lost_deleted))

    def _counts(self) -> TreeCounts:
        s = self.stats
        return (s.files, s.dirs, s.symlinks, s.specials, s.bytes, s.data_bytes)

    def _reuse(self, rel: bytes, prev_ref: Ref | None) -> Ref | None:
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

    def _dir(self, dfd: int, rel: bytes, prev_ref: Ref | None) -> tuple[Ref, int]:
        """Stores the folder open as `dfd` (and everything below it) unless its tree is
        unchanged; returns its tree's ref and the number of subfolders it holds."""
        before = self._counts()
        ref, subdirs = self._walk_dir(dfd, rel, prev_ref)
        a, b = self._counts(), before
        self.tree_counts_seen[ref] = (a[0] - b[0], a[1] - b[1], a[2] - b[2], a[3] - b[3],
                                      a[4] - b[4], a[5] - b[5])
        return ref, subdirs

    def _walk_dir(self, dfd: int, rel: bytes, prev_ref: Ref | None) -> tuple[Ref, int]:
        prev_plain, prev = self._previous_tree(prev_ref, rel)
        # Entries from a version 1 tree have no xattrs or link counts yet: read those anew.
        meta_stale = prev_plain is not None and prev_plain[2] == 1
        with os.scandir(dfd) as it:
            items = sorted(((os.fsencode(de.name), de) for de in it), key=itemgetter(0))
        entries: list[Entry] = []
        level = checkpoint.Level(rel, entries, prev)
        self._levels.append(level)
        try:
            return self._walk_entries(dfd, rel, prev_ref, prev_plain, prev, meta_stale, items,
                                      level)
        finally:
            self._levels.pop()

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
                entry = self._skip(child_rel, _problem(exc), old)
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
                    self._gone(rel + b"/" + name if rel else name, gone)
        if same and len(entries) == len(prev) and prev_ref is not None:
            used.add(prev_ref.pack)
            return prev_ref, subdirs
        plain = self._encode(entries, rel, prev)
        if plain == prev_plain and prev_ref is not None:
            used.add(prev_ref.pack)
            return prev_ref, subdirs
        ref = self._tree_pack().add(crypto.KIND_TREE, plain)
        used.add(ref.pack)
        self.stats.trees_stored += 1
        self.stats.bytes_stored += ref.stored_len
        self._rotate()
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
                old = self._skip(child_rel, f"cannot be stored: {exc}", prev.get(e.name))
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
            return self._vanished(rel)
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
            self._warn(f"{_show(rel)}: a socket cannot be backed up (the program that listens on "
                       "it makes it anew); skipped. Exclude it with BACKUP_EXCLUDE to silence this")
            return None
        etype = _SPECIAL_TYPES.get(stat.S_IFMT(mode))
        if etype is None:
            raise OSError(errno.EINVAL, f"unknown file type {stat.S_IFMT(mode):o}")
        return self._special(dfd, name, rel, st, etype, old)

    def _subdir(self, dfd: int, name: bytes, rel: bytes, st: os.stat_result,
                old: Entry | None) -> Entry | None:
        if self._store_ino == (st.st_dev, st.st_ino):
            log.info("skipping %s: it is the backup store itself", _show(rel))
            return None
        prev = old.subtree if old is not None and old.type == DIR else None
        if (old is not None and old.ino == st.st_ino and old.mtime_ns == st.st_mtime_ns
                and (reused := self._reuse(rel, prev)) is not None):
            self.stats.dirs += 1
            return _entry(name, st, DIR, subtree=reused, nlink=old.nlink,
                          xattrs=self._xattrs(old, st, xattrs.at(dfd, name), rel))
        try:
            fd = os.open(name, _DIR_FLAGS, dir_fd=dfd)
        except FileNotFoundError:
            return self._vanished(rel)
        level = self._levels[-1]
        try:
            st = os.fstat(fd)
            attrs = self._xattrs(old, st, fd, rel)
            level.sub = (st, attrs, old)
            sub, subdirs = self._dir(fd, rel, prev)
        except FileNotFoundError:
            return self._vanished(rel)
        finally:
            level.sub = None
            os.close(fd)
        self.stats.dirs += 1
        return _entry(name, st, DIR, subtree=sub, nlink=2 + subdirs, xattrs=attrs)

    def _symlink(self, dfd: int, name: bytes, rel: bytes, st: os.stat_result,
                 old: Entry | None) -> Entry | None:
        try:
            target = os.readlink(name, dir_fd=dfd)
        except FileNotFoundError:
            return self._vanished(rel)
        self.stats.symlinks += 1
        return _entry(name, st, SYMLINK, target=target,
                      xattrs=self._xattrs(old, st, xattrs.at(dfd, name), rel))

    def _special(self, dfd: int, name: bytes, rel: bytes, st: os.stat_result, etype: int,
                 old: Entry | None) -> Entry:
        """A FIFO or a device node: its attributes and device number; nothing is opened."""
        self.stats.specials += 1
        rdev = (os.major(st.st_rdev), os.minor(st.st_rdev)) if etype != format.FIFO else (0, 0)
        return _entry(name, st, etype, rdev=rdev, nlink=st.st_nlink,
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
            self._warn(f"{_show(rel)}: its extended attributes cannot be read "
                       f"({os_reason(exc)}); stored without them")
            return ()

    # -- files ----------------------------------------------------------------------------------

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
            self._count_file(entry)
            if link is not None:
                self._links[link] = entry
        return entry

    def _file_entry(self, dfd: int, name: bytes, rel: bytes, st: os.stat_result,
                    old: Entry | None) -> Entry | None:
        # Never reuse a ref into a pack the store lost, nor fall back on it below.
        healed = False
        if old is not None and old.type == FILE and _unchanged(old, st):
            kept = self._lost(rel, old)
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
            return self._keep_old(old)
        last_error = ""
        for _attempt in range(READ_ATTEMPTS):
            try:
                entry = self._store_file(dfd, name, rel, old)
            except SourceChanged as exc:
                last_error = str(exc)
                continue
            except FileNotFoundError:
                return self._vanished(rel)
            if healed:
                pass                    # counted as read again (stats.healed), not as new
            elif old is None and self._reread_dirs and self._rereading(rel):
                self.stats.healed += 1  # its folder's listing was lost: read again, not new
            elif old is None or old.type != FILE:
                self.stats.new += 1
            else:
                self.stats.changed += 1
            return entry
        return self._skip(rel, last_error, old, counted=False)

    def _store_file(self, dfd: int, name: bytes, rel: bytes, old: Entry | None) -> Entry:
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
                ref = self._small_pack().add(crypto.KIND_DATA, data)
                self._rotate()
            else:
                ref, after = self._store_large(fd, st, extents, data_len, racy, old)
        finally:
            os.close(fd)
        self.stats.bytes_read += data_len
        if ref is not None:
            self.stats.bytes_stored += ref.stored_len
        self._progress.update(1, 0 if data_len >= SMALL_FILE else data_len)
        entry = _entry(name, st, FILE, data=ref, extents=tuple(extents), nlink=st.st_nlink,
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
        self._finish_later(pack)
        return ref, after

    # -- bookkeeping ----------------------------------------------------------------------------

    def _count_file(self, entry: Entry) -> None:
        self.stats.files += 1
        self.stats.bytes += entry.size
        self.stats.data_bytes += entry.data_bytes

    def _keep_old(self, old: Entry | None) -> Entry | None:
        if old is None:
            return None
        if old.type == DIR:
            self.stats.dirs += 1
        elif old.type == SYMLINK:
            self.stats.symlinks += 1
        elif old.type != FILE:
            self.stats.specials += 1
        return old

    def _skip(self, rel: bytes, why: str, old: Entry | None, counted: bool = True
              ) -> Entry | None:
        """Counts and reports an entry that could not be read; returns what the previous
        generation had for it (kept as it was), or None. A kept file is counted into the
        stats here unless `counted` is False (the caller counts it)."""
        self.stats.skipped += 1
        self.stats.skipped_paths.append(rel)
        if old is not None and old.type == FILE and old.data is not None \
                and not self._stored(old.data):
            self.stats.lost_packs.add(old.data.pack)
            self._warn(f"{_show(rel)}: {why}; its previous copy is in pack "
                       f"{old.data.pack.hex()}, which is missing from the store: not in this "
                       "generation")
            return None
        if old is None:
            self._warn(f"{_show(rel)}: {why}; not in this generation")
            return None
        self._warn(f"{_show(rel)}: {why}; keeping the copy from the previous generation")
        kept = self._keep_old(old)
        if kept is not None and kept.type == FILE and counted:
            self._count_file(kept)
        return kept

    def _vanished(self, rel: bytes) -> Entry | None:
        """An entry deleted or renamed on the node between the listing of its folder and its
        read: not in this generation, with a warning (under its new name, if it was renamed,
        it may be missing from this generation too: the next run stores it)."""
        self.stats.vanished += 1
        self.stats.skipped_paths.append(rel)
        self._warn(f"{_show(rel)}: vanished while the backup read it (deleted or renamed on "
                   "the node); not in this generation. The next run stores it if it is still "
                   "there")
        return None

    def _warn(self, message: str) -> None:
        self.stats.warnings.append(message)
        log.warning("%s", message)


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_SPECIAL_TYPES = {stat.S_IFIFO: format.FIFO, stat.S_IFCHR: format.CHR, stat.S_IFBLK: format.BLK}


def _problem(exc: Exception) -> str:
    """What went wrong with one entry, for its warning."""
    if isinstance(exc, OSError):
        return os_reason(exc)
    if isinstance(exc, RecursionError):
        return "it is nested too deeply"
    return f"{type(exc).__name__}: {exc}"


def _some(paths: list[RelPath], shown: int = 5) -> str:
    """The first few of `paths`, for a one-line message."""
    out = ", ".join(_show(p) for p in paths[:shown])
    return out + (f" and {len(paths) - shown} more" if len(paths) > shown else "")


def _encodable(entry: Entry) -> bool:
    try:
        format.encode_tree([entry])
    except (ValueError, OverflowError):
        return False
    return True


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


def _same_inode_state(first: Entry, st: os.stat_result) -> bool:
    """True if a hard-linked inode is as it was when this run stored it under another name."""
    return (first.size == st.st_size and first.mtime_ns == st.st_mtime_ns
            and (first.ctime_ns == st.st_ctime_ns or first.ctime_ns == 0))


def _unchanged(old: Entry, st: os.stat_result) -> bool:
    return (old.ctime_ns != 0 and old.size == st.st_size and old.mtime_ns == st.st_mtime_ns
            and old.ctime_ns == st.st_ctime_ns and old.ino == st.st_ino)


def _entry(name: bytes, st: os.stat_result, etype: int, **kw: Any) -> Entry:
    # A symlink's size is its stored target's length (FORMAT.md 7.1), not st_size, which is
    # another link's if it was replaced between the lstat and the readlink.
    size = st.st_size if etype == FILE else len(kw["target"]) if etype == SYMLINK else 0
    return Entry(name, etype, st.st_mode & 0o7777, st.st_uid, st.st_gid,
                 st.st_mtime_ns, st.st_ctime_ns, st.st_ino, size, **kw)


def _estimate_bytes(parent: Generation | None, src: Path) -> int:
    """Bytes of data the run will go through, for the ETA: the last generation's figure, or
    on a first run a quick walk summing allocated sizes."""
    if parent is not None:
        return parent.stats.get("data_bytes", 0)
    total = 0
    for dirpath, _, filenames in os.walk(src):
        for name in filenames:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                total += min(st.st_size, st.st_blocks * 512)
    return total


_show = show
