"""Continuous backup (`backup --watch`): a pass every interval stores what changed, a
generation is committed only when something did, and retention runs every few passes.

A pass walks only the folders inotify saw change and reuses the previous trees of all others,
so its cost follows what changed, not the size of the node. Whenever the events may be
incomplete (queue overflow, a folder moved, the watch limit) and every FULL_WALK_S seconds as
a safety net, a pass walks everything instead.
"""
from __future__ import annotations

import errno
import logging
import os
import select
import signal
import threading
import time
from types import FrameType

from humiofs import errors, prune
from humiofs.backup.inotify import Dirty, Tracker
from humiofs.backup.scan import DEFAULT_EXCLUDES, Excluder
from humiofs.backup.writer import Backup, BackupOptions, TreeCounts
from humiofs.cli import summary
from humiofs.config import Config
from humiofs.errors import ConfigError, Interrupted, StoreError, StoreIOError, StoreLocked
from humiofs.store.format import Generation, Ref
from humiofs.store.generations import complete_name, format_time, latest_readable
from humiofs.store.localstate import LocalState
from humiofs.store.repository import Store, backend_of, is_store, list_packs, looks_like_store
from humiofs.system import sdnotify

log = logging.getLogger(__name__)

FULL_WALK_S = 900.0
PRUNE_EVERY = 10          # passes; and only if a generation was committed since the last prune,
PRUNE_IDLE_S = 3600.0     # or this long has passed (generations age, recorded packs fall due)
_OUTAGE_ERRNOS = frozenset({errno.ECONNREFUSED, errno.ECONNRESET, errno.ETIMEDOUT,
                            errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ECONNABORTED})
_COALESCE_S = 0.1         # while sleeping, read inotify events at most this often


def run(cfg: Config, interval: float, extra_excludes: tuple[str, ...], progress: bool,
        json_out: bool = False, quiet: bool = False) -> int:
    """Backs up `cfg.directory` every `interval` seconds until SIGTERM or SIGINT; returns the
    exit code (0 after a clean stop). Fatal errors are raised as HumiofsError. `json_out`:
    one summary object per pass on stdout (docs/JSON.md) instead of the lines for people;
    `quiet`: neither (-q), only errors are logged."""
    if not interval > 0:
        raise ConfigError("the backup interval must be more than 0 seconds")
    cfg.need_directory()
    store = _open_store(cfg, interval)
    if store is None:
        return errors.EXIT_OK
    try:
        return Watch(store, cfg, interval, extra_excludes, progress, json_out, quiet).run()
    finally:
        store.close()


def _open_store(cfg: Config, interval: float) -> Store | None:
    """The store to watch. A store this host has a record of (BACKUP_STATE_DIR) is expected:
    while it is absent (the backup drive not mounted, BACKUP_DIR moved) the watch waits for
    it, every `interval`, rather than start a fresh full backup in an empty mountpoint; None
    if stopped meanwhile. A store never seen here is created, as by a one-shot backup."""
    path = cfg.store_path()
    state = LocalState.of(cfg.state_dir)
    backend = backend_of(path)
    if looks_like_store(backend) or state is None or not state.known_place(path):
        return Store.open_or_create(path, cfg.passphrase())
    stop = threading.Event()
    old = {s: signal.signal(s, lambda signum, frame: stop.set())
           for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        log.warning("the store %s is not there, but this host has backed it up before (the "
                    "backup drive is not mounted, or BACKUP_DIR moved?); waiting for it, "
                    "looking every %gs. A one-shot `humiofs backup` starts a new store there",
                    path, interval)
        sdnotify.ready(f"waiting for the store {path}")
        while not looks_like_store(backend):
            if stop.wait(interval):
                return None
        log.info("the store %s is back", path)
        return Store.open(path, cfg.passphrase())
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def _where(path: os.PathLike[str] | None) -> tuple[int, int] | None:
    """The device and inode of a local store's folder (not store access: telling that the
    backup drive went away, and leaving the store out of the node's backup)."""
    if path is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def changed(gen: Generation, parent: Generation | None) -> bool:
    """True if `gen` differs from `parent` in anything a restore or mount shows."""
    return (parent is None or parent.checkpoint or gen.root != parent.root
            or gen.identity != parent.identity)


class Watch:
    def __init__(self, store: Store, cfg: Config, interval: float,
                 extra_excludes: tuple[str, ...], progress: bool, json_out: bool = False,
                 quiet: bool = False) -> None:
        self.store = store
        self.quiet = quiet
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
        self._home = _where(store.backend.local_path)   # the store's folder as it was opened

    def _store_gone(self) -> str | None:
        """Why the store this watch opened is not where it was (the backup drive went away,
        BACKUP_DIR or the store was moved), or None if it is there. Raises StoreIOError if
        another folder is there now."""
        if not is_store(self.store.backend):
            return (f"the store {self.store.path} is gone (the backup drive is not mounted, or "
                    "BACKUP_DIR or the store was moved?)")
        if _where(self.store.backend.local_path) != self._home:
            # The writer lock this watch holds is on the folder it opened, not on this one:
            # stop (exit 7, which the unit restarts), and the next run opens this one.
            raise StoreIOError(f"{self.store.path} is not the folder this watch opened (the "
                               "backup drive was mounted again, or the store replaced); "
                               "stopping, so that a new run opens it")
        return None

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
                if not self.json_out and not self.quiet:
                    print(f"backup {self.store.name}: watching {self.source}, a pass every "
                          f"{self.interval:g}s", flush=True)
                # A Type=notify unit is started once the watch runs (the store open, the
                # writer lock held), not after a first pass that may take hours: neither
                # `systemctl start` nor boot waits for it.
                sdnotify.ready(f"watching {self.source}" + (
                    f", latest {format_time(parent.time_ms)}" if parent else ""))
                while not self.stop.is_set():
                    deadline = time.monotonic() + self.interval
                    started = time.monotonic()
                    self.last_pass = {}
                    try:
                        parent = self._pass(parent)
                    except (OSError, errors.HumiofsError) as exc:
                        why = self._outage(exc)
                        if why is None or isinstance(exc, Interrupted):
                            raise
                        parent = self._failed(parent, why)
                    self.passes += 1
                    if self.json_out:
                        summary.emit("backup", store=self.store.name, watch_pass=self.passes,
                                     **{"checkpoint": None, "interrupted": False,
                                        **self.last_pass},
                                     seconds=round(time.monotonic() - started, 3))
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
        if self.json_out or self.quiet:
            return errors.EXIT_OK
        print(f"backup {self.store.name}: stopped after {self.passes} pass(es), "
              f"{self.committed} generation(s) committed{latest}", flush=True)
        return errors.EXIT_OK

    def _start_tracker(self) -> Tracker | None:
        skip = None
        try:
            skip = _where(self.store.backend.local_path)
            # The real path: DIRECTORY may be a symlink, and watches do not follow symlinks.
            return Tracker(os.fsencode(os.path.realpath(self.source)), Excluder(self.excludes),
                           skip)
        except OSError as exc:
            log.warning("cannot use inotify (%s); every pass walks the whole data directory",
                        exc.strerror or exc)
            return None

    def _pass(self, parent: Generation | None) -> Generation | None:
        """One backup pass; returns the new latest generation (the parent if none was due)."""
        gone = self._store_gone()
        if gone:
            return self._failed(parent, gone)
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
        except (OSError, errors.HumiofsError) as exc:
            if isinstance(exc, Interrupted):
                raise
            # The store going away mid-pass (its drive unmounted) is not damage: retried.
            gone = self._store_gone()
            if gone:
                return self._failed(parent, gone)
            # The store's own failures are HumiofsErrors with other codes and end the run; a
            # source that is briefly unreadable (DIRECTORY unmounted, EIO) is retried.
            if isinstance(exc, errors.HumiofsError) and not (
                    isinstance(exc, StoreError) and exc.exit_code == errors.EXIT_USAGE):
                raise
            if first and parent is None:
                raise
            return self._failed(parent, str(exc))
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
            self.state.record(self.store, done)
        self.committed += 1
        s = run.stats
        log.info("generation %s: %d new, %d changed files, %d skipped, %d bytes stored "
                 "(%s pass, %.2fs)", format_time(gen.time_ms), s.new, s.changed, s.skipped,
                 s.bytes_stored, "full" if full else "incremental", time.monotonic() - start)
        return gen

    def _outage(self, exc: BaseException) -> str | None:
        """Why a pass failed if the object storage service could not be reached (refused or
        dropped connections, timeouts, after the client's retries: README "Object storage"),
        else None. Such a pass is retried next interval like a backup drive that went away;
        a local store's errors are not outages."""
        if self.store.backend.local_path is not None:
            return None
        seen: BaseException | None = exc
        for _ in range(8):
            if seen is None:
                break
            if isinstance(seen, (ConnectionError, TimeoutError)) or (
                    isinstance(seen, OSError) and seen.errno in _OUTAGE_ERRNOS):
                return str(exc)
            seen = seen.__cause__ or seen.__context__
        return None

    def _failed(self, parent: Generation | None, why: str) -> Generation | None:
        """A pass that failed for a passing reason: one line, retried next interval."""
        log.warning("backup pass failed: %s; trying again in %gs", why, self.interval)
        self.last_pass = {"committed": False, "generation": summary.generation(parent),
                          "full_walk": True, "error": why}
        self.last_full = float("-inf")
        return parent

    def _store_lost_packs(self, run: Backup) -> bool:
        """True if a pack that a generation of this watch referred to, through a folder a
        pass walked since the last full walk, is gone from the store (lost, or removed by a
        prune because nothing needs it any more: a full walk costs little then)."""
        present = list_packs(self.store)
        return any(pid not in present for pid in self.used | run.packs_used)

    def _prune_due(self) -> bool:
        if self.stop.is_set() or self.passes % PRUNE_EVERY != 1 or self.last_pass.get("error"):
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
        except (OSError, errors.HumiofsError) as exc:
            if isinstance(exc, Interrupted):
                raise
            try:
                gone = self._outage(exc) or self._store_gone()
            except OSError as again:
                gone = self._outage(again)
                if gone is None:
                    raise
            if gone:
                log.warning("prune failed: %s; the next pass tries again", gone)
                self._pruned_at = None
                return
            if not isinstance(exc, StoreError):
                raise
            # Prune refused (the store stands rolled back, no generation opens, ...): the
            # backups go on; check says what to do.
            log.error("prune skipped: %s", exc)
            return
        if r.damaged:
            log.error("prune deleted no pack: %s", r.damaged[0])
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
