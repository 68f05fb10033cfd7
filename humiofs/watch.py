"""Continuous backup (`backup --watch`): a pass every interval stores what changed, a
generation is committed only when something did, and retention runs every few passes.

A pass walks only the folders inotify saw change and reuses the previous trees of all others,
so its cost follows what changed, not the size of the node. Whenever the events may be
incomplete (queue overflow, a folder moved, the watch limit) and every FULL_WALK_S seconds as
a safety net, a pass walks everything instead.
"""
from __future__ import annotations

import logging
import os
import select
import signal
import threading
import time
from types import FrameType

from humiofs import errors, prune, sdnotify, summary
from humiofs.config import Config
from humiofs.errors import ConfigError, Interrupted, StoreError, StoreLocked
from humiofs.format import Generation, Ref
from humiofs.generations import complete_name, format_time, latest_readable
from humiofs.inotify import Dirty, Tracker
from humiofs.localstate import LocalState
from humiofs.scan import DEFAULT_EXCLUDES, Excluder
from humiofs.store import Store, list_packs
from humiofs.writer import Backup, BackupOptions, TreeCounts

log = logging.getLogger(__name__)

FULL_WALK_S = 900.0
PRUNE_EVERY = 10          # passes; and only if a generation was committed since the last prune,
PRUNE_IDLE_S = 3600.0     # or this long has passed (generations age, recorded packs fall due)
_COALESCE_S = 0.1         # while sleeping, read inotify events at most this often


def run(cfg: Config, interval: float, extra_excludes: tuple[str, ...], progress: bool,
        json_out: bool = False) -> int:
    """Backs up `cfg.directory` every `interval` seconds until SIGTERM or SIGINT; returns the
    exit code (0 after a clean stop). Fatal errors are raised as HumiofsError. `json_out`:
    one summary object per pass on stdout (docs/JSON.md) instead of the lines for people."""
    if not interval > 0:
        raise ConfigError("the backup interval must be more than 0 seconds")
    cfg.need_directory()
    store = Store.open_or_create(cfg.store_path(), cfg.passphrase())
    try:
        return Watch(store, cfg, interval, extra_excludes, progress, json_out).run()
    finally:
        store.close()


def changed(gen: Generation, parent: Generation | None) -> bool:
    """True if `gen` differs from `parent` in anything a restore or mount shows."""
    return (parent is None or parent.checkpoint or gen.root != parent.root
            or gen.identity != parent.identity)


class Watch:
    def __init__(self, store: Store, cfg: Config, interval: float,
                 extra_excludes: tuple[str, ...], progress: bool, json_out: bool = False) -> None:
        self.store = store
        self.json_out = json_out
        self.last_pass: dict[str, object] = {}     # what the latest pass did, for --json
        self.cfg = cfg
        self.source = cfg.need_directory()
        self.interval = interval
        self.excludes = DEFAULT_EXCLUDES + cfg.excludes + extra_excludes
        self.progress = progress
        self.stop = threading.Event()
        self.tracker: Tracker | None = None
        self.counts: dict[Ref, TreeCounts] = {}
        self.used: set[bytes] = set()       # packs referred to since the last full walk
        self.state = LocalState.of(cfg.state_dir)
        self.last_full = float("-inf")
        self.passes = 0
        self.committed = 0
        self._pruned_at: tuple[int, float] | None = None    # (committed, monotonic time)
        self.rolled_back: str | None = None     # the rollback this watch started on
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    # -- signals --------------------------------------------------------------------------

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.stop.is_set():
            raise KeyboardInterrupt     # a second signal: leave now (every step is crash-safe)
        self.stop.set()
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:
            pass

    # -- the loop -------------------------------------------------------------------------

    def run(self) -> int:
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            with self.store.lock():
                self.store.clean_tmp()
                parent = latest_readable(self.store)
                if self.state is not None:
                    rollback = self.state.observe(self.store, complete_name(parent))
                    if rollback:
                        log.warning("%s", rollback)
                        # The first pass commits a newer generation, which ends the rollback
                        # for the record; this process still never prunes, so that the
                        # missing generations can be put back with every pack they need.
                        self.rolled_back = rollback
                self.tracker = self._start_tracker()
                if not self.json_out:
                    print(f"backup {self.store.name}: watching {self.source}, a pass every "
                          f"{self.interval:g}s", flush=True)
                while not self.stop.is_set():
                    deadline = time.monotonic() + self.interval
                    started = time.monotonic()
                    self.last_pass = {}
                    parent = self._pass(parent)
                    self.passes += 1
                    if self.json_out:
                        summary.emit("backup", store=self.store.name, watch_pass=self.passes,
                                     **{"checkpoint": None, "interrupted": False,
                                        **self.last_pass},
                                     seconds=round(time.monotonic() - started, 3))
                    if self.passes == 1:
                        # A Type=notify unit is started once the first pass has committed.
                        sdnotify.ready("first pass done" + (
                            f", latest {format_time(parent.time_ms)}" if parent else ""))
                    if self._prune_due():
                        self._prune()
                    self._sleep(deadline)
        finally:
            for s, handler in old.items():
                signal.signal(s, handler)
            if self.tracker is not None:
                self.tracker.close()
            os.close(self._wake_r)
            os.close(self._wake_w)
        if parent is not None and parent.checkpoint:
            latest = (f"; committed checkpoint {parent.name} ({format_time(parent.time_ms)}, "
                      "partial): the next run resumes from it")
        else:
            latest = f"; latest {format_time(parent.time_ms)}" if parent else ""
        if self.json_out:
            return errors.EXIT_OK
        print(f"backup {self.store.name}: stopped after {self.passes} pass(es), "
              f"{self.committed} generation(s) committed{latest}", flush=True)
        return errors.EXIT_OK

    def _start_tracker(self) -> Tracker | None:
        skip = None
        try:
            st = os.stat(self.store.path)
            skip = (st.st_dev, st.st_ino)
            # The real path: DIRECTORY may be a symlink, and watches do not follow symlinks.
            return Tracker(os.fsencode(os.path.realpath(self.source)), Excluder(self.excludes),
                           skip)
        except OSError as exc:
            log.warning("cannot use inotify (%s); every pass walks the whole data directory",
                        exc.strerror or exc)
            return None

    def _pass(self, parent: Generation | None) -> Generation | None:
        """One backup pass; returns the new latest generation (the parent if none was due)."""
        dirty = self.tracker.take() if self.tracker is not None else Dirty(full=True)
        full = dirty.full or time.monotonic() - self.last_full >= FULL_WALK_S
        if full:
            if self.tracker is not None:
                self.tracker.rewatch()
            self.last_full = time.monotonic()
        first = self.passes == 0
        opts = BackupOptions(
            source=self.source, backup_name=self.store.name, excludes=self.excludes,
            host_id=self.cfg.host_id, progress=None if self.progress and first else False,
            clean=None if full else dirty.clean, tree_counts=self.counts,
            # Checkpoints (FORMAT.md 7.4) while a pass runs long; a pass with no complete
            # parent (the first backup) that is stopped commits a checkpoint rather than a
            # generation that would lack what it had not read yet.
            checkpoints=True, checkpoint_s=self.cfg.checkpoint_s,
            checkpoint_bytes=self.cfg.checkpoint_bytes,
            checkpoint_on_stop=parent is None or parent.checkpoint)
        run = Backup(self.store, opts, should_stop=self.stop.is_set)
        start = time.monotonic()
        try:
            try:
                gen = run.build(parent)
            except Interrupted as exc:
                log.info("%s", exc)
                latest = latest_readable(self.store)
                cp = (latest if latest is not None and latest.checkpoint
                      and (parent is None or latest.name != parent.name) else None)
                self.last_pass = {
                    "committed": False, "checkpoint": cp.name if cp else None,
                    "interrupted": True,
                    "generation": summary.generation(
                        parent if parent is not None and not parent.checkpoint else None)}
                return latest
            if not full and changed(gen, parent) and self._store_lost_packs(run):
                # Folders this pass reused without walking them may refer to those packs: a
                # full walk reads what they held again rather than carry the refs on.
                run.discard()
                log.info("the store lost packs this backup's generations used; walking the "
                         "whole data directory")
                self.last_full = float("-inf")
                return self._pass(parent)
        except (OSError, StoreError) as exc:
            # The store's own failures are HumiofsErrors with other codes and end the run; a
            # source that is briefly unreadable (DIRECTORY unmounted, EIO) is retried.
            if isinstance(exc, StoreError) and exc.exit_code != errors.EXIT_USAGE:
                raise
            if first and parent is None:
                raise
            log.warning("backup pass failed: %s; trying again in %gs", exc, self.interval)
            self.last_pass = {"committed": False, "generation": summary.generation(parent),
                              "error": str(exc)}
            self.last_full = float("-inf")
            return parent
        if full:
            self.counts = run.tree_counts_seen
            self.used = run.packs_used
        else:
            self.counts.update(run.tree_counts_seen)
            self.used |= run.packs_used
        if self.tracker is not None:
            if run.stats.skipped_paths:
                self.tracker.mark(run.stats.skipped_paths)
            # A write through one name of a hard-linked file raises an event in that name's
            # folder only: the folders of every such file are listed on every pass.
            self.tracker.mark(run.linked_files)
        self.last_pass = {"committed": False, "generation": summary.generation(parent),
                          "full_walk": full, "files": summary.backup_files(run.stats),
                          "bytes_read": run.stats.bytes_read, "bytes_stored": 0, "error": None}
        if not changed(gen, parent):
            run.discard()
            log.debug("pass %d: nothing changed (%.1f ms)", self.passes + 1,
                      (time.monotonic() - start) * 1000)
            return parent
        run.commit(gen)
        self.last_pass.update(committed=True, generation=summary.generation(gen),
                              bytes_stored=run.stats.bytes_stored)
        if self.state is not None and (done := complete_name(gen)) is not None:
            self.state.observe(self.store, done)
        self.committed += 1
        s = run.stats
        log.info("generation %s: %d new, %d changed files, %d skipped, %d bytes stored "
                 "(%s pass, %.2fs)", format_time(gen.time_ms), s.new, s.changed, s.skipped,
                 s.bytes_stored, "full" if full else "incremental", time.monotonic() - start)
        return gen

    def _store_lost_packs(self, run: Backup) -> bool:
        """True if a pack that a generation of this watch referred to, through a folder a
        pass walked since the last full walk, is gone from the store (lost, or removed by a
        prune because nothing needs it any more: a full walk costs little then)."""
        present = list_packs(self.store)
        return any(pid not in present for pid in self.used | run.packs_used)

    def _prune_due(self) -> bool:
        if self.stop.is_set() or self.passes % PRUNE_EVERY != 1:
            return False
        if self._pruned_at is None:
            return True
        committed, when = self._pruned_at
        return self.committed > committed or time.monotonic() - when >= PRUNE_IDLE_S

    def _prune(self) -> None:
        self._pruned_at = (self.committed, time.monotonic())
        rollback = self.rolled_back or (self.state.rollback_of(self.store)
                                        if self.state is not None else None)
        if rollback:
            log.warning("prune skipped: the store stands rolled back (this watch started on "
                        "it), and prune would delete the packs only the missing generations "
                        "need; put them back, or restart the watch to prune again (%s)",
                        rollback)
            return
        try:
            r = prune.prune(self.store, self.cfg.delete_after_ms, should_stop=self.stop.is_set,
                            own_writer_lock=True)
        except StoreLocked:
            log.info("prune skipped: another prune or check is running")
            return
        if r.dropped or r.deleted_packs or r.condemned_packs:
            log.info("prune: removed %d generations, deleted %d packs (%d bytes), recorded "
                     "%d unneeded packs", len(r.dropped), r.deleted_packs, r.deleted_bytes,
                     r.condemned_packs)

    def _sleep(self, deadline: float) -> None:
        """Waits until `deadline` or a stop, reading inotify events meanwhile."""
        while not self.stop.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            fds = [self._wake_r]
            if self.tracker is not None:
                fds.append(self.tracker.fileno())
            ready, _, _ = select.select(fds, [], [], left)
            if self._wake_r in ready:
                try:
                    os.read(self._wake_r, 64)
                except BlockingIOError:
                    pass
            if self.tracker is not None and self.tracker.fileno() in ready:
                self.tracker.drain()
                # Many events in a burst would wake us for each; gather them for a moment.
                select.select([self._wake_r], [], [], min(_COALESCE_S, max(0.0, left)))
