"""The running writer's journal (docs/FORMAT.md section 8): which packs a run has made durable
and which generation it is about to commit, so that what a run leaves behind when it fails or
dies before committing is removed, by the run itself or by the next writer, and never needs a
prune to come back: freeing the space a backup needs is always enough for it to complete.
"""
from __future__ import annotations

import logging
import os
import re
import threading
from typing import TYPE_CHECKING

from humiofs.errors import StoreIOError
from humiofs.store import format
from humiofs.store.backend import Backend, iter_names
from humiofs.store.durable import store_io_error
from humiofs.store.storemeta import at, pack_name

if TYPE_CHECKING:
    from humiofs.store.repository import Store

log = logging.getLogger(__name__)

JOURNAL_NAME = re.compile(r"^[0-9a-f]{16}\.journal$")
_PACK_LINE = re.compile(r"^pack ([0-9a-f]{32})$")
_COMMIT_LINE = re.compile(r"^commit (\S+)$")


class RunJournal:
    """One run's journal, `tmp/<hex16>.journal`, created with the run's first pack.

    `add` is called for each pack before it is renamed into packs/; `committing` before the
    generation is written (made durable: the line must be stored before the generation can
    be); `close` once the generation is written or the run is given up. Thread-safe (packs
    are made durable on a background thread).
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self.name: str | None = None        # the journal's store file, once it has one
        self._lock = threading.Lock()

    def add(self, pack_id: bytes) -> None:
        self._append(f"pack {pack_id.hex()}\n", sync=False)

    def committing(self, generation: str) -> None:
        if self.name is not None:      # a run that stored no pack has nothing to protect
            self._append(f"commit {generation}\n", sync=True)

    def _append(self, line: str, sync: bool) -> None:
        with self._lock:
            if self.name is None:
                self.name = f"tmp/{os.urandom(8).hex()}.journal"
            try:
                self.store.backend.append(self.name, line.encode(), sync)
            except OSError as exc:
                raise store_io_error(exc, "the run's journal") from None

    def close(self, committed: bool) -> None:
        """Closes the journal; removes it if the run's generation is committed (else the
        caller reclaims what it lists, see `reclaim`)."""
        with self._lock:
            if committed and self.name is not None:
                self.store.backend.delete(self.name)
                self.name = None


def read(backend: Backend, name: str) -> tuple[list[bytes], str | None]:
    """The packs the journal `name` lists and the generation it was about to commit (None if
    none). A line cut short by a crash is ignored: it was written before what it announces."""
    packs: list[bytes] = []
    commit = None
    text = backend.read(name, 64 << 20).decode("ascii", "replace")
    for line in text.split("\n"):
        m = _PACK_LINE.match(line)
        if m:
            packs.append(bytes.fromhex(m.group(1)))
            continue
        m = _COMMIT_LINE.match(line)
        if m and format.GENERATION_NAME.match(m.group(1)):
            commit = m.group(1)
    return packs, commit


def journal_names(backend: Backend) -> list[str]:
    """The journals in tmp/, as store file names (`tmp/<hex16>.journal`), sorted."""
    return [f"tmp/{n}" for n in iter_names(backend.list("tmp")) if JOURNAL_NAME.match(n)]


def listed_packs(store: Store) -> set[bytes]:
    """The packs the journals in tmp/ list: those of runs that are under way or were
    interrupted (an unreadable journal lists none)."""
    out: set[bytes] = set()
    try:
        names = journal_names(store.backend)
    except OSError:
        return out
    for name in names:
        try:
            out.update(read(store.backend, name)[0])
        except OSError:
            continue
    return out


def reclaim(store: Store) -> int:
    """Deletes the packs of every run whose journal is in tmp/ and that did not commit its
    generation, and the journals; returns the number of packs deleted. Call only while
    holding the writer lock (no run of another writer can be under way)."""
    backend = store.backend
    journals = journal_names(backend)
    if not journals:
        return 0
    # A pack written after every generation file is referenced by none of them. Asked on
    # top of the journal's word, so that a journal that is wrong (planted, or copied in from
    # elsewhere) can never delete a pack a generation may need; what this keeps, prune
    # removes later.
    gens = set(store.list_generations())
    newest_generation = max((i.time_ns() for i in backend.list("generations")
                             if i.name.rpartition("/")[2] in gens), default=0)
    deleted = 0
    for name in journals:
        try:
            packs, commit = read(backend, name)
        except OSError as exc:
            log.warning("cannot read the journal %s (%s); its packs are left to prune",
                        at(backend, name), exc.strerror)
            packs, commit = [], None
        if commit is not None and _exists(backend, f"generations/{commit}"):
            packs = []              # committed: its generation needs them
        for pid in packs:
            pack = pack_name(pid)
            try:
                if backend.stat(pack).time_ns() <= newest_generation:
                    continue
                backend.delete(pack)
                deleted += 1
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise StoreIOError(f"cannot remove pack {pid.hex()} of a backup run that did "
                                   f"not finish: {exc.strerror}") from None
        try:
            backend.delete(name)
        except FileNotFoundError:
            pass
    if deleted:
        log.info("removed %d pack(s) of a backup run that did not finish", deleted)
    return deleted


def _exists(backend: Backend, name: str) -> bool:
    try:
        backend.stat(name)
    except FileNotFoundError:
        return False
    return True
