"""Checkpoints of a running backup (docs/FORMAT.md 7.4): when one is due, the partial trees
of the folders the walk is inside of, and removing the checkpoints a newer generation
supersedes.

The writer (writer.py) keeps one `Level` per folder it is inside of; a checkpoint encodes them
bottom-up: the entries finished so far, the partial folder below, and the parent
generation's entries for the names not reached yet.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import FrameType

from humiofs.errors import StoreError
from humiofs.store import generations
from humiofs.store.format import DIR, Entry, Ref, Xattrs
from humiofs.store.repository import Store

log = logging.getLogger(__name__)


@dataclass
class Level:
    """One folder the walk is inside of: `rel` (bytes, relative to the source), the entries
    finished so far (sorted by name), the parent generation's entries by name, `pos` (the
    name being or last processed), and `sub`: the subfolder at `pos` being walked, as
    (os.stat_result of it, its xattrs, its previous entry or None)."""

    rel: bytes
    entries: list[Entry]
    prev: dict[bytes, Entry]
    pos: bytes = b""
    sub: tuple[os.stat_result, Xattrs, Entry | None] | None = None


def partial_root(levels: list[Level], store_tree: Callable[[list[Entry]], Ref],
                 make_dir_entry: Callable[[bytes, os.stat_result, Ref, int, Xattrs], Entry]
                 ) -> Ref:
    """The ref of a root tree holding what `levels` (outermost first) have finished, plus
    the previous entries of the names not reached yet. `store_tree(entries)` stores one tree
    and returns its ref; `make_dir_entry(name, st, subtree, nlink, xattrs)` builds a folder
    entry."""
    below: Entry | None = None
    ref: Ref | None = None
    for i in range(len(levels) - 1, -1, -1):
        level = levels[i]
        entries = list(level.entries)
        if below is not None:
            entries.append(below)
        # Names after `pos` not reached yet: the parent's entries, as they were.
        entries.extend(e for name, e in sorted(level.prev.items()) if name > level.pos)
        ref = store_tree(entries)
        if i > 0:
            up = levels[i - 1]
            if up.sub is None:
                raise ValueError("a folder below one that is not being walked")
            st, attrs, old = up.sub
            nlink = old.nlink if old is not None and old.type == DIR else 2
            below = make_dir_entry(up.pos, st, ref, nlink, attrs)
    if ref is None:
        raise ValueError("no levels")
    return ref


@dataclass
class Policy:
    """When a checkpoint is due: every `seconds` or `bytes` stored (0 turns one off), or at
    once when asked to stop (`requested`, set from a signal handler, or `stop()` true)."""

    seconds: int = 0
    bytes: int = 0
    stop: Callable[[], bool] | None = None
    requested: bool = False
    _since: float = field(default_factory=time.monotonic)
    _stored_at: int = 0
    _calls: int = 0

    def due(self, stored: int) -> bool:
        """Asked after every entry (`stop` too: an entry after it is kept from the parent,
        not read); looks at the clock every 64th time only (a no-change run asks a million
        times)."""
        if self.requested:
            return True
        if self.stop is not None and self.stop():
            self.requested = True
            return True
        if self.bytes and stored - self._stored_at >= self.bytes:
            return True
        self._calls += 1
        if self._calls & 63:
            return False
        return bool(self.seconds) and time.monotonic() - self._since >= self.seconds

    def done(self, stored: int) -> None:
        self._since = time.monotonic()
        self._stored_at = stored


@contextmanager
def stop_requests(policy: Policy) -> Iterator[None]:
    """While inside, SIGTERM and SIGINT ask for a checkpoint and a stop (`policy.requested`)
    instead of interrupting at once; a second one interrupts at once (KeyboardInterrupt).
    Does nothing outside the main thread (where handlers cannot be set)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        if policy.requested:
            raise KeyboardInterrupt
        policy.requested = True
        log.info("%s: committing a checkpoint and stopping (send it again to stop at once)",
                 signal.Signals(signum).name)

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def chain(store: Store, newest: str) -> list[str]:
    """The checkpoint `newest` and the checkpoints right before it, back to the newest
    generation that is complete or does not read back: those a generation committed after
    `newest` supersedes (a run killed between writing a checkpoint and deleting the one
    before it leaves two)."""
    out = [newest]
    for name in reversed([n for n in store.list_generations() if n < newest]):
        try:
            gen = generations.load_listed(store, name)
        except StoreError:
            break
        if gen is None:
            continue            # removed since the listing
        if not gen.checkpoint:
            break
        out.append(name)
    return out


def remove_superseded(store: Store, names: list[str]) -> None:
    """Deletes the generation files `names` (checkpoints a newer generation of this writer
    supersedes). A failure costs a warning: prune drops them later (FORMAT.md 10.1)."""
    if not names:
        return
    try:
        for name in names:
            store.backend.delete(f"generations/{name}")
        store.backend.sync("generations")
    except OSError as exc:
        log.warning("could not remove a superseded checkpoint (%s); prune removes it",
                    exc.strerror)
