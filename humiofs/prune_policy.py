"""Retention policy (docs/FORMAT.md section 10.1): which generations prune keeps, and why.
Pure decisions over generations already read; prune.py applies them to a store.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from humiofs.errors import StoreError
from humiofs.store.format import DIR, Generation, Ref
from humiofs.store.generations import format_time
from humiofs.store.repository import Store

HOUR_MS = 3_600_000
DAY_MS = 86_400_000
# The diff keeps the listings it read, up to this many entries in all (not listings: a folder
# may hold a hundred thousand files, and memory must not follow the node's size).
_TREE_CACHE_ENTRIES = 1 << 18


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
