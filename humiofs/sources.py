"""The stores a mount shows: opening them with the key, which generation each shows, and the
stores that appear in BACKUP_DIR after the mount started. FUSE-free and thread-safe."""
from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from humiofs import generations
from humiofs.errors import NoSuchStore, StoreError, WrongKey
from humiofs.format import Generation, generation_time
from humiofs.keys import Passphrase
from humiofs.localstate import LocalState
from humiofs.store import Store, list_stores, looks_like_store

log = logging.getLogger(__name__)


class Source:
    """One opened store and the generations the mount shows of it."""

    def __init__(self, store: Store, at: generations.At | None,
                 state: LocalState | None = None) -> None:
        self.store = store
        self.name = store.name.encode()
        # What inode numbers derive from (inodes.py): the store's own random id, the same
        # whatever the folder is called or wherever BACKUP_DIR is mounted.
        self.view = store.store_id
        self.at = at
        self.state = state          # rollback detection, when NAME/ shows the latest
        self.names: list[str] = []
        self.gens: dict[str, Generation] = {}
        self.bad: set[str] = set()
        self.current: Generation | None = None
        self.checked = -1e9
        self.told: tuple[str, str] | None = None    # (shown, newest damaged) last logged
        self.rollback_told: str | None = None

    def stale(self, every_s: float) -> bool:
        return time.monotonic() - self.checked > every_s

    def refresh(self) -> None:
        """Lists the generations again and picks the one NAME/ shows (blocking I/O): the
        latest that reads back, as restore and ls take it (generations.pick)."""
        names = self.store.list_generations()
        current = None
        skipped = []
        partial = set()         # checkpoints (FORMAT.md 7.4): neither NAME/ nor .generations
        for name in reversed(names):
            if self.at is not None and not self.at.admits(name):
                continue
            current = self.generation(name)
            if current is None and name not in self.bad:
                partial.add(name)       # gone since the listing: superseded or pruned
                continue
            if current is not None and current.checkpoint and (self.at is None
                                                               or self.at.name != name):
                partial.add(name)
                current = None
                continue
            if current is not None:
                break
            skipped.append(name)
        if skipped and current is not None and (current.name, skipped[0]) != self.told:
            self.told = (current.name, skipped[0])
            log.warning("backup %s: %s/ shows %s, the latest intact generation; the newer "
                        "%s damaged (run humiofs check)", self.store.name, self.store.name,
                        generations.describe(current),
                        ", ".join(skipped) + (" is" if len(skipped) == 1 else " are"))
        if self.state is not None and self.at is None:
            rollback = self.state.observe(self.store, current.name if current else None, names)
            if rollback and rollback != self.rollback_told:
                log.warning("backup %s: %s", self.store.name, rollback)
            self.rollback_told = rollback
        # Every checkpoint is passed by, also one older than the latest complete generation
        # (a run killed between its final commit and deleting its checkpoint leaves it, and
        # the next writer or prune removes it). Each generation is loaded once (cached).
        for name in names:
            if name in partial or (current is not None and name == current.name):
                continue
            gen = self.generation(name)
            if (gen is None and name not in self.bad) or (
                    gen is not None and gen.checkpoint
                    and (self.at is None or self.at.name != name)):
                partial.add(name)
        self.names = [n for n in names if n not in partial]
        self.current, self.checked = current, time.monotonic()

    def generation(self, name: str) -> Generation | None:
        """The generation `name`, loaded once; None (with one warning) if it is damaged."""
        gen = self.gens.get(name)
        if gen is None and name not in self.bad:
            try:
                gen = generations.load_listed(self.store, name)
                if gen is not None:     # else superseded or pruned since the listing
                    self.gens[name] = gen
            except StoreError as exc:
                self.bad.add(name)
                log.warning("backup %s: leaving out damaged generation %s: %s",
                            self.store.name, name, exc)
        return gen

    def time_names(self) -> list[tuple[bytes, str]]:
        """(folder name, generation name) for every generation: the commit time in ISO 8601
        basic format to the millisecond (generations.folder_time)."""
        return [(generations.folder_time(generation_time(n)).encode(), n) for n in self.names]


def open_sources(backup_dir: Path, key: str | Passphrase, name: str | None = None,
                 allow_none: bool = False) -> list[Store]:
    """Opens every store in `backup_dir` that `key` opens (or only `name`).

    A store the key does not open is left out with a warning; if it opens none, WrongKey. With
    `allow_none`, a BACKUP_DIR without stores (or none at all yet) gives [] instead of
    NoSuchStore. The Argon2id unwraps run one after another: run concurrently in threads, the
    `cryptography` Argon2id (lanes > 1) deadlocks, and each unwrap already uses several cores.
    """
    if name is not None:
        if not looks_like_store(backup_dir / name):
            raise NoSuchStore(f"no humiofs store at {backup_dir / name}")
        return [Store.open(backup_dir / name, key)]
    names = list_stores(backup_dir)
    if not names:
        if allow_none:
            return []
        raise NoSuchStore(f"no humiofs backups in {backup_dir}")
    stores = []
    damaged: list[StoreError] = []
    for n in names:
        try:
            stores.append(Store.open(backup_dir / n, key))
        except WrongKey:
            log.warning("the key does not open the backup %s; it is left out of the mount", n)
        except StoreError as exc:
            log.warning("backup %s is left out of the mount: %s", n, exc)
            damaged.append(exc)
    if not stores and len(damaged) == len(names):
        raise damaged[0]      # not a matter of the key: say what is wrong with the store
    if not stores:
        raise WrongKey(f"the key does not open any store in {backup_dir} ({', '.join(names)}). "
                       f"{Passphrase.of(key).check_advice()}. If the key is lost, nobody can "
                       "read these backups")
    return stores


class NewStores:
    """Watches BACKUP_DIR for stores created after the mount started, and opens them with the
    key (one Argon2id unwrap each, in the caller's thread). A store the key does not open, or
    that is damaged, is told once and not tried again while it stays so."""

    def __init__(self, backup_dir: Path, key: Passphrase, known: list[Store]) -> None:
        self.backup_dir, self.key = backup_dir, key
        self.checked = time.monotonic()
        self._seen = {s.path.name for s in known}
        self._lock = threading.Lock()

    def stale(self, every_s: float) -> bool:
        return time.monotonic() - self.checked > every_s

    def poll(self) -> list[Store]:
        """The stores that appeared since the last poll and that the key opens (blocking)."""
        with self._lock:
            self.checked = time.monotonic()
            try:
                names = list_stores(self.backup_dir)
            except StoreError as exc:
                log.debug("%s", exc)
                return []
            opened = []
            for n in names:
                if n in self._seen:
                    continue
                self._seen.add(n)
                try:
                    opened.append(Store.open(self.backup_dir / n, self.key))
                    log.info("backup %s appeared; it is now in the mount", n)
                except WrongKey:
                    log.warning("the key does not open the backup %s; it is left out of the "
                                "mount", n)
                except StoreError as exc:
                    log.warning("backup %s is left out of the mount: %s", n, exc)
            return opened
