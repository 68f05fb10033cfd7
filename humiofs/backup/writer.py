"""One backup run: walk the data directory, store what changed, commit a generation last.

The walk is walk.py's, a file's read readfile.py's, the packs packs.py's; this module builds
and commits the generations of a run, and its checkpoints (FORMAT.md 7.4).
"""
from __future__ import annotations

import logging
import os
import socket
import stat
import time
from collections.abc import Callable
from pathlib import Path

from humiofs import failpoint
from humiofs.backup import checkpoint, identity, scan, xattrs
from humiofs.backup.options import BackupOptions, BackupStats
from humiofs.backup.options import TreeCounts as TreeCounts  # watch.py imports it from here
from humiofs.backup.packs import RunPacks
from humiofs.backup.readfile import make_entry
from humiofs.backup.walk import Walker
from humiofs.errors import Interrupted, StoreError
from humiofs.progress import Progress
from humiofs.store import crypto, format, journal
from humiofs.store.format import DIR, Entry, Generation, Ref, RootAttrs, Xattrs
from humiofs.store.repository import Store, new_generation_name

log = logging.getLogger(__name__)


class Backup:
    """A single backup run into an opened store; the caller holds the store lock."""

    def __init__(self, store: Store, options: BackupOptions,
                 should_stop: Callable[[], bool] = lambda: False) -> None:
        self.store = store
        self.opt = options
        self.should_stop = should_stop
        self.stats = BackupStats()
        self._progress = Progress(enabled=options.progress)
        self.packs = RunPacks(store)
        self._policy = (checkpoint.Policy(options.checkpoint_s, options.checkpoint_bytes,
                                          stop=should_stop if options.checkpoint_on_stop
                                          else None)
                        if options.checkpoints else None)
        self.walker = Walker(store, options, self.packs, self.stats, self._progress,
                             should_stop, self._policy, self._checkpoint)
        # What watch.py carries from run to run (see Walker).
        self.tree_counts_seen = self.walker.tree_counts_seen
        self.linked_files = self.walker.linked_files
        self.packs_used = self.walker.packs_used
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
            self.walker.ledger.report_lost()
            return gen
        except BaseException:
            self._discard_after_failure()
            raise
        finally:
            os.close(root_fd)

    def commit(self, gen: Generation) -> None:
        """Writes `gen`, built by this run, as the store's newest generation."""
        try:
            self.packs.journal.committing(gen.name)
            failpoint.reached("committing")
            self.store.commit_generation(gen)
        except BaseException:
            # Keeps the packs if the generation reached the store after all.
            self._discard_after_failure()
            raise
        self.packs.journal.close(committed=True)
        checkpoint.remove_superseded(self.store, self._superseded)
        self._superseded = []

    def discard(self) -> None:
        """Removes every pack this run stored (none is referenced unless its generation was
        committed) and its temporary files; for a run that failed or changed nothing."""
        self.packs.journal.close(committed=False)
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
                self.walker.store_ino = (st.st_dev, st.st_ino)
        except OSError:
            pass
        if self._progress.enabled:
            self._progress.total_bytes = _estimate_bytes(parent, src)
        prev_root = parent.root.tree if parent else None
        root_ref = None
        if parent is not None and parent.root.mtime_ns == root_st.st_mtime_ns:
            root_ref = self.walker.reuse(b"", prev_root)
        try:
            root_xattrs = xattrs.read(root_fd)
        except OSError as exc:
            root_xattrs = parent.root.xattrs if parent is not None else ()
            self.walker.ledger.warn(f"the extended attributes of {src} cannot be read ({exc.strerror}); "
                       "keeping the previous ones")
            self.stats.skipped += 1
        self._root = (root_st, root_xattrs)
        try:
            if root_ref is None:
                with scan.deep_walk():
                    root_ref, _ = self.walker.store_dir(root_fd, b"", prev_root)
            self.packs.finish_packs()
        except BaseException:
            self.packs.abort_packs()
            raise
        finally:
            self._progress.close()
            self.packs.shutdown()
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
            ref = self.packs.tree_pack().add(crypto.KIND_TREE, plain)
            self.stats.bytes_stored += ref.stored_len
            return ref

        def dir_entry(name: bytes, st: os.stat_result, sub: Ref, nlink: int,
                      attrs: Xattrs) -> Entry:
            return make_entry(name, st, DIR, subtree=sub, nlink=nlink, xattrs=attrs)

        root_ref = checkpoint.partial_root(self.walker.levels, store_tree, dir_entry)
        self.packs.finish_packs()
        gen = self._generation(root_ref, self._identity(), partial=True)
        self.packs.journal.committing(gen.name)
        failpoint.reached("committing")
        self.store.commit_generation(gen)
        self.packs.journal.close(committed=True)
        failpoint.reached("checkpoint")
        self.packs.journal = journal.RunJournal(self.store)
        checkpoint.remove_superseded(self.store, self._superseded)
        self._superseded = [gen.name]
        self.checkpoints += 1
        self._policy.done(self.stats.bytes_stored)
        log.info("checkpoint %s committed: %d files so far", gen.name, self.stats.files)
        if self._policy.requested:
            raise Interrupted(f"interrupted; checkpoint {gen.name} committed: the next backup "
                              "resumes from it")


def _encodable(entry: Entry) -> bool:
    try:
        format.encode_tree([entry])
    except (ValueError, OverflowError):
        return False
    return True


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

