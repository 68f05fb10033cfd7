"""Retention (docs/FORMAT.md section 10): which generations to keep, and removing every store
file that no kept generation needs, crash-safely and next to a running writer and mounts.
"""
from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from humiofs.errors import NoSuchObject, StoreError, StoreIOError, StoreLocked
from humiofs.store import journal
from humiofs.store.durable import (
    NotRegularFile,
    fsync_dir,
    open_store_file,
    read_store_file,
    store_io_error,
)
from humiofs.store.format import DIR, FILE, Generation, Ref
from humiofs.store.generations import NO_GENERATION_OPENS, format_time
from humiofs.store.repository import PACK_NAME, Store, list_packs
from humiofs.store.storemeta import refuse_planted

log = logging.getLogger(__name__)

HOUR_MS = 3_600_000
DAY_MS = 86_400_000
DEFAULT_GRACE_S = 3600.0
LOCK_NAME = "prune.lock"
RECORD_DIR = "prune"
# Generation files that cannot be read, moved out of generations/ by `prune
# --set-aside-damaged` (FORMAT.md 10.4): kept for a look, used by nothing.
SET_ASIDE_DIR = "damaged"
RECORD_NAME = re.compile(r"^(\d{13})-([0-9a-f]{16})$")
# The diff keeps the listings it read, up to this many entries in all (not listings: a folder
# may hold a hundred thousand files, and memory must not follow the node's size).
_TREE_CACHE_ENTRIES = 1 << 18


@contextmanager
def prune_lock(store: Store, wait: bool = False, reading: bool = False) -> Iterator[None]:
    """Holds NAME/prune.lock, which keeps prunes (and checks) from overlapping; raises
    StoreLocked if another holds it, unless `wait`.

    The file is never written. It is not the writer lock: prune runs next to a writer.
    `reading` (check): on a store this process cannot write (a read-only disk), a missing
    lock file cannot be made and is not needed: no prune has run there through this path.
    """
    path = store.path / LOCK_NAME
    if not reading:
        refuse_planted(store.path)
    try:
        fd = open_store_file(path, os.O_RDONLY | os.O_CREAT)
    except NotRegularFile as exc:
        if not reading:
            raise StoreError(f"{path} is {exc.strerror}: move it out of the store (the next "
                             "prune makes the file again)") from None
        log.debug("%s is %s: checking without it (check reports it)", path, exc.strerror)
        yield
        return
    except OSError as exc:
        if not (reading and exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM)):
            raise store_io_error(exc, str(path)) from None
        try:
            fd = open_store_file(path)
        except FileNotFoundError:
            log.debug("%s is missing and cannot be made: checking without it", path)
            yield
            return
        except OSError as exc2:
            raise StoreIOError(f"cannot open {path}: {exc2.strerror}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                raise StoreLocked(f"a prune or check is running on {store.path}; "
                                  "try again when it has finished") from None
            log.warning("a prune or check is running on %s; waiting for it", store.path)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


# -- the policy -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Decision:
    """Whether a generation is kept, and why (empty reason: dropped).

    `compared`: it was compared with its successor (FORMAT.md 10.1), which happens whenever
    that successor is younger than DELETE_BACKUP_AFTER_MILLIS. `gone_ms` is then when paths of
    it first went missing (the successor's time), with one of them in `gone_path`, or None if
    the successor holds them all.
    """

    name: str
    keep: bool
    reason: str
    compared: bool = False
    gone_ms: int | None = None
    gone_path: bytes | None = None


def plan(gens: list[tuple[str, Generation | None]], now_ms: int, delete_after_ms: int,
         lacks: Callable[[Generation, Generation], bytes | None]) -> list[Decision]:
    """Decides, for generations given oldest first, which ones retention keeps.

    Each readable generation is compared with its successor, the next readable one in this
    full list (kept or not), so the time a path went missing is that of the first generation
    that lacked it, however many generations after it earlier prunes dropped. `lacks(g, n)`
    returns a path that `g` has and the newer `n` does not (None if there is none). A
    generation that cannot be read (None) is always kept. See FORMAT.md section 10.1.
    """
    checkpoints = [i for i, (_, gen) in enumerate(gens) if gen is not None and gen.checkpoint]
    if checkpoints:
        # FORMAT.md 7.4: a checkpoint is kept until a readable complete generation is newer;
        # the rules below see the complete generations only.
        rest = [i for i in range(len(gens)) if i not in set(checkpoints)]
        decided = dict(zip(rest, plan([gens[i] for i in rest], now_ms, delete_after_ms, lacks)))
        complete = [i for i in rest if gens[i][1] is not None]
        newest_complete = complete[-1] if complete else -1
        for i in checkpoints:
            name = gens[i][0]
            decided[i] = (Decision(name, True, "checkpoint of a backup that has not finished: "
                                   "the next run resumes from it") if i > newest_complete
                          else Decision(name, False, ""))
        return [decided[i] for i in range(len(gens))]
    young_from = now_ms - delete_after_ms
    hourly_from = now_ms - min(DAY_MS, delete_after_ms)
    readable = [(i, gen) for i, (_, gen) in enumerate(gens) if gen is not None]
    reasons: list[list[str]] = [[] for _ in gens]
    compared: set[int] = set()
    gone: dict[int, tuple[int, bytes]] = {}
    if readable:
        reasons[readable[-1][0]].append("latest")
    # Rules 2 and 3: a generation holding a path its successor lacks, while that successor
    # (the first without the path) is younger than D; and that successor, which dates it.
    for (i, gen), (j, succ) in zip(readable, readable[1:]):
        if succ.time_ms <= young_from:
            continue        # whatever it lacks went missing more than D ago: no diff needed
        compared.add(i)
        path = lacks(gen, succ)
        if path is None:
            continue
        gone[i] = (succ.time_ms, path)
        shown, until = os.fsdecode(path), format_time(succ.time_ms + delete_after_ms)
        reasons[i].append(f"holds {shown}, gone at {format_time(succ.time_ms)}, "
                          f"kept until {until}")
        reasons[j].append(f"first without {shown}: dates its deletion until {until}")
    # Rules 4 and 5: the newest readable generation of each recent hour and day.
    hours: set[int] = set()
    days: set[int] = set()
    for i, gen in reversed(readable):
        hour, day = gen.time_ms // HOUR_MS, gen.time_ms // DAY_MS
        if gen.time_ms > hourly_from and hour not in hours:
            reasons[i].append("last of its hour")
        elif gen.time_ms > young_from and day not in days:
            reasons[i].append("last of its day")
        hours.add(hour)
        days.add(day)
    out = []
    for i, (name, maybe) in enumerate(gens):
        if maybe is None:
            out.append(Decision(name, True, "unreadable, kept as it is"))
            continue
        when, path = gone.get(i, (None, None))
        out.append(Decision(name, bool(reasons[i]), "; ".join(reasons[i]), i in compared,
                            when, path))
    return out


class TreeDiff:
    """`lacks` for `plan`: a path of one generation missing from another, found by a tree
    walk that skips equal subtrees (unchanged folders share their refs)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._cache: dict[Ref, dict[bytes, tuple[int, Ref | None]]] = {}
        self._cached = 0        # entries in _cache
        self.damaged: list[str] = []

    def _entries(self, ref: Ref) -> dict[bytes, tuple[int, Ref | None]]:
        got = self._cache.get(ref)
        if got is None:
            got = {e.name: (e.type, e.subtree) for e in self.store.read_tree(ref)}
            if self._cached + len(got) > _TREE_CACHE_ENTRIES:
                self._cache.clear()
                self._cached = 0
            self._cache[ref] = got
            self._cached += len(got)
        return got

    def _missing(self, g: Ref, k: Ref, rel: bytes) -> bytes | None:
        if g == k:
            return None
        theirs = self._entries(k)
        for name, (etype, sub) in self._entries(g).items():
            path = rel + b"/" + name if rel else name
            other = theirs.get(name)
            if other is None or other[0] != etype:
                return path
            if etype == DIR and sub is not None and other[1] is not None:
                found = self._missing(sub, other[1], path)
                if found is not None:
                    return found
        return None

    def __call__(self, g: Generation, k: Generation) -> bytes | None:
        try:
            return self._missing(g.root.tree, k.root.tree, b"")
        except StoreError as exc:
            self.damaged.append(f"generation {g.name} or {k.name}: {exc}")
            return b"(unreadable)"     # keeps g: never drop what cannot be compared


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
    """Parses prune/NAME; raises ValueError if it is malformed."""
    m = RECORD_NAME.match(name)
    if not m:
        raise ValueError("not a prune record name")
    doc = json.loads(read_store_file(store.path / RECORD_DIR / name, 64 << 20))
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
                st = os.stat(self.store.path / "generations" / name)
            except FileNotFoundError:
                continue
            cutoff = max(cutoff, st.st_mtime_ns)
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
        gdir = self.store.path / "generations"
        for name in names:
            try:
                os.unlink(gdir / name)
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise StoreIOError(f"cannot delete generation {name}: {exc.strerror}") from None
            log.info("removed generation %s", name)
        fsync_dir(gdir)

    def _packs(self, packs: dict[bytes, os.stat_result], needed: set[bytes],
               cutoff_ns: int | None) -> None:
        """Deletes recorded packs whose grace is over, and records (or with grace 0 deletes)
        the other unneeded ones: all of them if no writer runs (`cutoff_ns` None), else those
        older than `cutoff_ns`."""
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
                _unlink(self.store.path / RECORD_DIR / rec.name)
        unneeded = {pid: st for pid, st in packs.items() if pid not in needed}
        r.pending_packs = len(pending & unneeded.keys())
        condemn = {pid: st for pid, st in unneeded.items()
                   if pid not in pending and (cutoff_ns is None or st.st_mtime_ns < cutoff_ns)}
        r.young_packs = len(unneeded) - r.pending_packs - len(condemn)
        if not condemn:
            return
        if self.grace_ms <= 0:
            for pid, st in sorted(condemn.items()):
                self._delete_pack(pid, st)
            return
        r.condemned_packs = len(condemn)
        r.condemned_bytes = sum(st.st_size for st in condemn.values())
        if not self.dry_run:
            self._write_record(sorted(condemn))

    def _records(self) -> list[Record]:
        rdir = self.store.path / RECORD_DIR
        try:
            names = sorted(os.listdir(rdir))
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
                    _unlink(rdir / name)
        return out

    def _write_record(self, packs: list[bytes]) -> None:
        rdir = self.store.path / RECORD_DIR
        try:
            os.mkdir(rdir, 0o700)
            fsync_dir(self.store.path)
        except FileExistsError:
            pass
        except OSError as exc:
            raise StoreIOError(f"cannot create {rdir}: {exc.strerror}") from None
        now_ms = max(self.now_ms, int(time.time() * 1000))
        doc = {"version": 1, "time_ms": now_ms, "packs": [p.hex() for p in packs]}
        name = f"{now_ms:013d}-{os.urandom(8).hex()}"
        self.store.write_file(f"{RECORD_DIR}/{name}", json.dumps(doc).encode() + b"\n")

    def _delete_pack(self, pid: bytes, st: os.stat_result) -> None:
        r = self.result
        r.deleted_packs += 1
        r.deleted_bytes += st.st_size
        if self.dry_run:
            return
        try:
            os.unlink(self.store.pack_path(pid))
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise StoreIOError(f"cannot delete pack {pid.hex()}: {exc.strerror}") from None


def set_aside(store: Store, name: str) -> None:
    """Moves the generation file `name` to NAME/damaged/ (created if needed), durably."""
    aside = store.path / SET_ASIDE_DIR
    try:
        try:
            os.mkdir(aside, 0o700)
            fsync_dir(store.path)
        except FileExistsError:
            pass
        os.rename(store.path / "generations" / name, aside / name)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise StoreIOError(f"cannot move generation {name} to {aside}: {exc.strerror}") from None
    fsync_dir(aside)
    fsync_dir(store.path / "generations")
    log.warning("moved generation %s, which cannot be read, to %s", name, aside)


def set_aside_names(store_path: os.PathLike[str]) -> list[str]:
    """Names of the generation files set aside in NAME/damaged/."""
    try:
        return sorted(os.listdir(os.path.join(store_path, SET_ASIDE_DIR)))
    except OSError:
        return []


def _unlink(path: os.PathLike[str]) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise StoreIOError(f"cannot delete {os.fspath(path)}: {exc.strerror}") from None
