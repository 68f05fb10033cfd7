"""One backup run: walk the data directory, store what changed, commit a generation last.

Directories are processed depth first and each one's tree is stored after its children, so
memory holds one listing per level, and a file's data is streamed through a fixed buffer.
"""
from __future__ import annotations

import logging
import os
from concurrent.futures import Future, ThreadPoolExecutor
import socket
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from humiofs import crypto, format, identity, scan
from humiofs.errors import SourceChanged, StoreError
from humiofs.format import DIR, FILE, SYMLINK, Entry, Generation, Ref, RootAttrs
from humiofs.progress import Progress
from humiofs.store import PackWriter, Store, new_generation_name

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


# A path relative to the source, as raw bytes (`bytes` is shadowed inside BackupStats).
RelPath = bytes


@dataclass
class BackupStats:
    """What a run did; the one-line summary and the generation's stats come from here."""

    new: int = 0
    changed: int = 0
    unchanged: int = 0
    skipped: int = 0
    dirs: int = 0
    symlinks: int = 0
    files: int = 0
    bytes: int = 0
    data_bytes: int = 0
    bytes_read: int = 0
    bytes_stored: int = 0
    trees_stored: int = 0
    warnings: list[str] = field(default_factory=list)
    skipped_paths: list[RelPath] = field(default_factory=list)

    def generation_stats(self) -> dict[str, int]:
        return {"files": self.files, "dirs": self.dirs, "symlinks": self.symlinks,
                "bytes": self.bytes, "data_bytes": self.data_bytes}


# Counts of what a tree holds, all levels below it: files, dirs, symlinks, bytes, data bytes.
# A tree's encoding is deterministic, so a tree ref always has the same counts.
TreeCounts = tuple[int, int, int, int, int]


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
        # Counts of every tree this run stored or reused, for the next run's `tree_counts`.
        self.tree_counts_seen: dict[Ref, TreeCounts] = {}

    # -- the run -----------------------------------------------------------------------------

    def run(self, parent: Generation | None) -> Generation:
        """Stores the current state of the source and commits it as a new generation."""
        gen = self.build(parent)
        self.store.commit_generation(gen)
        return gen

    def build(self, parent: Generation | None) -> Generation:
        """Stores what changed since `parent` and returns the new generation, not committed.

        Every pack it refers to is durable; the caller commits it with
        `store.commit_generation` (or drops it, if it equals the parent).
        """
        src = self.opt.source
        try:
            root_st = os.stat(src)
        except OSError as exc:
            raise StoreError(f"cannot read DIRECTORY {src}: {exc.strerror}", 2) from None
        if not stat.S_ISDIR(root_st.st_mode):
            raise StoreError(f"DIRECTORY {src} is not a directory", 2)
        try:
            st = os.stat(self.store.path)
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
            if root_ref is None:
                root_ref = self._dir(os.fsencode(src), b"", prev_root)
            self._finish_packs()
        except BaseException:
            self._abort_packs()
            raise
        finally:
            self._progress.close()
            self._finisher.shutdown(wait=True)
        now_ms = int(time.time() * 1000)
        if parent is not None and now_ms <= parent.time_ms:
            now_ms = parent.time_ms + 1
        # The identity comes from files in the source's own folder: unchanged if it was reused.
        ident = (parent.identity if parent is not None and root_ref == prev_root
                 and self.opt.clean is not None and self.opt.clean(b"")
                 else identity.detect(src, self.opt.host_id))
        return Generation(
            name=new_generation_name(now_ms), time_ms=now_ms,
            backup_name=self.opt.backup_name, host=socket.gethostname(),
            directory=str(src),
            root=RootAttrs(root_st.st_mode & 0o7777, root_st.st_uid, root_st.st_gid,
                           root_st.st_mtime_ns, root_ref),
            identity=ident,
            stats=self.stats.generation_stats())

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
        self._pending.append(self._finisher.submit(pack.finish))
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

    def _abort_packs(self) -> None:
        for attr in ("_small", "_trees"):
            pack = getattr(self, attr)
            if pack is not None:
                pack.abort()
                setattr(self, attr, None)
        for fut in self._pending:
            fut.exception()
        self._pending.clear()
        # An interrupt (SIGINT/SIGTERM arrive as KeyboardInterrupt anywhere) can land between
        # a pack's temporary file being created and its writer being recorded above. The run
        # holds the writer lock, so whatever is left in tmp/ is this run's: remove it.
        self.store.clean_tmp()

    # -- directories --------------------------------------------------------------------------

    def _previous_tree(self, ref: Ref | None, rel: bytes) -> tuple[bytes | None, dict[bytes, Entry]]:
        if ref is None:
            return None, {}
        try:
            plain = self.store.read_blob(ref, crypto.KIND_TREE)
            return plain, {e.name: e for e in format.decode_tree(plain)}
        except StoreError as exc:
            self._warn(f"previous backup of {_show(rel)}/ is unreadable ({exc}); reading it anew")
            return None, {}

    def _counts(self) -> TreeCounts:
        s = self.stats
        return (s.files, s.dirs, s.symlinks, s.bytes, s.data_bytes)

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
        s.bytes += counts[3]
        s.data_bytes += counts[4]
        s.unchanged += counts[0]
        self._progress.update(counts[0], counts[4])
        self.tree_counts_seen[prev_ref] = counts
        return prev_ref

    def _dir(self, path: bytes, rel: bytes, prev_ref: Ref | None) -> Ref:
        before = self._counts()
        ref = self._walk_dir(path, rel, prev_ref)
        after = self._counts()
        self.tree_counts_seen[ref] = (after[0] - before[0], after[1] - before[1],
                                      after[2] - before[2], after[3] - before[3],
                                      after[4] - before[4])
        return ref

    def _walk_dir(self, path: bytes, rel: bytes, prev_ref: Ref | None) -> Ref:
        prev_plain, prev = self._previous_tree(prev_ref, rel)
        with os.scandir(path) as it:
            items = sorted(it, key=lambda d: d.name)
        entries: list[Entry] = []
        for de in items:
            name = de.name
            child_rel = rel + b"/" + name if rel else name
            if self.excluder.excluded(child_rel, name):
                continue
            try:
                st = de.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            except OSError as exc:
                kept = self._skip(child_rel, exc.strerror or str(exc), prev.get(name))
                if kept is not None:
                    entries.append(kept)
                continue
            old = prev.get(name)
            if stat.S_ISDIR(st.st_mode):
                entry = self._subdir(de.path, child_rel, st, old)
            elif stat.S_ISREG(st.st_mode):
                entry = self._file(de.path, child_rel, st, old)
            elif stat.S_ISLNK(st.st_mode):
                entry = self._symlink(de.path, child_rel, st, old)
            else:
                log.info("skipping %s: not a file, folder or symlink", _show(child_rel))
                continue
            if entry is not None:
                entries.append(entry)
        plain = format.encode_tree(entries)
        if plain == prev_plain and prev_ref is not None:
            return prev_ref
        ref = self._tree_pack().add(crypto.KIND_TREE, plain)
        self.stats.trees_stored += 1
        self.stats.bytes_stored += ref.stored_len
        self._rotate()
        return ref

    def _subdir(self, path: bytes, rel: bytes, st: os.stat_result, old: Entry | None) -> Entry | None:
        if self._store_ino == (st.st_dev, st.st_ino):
            log.info("skipping %s: it is the backup store itself", _show(rel))
            return None
        prev = old.subtree if old is not None and old.type == DIR else None
        if (old is not None and old.ino == st.st_ino and old.mtime_ns == st.st_mtime_ns
                and (reused := self._reuse(rel, prev)) is not None):
            self.stats.dirs += 1
            return _entry(path, st, DIR, subtree=reused)
        try:
            sub = self._dir(path, rel, prev)
        except FileNotFoundError:
            return None
        except OSError as exc:
            return self._skip(rel, exc.strerror or str(exc), old)
        self.stats.dirs += 1
        return _entry(path, st, DIR, subtree=sub)

    def _symlink(self, path: bytes, rel: bytes, st: os.stat_result, old: Entry | None) -> Entry | None:
        try:
            target = os.readlink(path)
        except FileNotFoundError:
            return None
        except OSError as exc:
            return self._skip(rel, exc.strerror or str(exc), old)
        self.stats.symlinks += 1
        return _entry(path, st, SYMLINK, target=target)

    # -- files ----------------------------------------------------------------------------------

    def _file(self, path: bytes, rel: bytes, st: os.stat_result, old: Entry | None) -> Entry | None:
        if old is not None and old.type == FILE and _unchanged(old, st):
            self.stats.unchanged += 1
            entry = old
            if (old.mode, old.uid, old.gid) != (st.st_mode & 0o7777, st.st_uid, st.st_gid):
                entry = _entry(path, st, FILE, data=old.data, extents=old.extents)
            self._count_file(entry)
            self._progress.update(1, entry.data_bytes)
            return entry
        if self.should_stop():
            # Stopping: keep what the last generation had instead of reading more.
            return self._keep_old(old)
        last_error = ""
        for attempt in range(READ_ATTEMPTS):
            try:
                entry = self._store_file(path, rel, last_try=attempt == READ_ATTEMPTS - 1)
            except SourceChanged as exc:
                last_error = str(exc)
                continue
            except FileNotFoundError:
                return None
            except OSError as exc:
                last_error = exc.strerror or str(exc)
                break
            if old is None or old.type != FILE:
                self.stats.new += 1
            else:
                self.stats.changed += 1
            self._count_file(entry)
            return entry
        return self._skip(rel, last_error, old)

    def _store_file(self, path: bytes, rel: bytes, last_try: bool) -> Entry:
        read_ns = time.time_ns()
        fd = _open_source(path)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise SourceChanged("it is no longer a regular file")
            if st.st_ctime_ns >= read_ns - RACY_NS and not last_try:
                # Changed within a timestamp tick of this read: a write during the read might
                # not move ctime, so the before/after comparison could miss a torn read. Wait
                # the tick out and read again.
                time.sleep(max(0, st.st_ctime_ns + RACY_NS - time.time_ns()) / 1e9)
                raise SourceChanged("it was being changed")
            extents = scan.data_extents(fd, st.st_size)
            data_len = sum(length for _, length in extents)
            ref: Ref | None = None
            if data_len == 0:
                _check_same(fd, st)
            elif data_len < SMALL_FILE:
                data = b"".join(bytes(v) for v in scan.iter_extent_data(fd, extents))
                _check_same(fd, st)
                ref = self._small_pack().add(crypto.KIND_DATA, data)
                self._rotate()
            else:
                ref = self._store_large(fd, st, extents, data_len)
        finally:
            os.close(fd)
        self.stats.bytes_read += data_len
        if ref is not None:
            self.stats.bytes_stored += ref.stored_len
        self._progress.update(1, 0 if data_len >= SMALL_FILE else data_len)
        racy = st.st_ctime_ns >= read_ns - RACY_NS
        entry = _entry(path, st, FILE, data=ref, extents=tuple(extents))
        if racy:
            entry = replace(entry, ctime_ns=0)
        return entry

    def _store_large(self, fd: int, st: os.stat_result, extents: list[tuple[int, int]],
                     data_len: int) -> Ref:
        pack = self.store.new_pack()
        try:
            with scan.ReadAhead(fd, extents) as reader:
                def pieces() -> Iterator[memoryview]:
                    for view in reader:
                        self._progress.update(0, len(view))
                        yield view
                try:
                    ref = pack.add_stream(crypto.KIND_DATA, pieces(), data_len)
                except ValueError as exc:
                    raise SourceChanged(str(exc)) from None
            _check_same(fd, st)
        except BaseException:
            pack.abort()
            raise
        self._finish_later(pack)
        return ref

    # -- bookkeeping ----------------------------------------------------------------------------

    def _count_file(self, entry: Entry) -> None:
        self.stats.files += 1
        self.stats.bytes += entry.size
        self.stats.data_bytes += entry.data_bytes

    def _keep_old(self, old: Entry | None) -> Entry | None:
        if old is None:
            return None
        if old.type == FILE:
            self._count_file(old)
        return old

    def _skip(self, rel: bytes, why: str, old: Entry | None) -> Entry | None:
        """Counts and reports an entry that could not be read; returns what the previous
        generation had for it (kept as it was), or None."""
        self.stats.skipped += 1
        self.stats.skipped_paths.append(rel)
        if old is None:
            self._warn(f"{_show(rel)}: {why}; not in this generation")
            return None
        self._warn(f"{_show(rel)}: {why}; keeping the copy from the previous generation")
        return self._keep_old(old)

    def _warn(self, message: str) -> None:
        self.stats.warnings.append(message)
        log.warning("%s", message)


def _open_source(path: bytes) -> int:
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        return os.open(path, flags | os.O_NOATIME)
    except PermissionError:
        return os.open(path, flags)


def _check_same(fd: int, before: os.stat_result) -> None:
    after = os.fstat(fd)
    if scan.Signature.of(after) != scan.Signature.of(before):
        raise SourceChanged("it changed while it was read")


def _unchanged(old: Entry, st: os.stat_result) -> bool:
    return (old.ctime_ns != 0 and old.size == st.st_size and old.mtime_ns == st.st_mtime_ns
            and old.ctime_ns == st.st_ctime_ns and old.ino == st.st_ino)


def _entry(path: bytes, st: os.stat_result, etype: int, **kw: object) -> Entry:
    return Entry(os.path.basename(path), etype, st.st_mode & 0o7777, st.st_uid, st.st_gid,
                 st.st_mtime_ns, st.st_ctime_ns, st.st_ino,
                 st.st_size if etype != DIR else 0, **kw)  # type: ignore[arg-type]


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


def _show(rel: bytes) -> str:
    return os.fsdecode(rel)
