"""Pruning (docs/FORMAT.md section 10): removing the generations the retention policy
(prune_policy.py) drops, then every store file that no kept generation needs, crash-safely and
next to a running writer and mounts.
"""
from __future__ import annotations

import errno
import json
import logging
import math
import os
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from humiofs.errors import NoSuchObject, StoreError, StoreIOError, StoreLocked, refused
from humiofs.prune_policy import DAY_MS, HOUR_MS, Decision, TreeDiff, plan
from humiofs.store import journal
from humiofs.store.backend import Busy, Item, iter_names
from humiofs.store.durable import NotRegularFile, store_io_error
from humiofs.store.format import DIR, FILE, Generation, Ref
from humiofs.store.generations import NO_GENERATION_OPENS
from humiofs.store.repository import PACK_NAME, Store, list_packs
from humiofs.store.storemeta import pack_name, refuse_planted

__all__ = ["DAY_MS", "HOUR_MS", "Decision", "TreeDiff", "plan", "prune", "prune_lock",
           "read_record", "referenced_packs", "set_aside", "set_aside_names"]

log = logging.getLogger(__name__)

DEFAULT_GRACE_S = 3600.0
LOCK_NAME = "prune.lock"
RECORD_DIR = "prune"
# Generation files that cannot be read, moved out of generations/ by `prune
# --set-aside-damaged` (FORMAT.md 10.4): kept for a look, used by nothing.
SET_ASIDE_DIR = "damaged"
RECORD_NAME = re.compile(r"^(\d{13})-([0-9a-f]{16})$")


@contextmanager
def prune_lock(store: Store, wait: bool = False, reading: bool = False) -> Iterator[None]:
    """Holds NAME/prune.lock, which keeps prunes (and checks) from overlapping; raises
    StoreLocked if another holds it, unless `wait`.

    The file is never written. It is not the writer lock: prune runs next to a writer.
    `reading` (check): on a store this process cannot write (a read-only disk), a missing
    lock file cannot be made and is not needed: no prune has run there through this path.
    """
    path = store.at(LOCK_NAME)
    if not reading:
        refuse_planted(store.backend)
    try:
        try:
            held = store.backend.lock(LOCK_NAME, b"")
        except Busy:
            if not wait:
                raise StoreLocked(f"a prune or check is running on {store.path}; "
                                  "try again when it has finished") from None
            log.warning("a prune or check is running on %s; waiting for it", store.path)
            held = store.backend.lock(LOCK_NAME, b"", math.inf)
    except NotRegularFile as exc:
        if not reading:
            raise StoreError(f"{path} is {exc.strerror}: move it out of the store (the next "
                             "prune makes the file again)") from None
        log.debug("%s is %s: checking without it (check reports it)", path, exc.strerror)
        yield
        return
    except OSError as exc:
        if not (reading and exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM)):
            raise store_io_error(exc, path) from None
        # The lock file is missing and cannot be made here (an existing one opens).
        log.debug("%s is missing and cannot be made: checking without it", path)
        yield
        return
    with held:
        yield


# -- what the kept generations need -----------------------------------------------------------

def referenced_packs(store: Store, roots: list[Ref],
                     should_stop: Callable[[], bool] = lambda: False) -> set[bytes] | None:
    """Every pack the trees below `roots` refer to (trees deduplicated by ref); None if
    stopped. Raises StoreError if a tree cannot be read."""
    seen: set[Ref] = set()
    packs: set[bytes] = set()
    stack = list(roots)
    while stack:
        ref = stack.pop()
        if ref in seen:
            continue
        if should_stop():
            return None
        seen.add(ref)
        packs.add(ref.pack)
        for e in store.read_tree(ref):
            if e.type == FILE and e.data is not None:
                packs.add(e.data.pack)
            elif e.type == DIR and e.subtree is not None and e.subtree not in seen:
                stack.append(e.subtree)
    return packs


@dataclass
class Record:
    """A prune record: packs found unneeded at `time_ms`, to be deleted after the grace."""

    name: str
    time_ms: int
    packs: set[bytes]


def read_record(store: Store, name: str) -> Record:
    """Parses prune/NAME; raises ValueError if it is malformed, OSError if it cannot be read,
    and StoreIOError (exit 7) if this user may not read it (not a damaged record)."""
    m = RECORD_NAME.match(name)
    if not m:
        raise ValueError("not a prune record name")
    try:
        raw = store.backend.read(f"{RECORD_DIR}/{name}", 64 << 20)
    except OSError as exc:
        raise refused(exc, store.at(f"{RECORD_DIR}/{name}")) or exc
    doc = json.loads(raw)
    if doc.get("version") != 1 or not isinstance(doc.get("packs"), list):
        raise ValueError("not a prune record")
    packs = set()
    for h in doc["packs"]:
        if not isinstance(h, str) or not PACK_NAME.match(h):
            raise ValueError("holds a malformed pack id")
        packs.add(bytes.fromhex(h))
    return Record(name, int(m.group(1)), packs)


# -- prune ------------------------------------------------------------------------------------

@dataclass
class PruneResult:
    decisions: list[Decision] = field(default_factory=list)
    deleted_packs: int = 0
    deleted_bytes: int = 0
    condemned_packs: int = 0
    condemned_bytes: int = 0
    pending_packs: int = 0
    young_packs: int = 0
    damaged: list[str] = field(default_factory=list)
    # Generation files that cannot be read (left in generations/, or set aside if asked).
    unreadable: list[str] = field(default_factory=list)
    set_aside: list[str] = field(default_factory=list)
    stopped: bool = False

    @property
    def dropped(self) -> list[str]:
        return [d.name for d in self.decisions if not d.keep]


def prune(store: Store, delete_after_ms: int, grace_s: float = DEFAULT_GRACE_S,
          dry_run: bool = False, now_ms: int | None = None,
          should_stop: Callable[[], bool] = lambda: False,
          own_writer_lock: bool = False, set_aside_damaged: bool = False) -> PruneResult:
    """Drops the generations retention no longer keeps, then the packs nothing needs.

    Packs go in two phases: a run records the unneeded ones, and a run at least `grace_s`
    later deletes those still unneeded (at once if `grace_s` is 0). `own_writer_lock`: the
    caller holds the writer lock and runs no backup meanwhile (backup --watch between
    passes). Raises StoreLocked if another prune or check holds the prune lock.

    A generation file that cannot be read may need any pack, so while one is in generations/
    no pack is deleted (`unreadable` names them); `set_aside_damaged` first moves each to
    NAME/damaged/ (section 10.4), after which the packs only it could need go.
    """
    with prune_lock(store):
        p = _Prune(store, delete_after_ms, grace_s, dry_run,
                   now_ms if now_ms is not None else int(time.time() * 1000),
                   should_stop, own_writer_lock)
        p.set_aside_damaged = set_aside_damaged
        return p.run()


class _Prune:
    def __init__(self, store: Store, delete_after_ms: int, grace_s: float, dry_run: bool,
                 now_ms: int, should_stop: Callable[[], bool], own_writer_lock: bool) -> None:
        self.store = store
        self.own_writer_lock = own_writer_lock
        self.delete_after_ms = delete_after_ms
        self.grace_ms = int(grace_s * 1000)
        self.dry_run = dry_run
        self.now_ms = now_ms
        self.should_stop = should_stop
        self.result = PruneResult()
        self.loaded: dict[str, Generation | None] = {}
        self.set_aside_damaged = False

    def _load(self, name: str) -> Generation | None:
        if name not in self.loaded:
            try:
                self.loaded[name] = self.store.load_generation(name)
            except NoSuchObject:
                raise
            except StoreError as exc:
                self.result.damaged.append(str(exc))
                self.result.unreadable.append(name)
                self.loaded[name] = None
        return self.loaded[name]

    def run(self) -> PruneResult:
        r = self.result
        names = []
        gens = []
        listed = []
        for name in self.store.list_generations():
            try:
                self._load(name)
            except NoSuchObject:
                continue            # deleted by hand meanwhile
            listed.append(name)
        if listed and all(self.loaded[n] is None for n in listed):
            # Another store's key files, or every generation damaged: setting them aside
            # would leave no root, and every pack would go (section 10.2).
            raise StoreError(f"not pruning {self.store.path}: {r.damaged[0]}. "
                             f"{NO_GENERATION_OPENS} Nothing was changed")
        for name in listed:
            gen = self.loaded[name]
            if gen is None and self.set_aside_damaged:
                if not self.dry_run:
                    set_aside(self.store, name)
                r.set_aside.append(name)
                continue
            gens.append((name, gen))
            names.append(name)
        if r.set_aside:
            # Set aside, they no longer hold packs back: what they said is lost anyway.
            r.damaged = [d for d, n in zip(r.damaged, r.unreadable) if n not in r.set_aside]
            r.unreadable = [n for n in r.unreadable if n not in r.set_aside]
        diff = TreeDiff(self.store)
        r.decisions = plan(gens, self.now_ms, self.delete_after_ms, diff)
        r.damaged += diff.damaged
        if not self.dry_run:
            self._drop_generations(r.dropped)
        if self.should_stop():
            r.stopped = True
            return r
        # The packs are listed first, then whether a writer runs, then the generations, which
        # are the roots: a pack that no generation listed after a moment without a writer
        # needs is nobody's (section 10.2). While a writer runs, only packs older than the
        # newest generation file may be taken: newer ones may be the running writer's.
        packs = list_packs(self.store)
        no_writer = self.own_writer_lock or not self.store.writer_running()
        dropped = set(r.dropped)
        remaining = [n for n in (names if self.dry_run else self.store.list_generations())
                     if n not in dropped and n not in r.set_aside]
        cutoff = 0
        roots = []
        for name in remaining:
            # Loaded first: a generation that reads back is a root even if its file goes
            # before it is stat'ed (a writer deletes the checkpoint it just superseded,
            # FORMAT.md 7.4); only the cutoff needs the file time.
            try:
                gen = self._load(name)
            except NoSuchObject:
                continue
            if gen is not None:
                roots.append(gen.root.tree)
            try:
                st = self.store.backend.stat(f"generations/{name}")
            except FileNotFoundError:
                continue
            cutoff = max(cutoff, st.time_ns())
        # No pack is deleted while the store is damaged; the caller says so (once).
        if r.unreadable or r.damaged:
            return r
        try:
            needed = referenced_packs(self.store, roots, self.should_stop)
        except StoreError as exc:
            r.damaged.append(str(exc))
            return r
        if needed is None:
            r.stopped = True
            return r
        if not roots and packs:
            # Packs and no generation: a first backup that did not commit (its journal in
            # tmp/ lists its packs), or generations/ lost or emptied (on a fresh host or
            # another mount path no rollback record tells). Only the packs a run's journal
            # lists may go then: prune never empties a store of its generations' data
            # (section 10.2).
            of_runs = journal.listed_packs(self.store)
            orphans = [pid for pid in packs if pid not in of_runs]
            if orphans:
                msg = (f"not deleting packs: {self.store.path} holds {len(orphans)} pack(s) "
                       "that no generation and no interrupted backup's journal lists, and no "
                       "generation. If generations/ was lost or emptied, put it back from a "
                       "copy of the store; if it was deleted on purpose, delete the store "
                       "instead. Nothing was deleted")
                r.damaged.append(msg)
                return r
        self._packs(packs, needed, None if no_writer else cutoff)
        return r

    def _drop_generations(self, names: list[str]) -> None:
        if not names:
            return
        backend = self.store.backend
        for name in names:
            try:
                backend.delete(f"generations/{name}")
            except OSError as exc:
                raise StoreIOError(f"cannot delete generation {name}: {exc.strerror}") from None
            log.info("removed generation %s", name)
        backend.sync("generations")

    def _packs(self, packs: dict[bytes, Item], needed: set[bytes],
               cutoff_ns: int | None) -> None:
        """Deletes recorded packs whose grace is over, and records (or with grace 0 deletes)
        the other unneeded ones: all of them if no writer runs (`cutoff_ns` None), else those
        older than `cutoff_ns` (a generation file's mtime)."""
        r = self.result
        records = self._records()
        pending: set[bytes] = set()
        for rec in records:
            if rec.time_ms + self.grace_ms > self.now_ms:
                pending |= rec.packs
        for rec in records:
            if rec.time_ms + self.grace_ms > self.now_ms:
                continue
            if self.should_stop():
                r.stopped = True
                return
            for pid in sorted(rec.packs):
                if pid not in needed and pid in packs and pid not in pending:
                    self._delete_pack(pid, packs.pop(pid))
            if not self.dry_run:
                self._unlink(f"{RECORD_DIR}/{rec.name}")
        unneeded = {pid: st for pid, st in packs.items() if pid not in needed}
        r.pending_packs = len(pending & unneeded.keys())
        condemn = {pid: st for pid, st in unneeded.items()
                   if pid not in pending and (cutoff_ns is None or st.time_ns() < cutoff_ns)}
        r.young_packs = len(unneeded) - r.pending_packs - len(condemn)
        if not condemn:
            return
        if self.grace_ms <= 0:
            for pid, st in sorted(condemn.items()):
                self._delete_pack(pid, st)
            return
        r.condemned_packs = len(condemn)
        r.condemned_bytes = sum(st.size for st in condemn.values())
        if not self.dry_run:
            self._write_record(sorted(condemn))

    def _records(self) -> list[Record]:
        rdir = self.store.at(RECORD_DIR)
        try:
            names = sorted(i.name.rpartition("/")[2] for i in self.store.backend.list(RECORD_DIR))
        except FileNotFoundError:
            return []
        except NotADirectoryError:
            raise StoreError(f"{rdir} is not a folder: move it out of the store (prune makes "
                             "the folder again when it needs it)") from None
        except OSError as exc:
            raise StoreIOError(f"cannot list {rdir}: {exc.strerror}") from None
        out = []
        for name in names:
            try:
                out.append(read_record(self.store, name))
            except (ValueError, OSError) as exc:
                # A record only ever lets prune delete unneeded packs; a bad one is dropped and
                # its packs are recorded again.
                log.warning("prune record %s is unreadable (%s); %s", name, exc,
                            "ignoring it" if self.dry_run else "removing it")
                if not self.dry_run and RECORD_NAME.match(name):
                    self._unlink(f"{RECORD_DIR}/{name}")
        return out

    def _write_record(self, packs: list[bytes]) -> None:
        try:
            self.store.backend.make_folder(RECORD_DIR)
        except OSError as exc:
            raise StoreIOError(f"cannot create {self.store.at(RECORD_DIR)}: "
                               f"{exc.strerror}") from None
        now_ms = max(self.now_ms, int(time.time() * 1000))
        doc = {"version": 1, "time_ms": now_ms, "packs": [p.hex() for p in packs]}
        name = f"{now_ms:013d}-{os.urandom(8).hex()}"
        self.store.write_file(f"{RECORD_DIR}/{name}", json.dumps(doc).encode() + b"\n")

    def _delete_pack(self, pid: bytes, st: Item) -> None:
        r = self.result
        r.deleted_packs += 1
        r.deleted_bytes += st.size
        if self.dry_run:
            return
        try:
            self.store.backend.delete(pack_name(pid))
        except OSError as exc:
            raise StoreIOError(f"cannot delete pack {pid.hex()}: {exc.strerror}") from None


    def _unlink(self, name: str) -> None:
        try:
            self.store.backend.delete(name)
        except OSError as exc:
            raise StoreIOError(f"cannot delete {self.store.at(name)}: {exc.strerror}") from None


def set_aside(store: Store, name: str) -> None:
    """Moves the generation file `name` to NAME/damaged/ (created if needed), durably."""
    aside = store.at(SET_ASIDE_DIR)
    backend = store.backend
    try:
        backend.make_folder(SET_ASIDE_DIR)
        try:
            backend.rename(f"generations/{name}", f"{SET_ASIDE_DIR}/{name}")
        except FileExistsError:
            # Set aside before, and put back since: the copy in generations/ is the newer.
            backend.delete(f"{SET_ASIDE_DIR}/{name}")
            backend.rename(f"generations/{name}", f"{SET_ASIDE_DIR}/{name}")
    except FileNotFoundError:
        return
    except OSError as exc:
        raise StoreIOError(f"cannot move generation {name} to {aside}: {exc.strerror}") from None
    backend.sync(SET_ASIDE_DIR)
    backend.sync("generations")
    log.warning("moved generation %s, which cannot be read, to %s", name, aside)


def set_aside_names(store: Store) -> list[str]:
    """Names of the generation files set aside in NAME/damaged/."""
    try:
        return list(iter_names(store.backend.list(SET_ASIDE_DIR)))
    except OSError:
        return []
