"""The stores a mount shows: opening them with the key, which generation each shows, and the
stores that appear in BACKUP_DIR after the mount started. FUSE-free and thread-safe."""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from humiofs.errors import ConfigError, NoSuchStore, StoreError, StoreIOError, WrongKey
from humiofs.store import generations
from humiofs.store.format import Generation, generation_time
from humiofs.store.keys import Passphrase
from humiofs.store.localstate import LocalState
from humiofs.store.backend import Backend, LocationMissing
from humiofs.store.backend.factory import is_remote, open_location, store_at
from humiofs.store.repository import Store, backend_of, list_stores, looks_like_store
from humiofs.store.storemeta import read_config

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PackCache:
    """The mount's on-disk cache of pack bytes from object storage (store/backend/cache.py):
    its folder (BACKUP_CACHE_DIR) and size limit in bytes (BACKUP_CACHE_BYTES), shared by
    every store of the mount."""
    folder: Path
    max_bytes: int

    def check(self) -> bool:
        """Makes the folder now (mode 0700). False, with one warning, if it cannot be (a
        read-only disk, a file in the way): the mount then reads without the cache rather
        than not at all, or with every store left out for it."""
        from humiofs.store.backend.blockfolder import make_folder
        try:
            make_folder(self.folder)
        except OSError as exc:
            log.warning("BACKUP_CACHE_DIR %s: %s; mounting without the cache of pack blocks "
                        "(every read goes to the object storage)", self.folder,
                        exc.strerror or exc)
            return False
        return True


def mount_backend(where: Path | str, cache: PackCache | None) -> Backend:
    """The backend the mount reads the store at `where` (BACKUP_DIR/NAME) through: on object
    storage, behind `cache` (none if None or of 0 bytes); a local folder as it is (its pages
    are in the kernel's cache already). OSError if the cache folder cannot be made."""
    backend = backend_of(where)
    if cache is None or cache.max_bytes <= 0 or not is_remote(where):
        return backend
    from humiofs.store.backend.cache import CachedBackend
    return CachedBackend(backend, cache.folder, cache.max_bytes)


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
        self.gone = False           # moved away or deleted from BACKUP_DIR (see refresh)
        self.forgotten = False      # gone, and NewStores told to open its name again
        self.error: str | None = None   # why the last refresh could not list it, once logged

    def stale(self, every_s: float) -> bool:
        return time.monotonic() - self.checked > every_s

    def still_there(self) -> bool:
        """True while BACKUP_DIR/NAME still holds this store (blocking I/O): not moved away,
        deleted, or replaced by another store of the same name."""
        try:
            return looks_like_store(self.store.backend) and \
                read_config(self.store.backend) == self.store.store_id
        except (StoreError, StoreIOError, OSError):
            return looks_like_store(self.store.backend)     # its config is damaged, not gone

    def refresh(self) -> None:
        """Lists the generations again and picks the one NAME/ shows (blocking I/O): the
        latest that reads back, as restore and ls take it (generations.pick).

        Never raises for the store's own state: a store moved away or deleted from BACKUP_DIR
        is `gone` (told once; it shows nothing until it is back), one that cannot be listed
        shows nothing either (told once per reason), so the rest of the mount keeps working."""
        self.checked = time.monotonic()
        if not self.still_there():
            if not self.gone:
                log.warning("backup %s went away from %s (moved or deleted); it is left out of "
                            "the mount until it is back", self.store.name,
                            str(self.store.path).rpartition("/")[0])
            self.gone, self.names, self.current = True, [], None
            return
        if self.gone:
            log.info("backup %s is back in %s; it is in the mount again", self.store.name,
                     str(self.store.path).rpartition("/")[0])
            self.gone = False
        try:
            names = self.store.list_generations()
        except StoreError as exc:
            if not self.still_there():
                return self.refresh()           # went away while being listed
            if str(exc) != self.error:
                log.warning("backup %s is left out of the mount for now: %s", self.store.name,
                            exc)
            self.error, self.names, self.current = str(exc), [], None
            return
        self.error = None
        current = None
        skipped = []
        partial = set()         # checkpoints (FORMAT.md 7.4): neither NAME/ nor .generations
        for name in reversed(names):
            if self.at is not None and not self.at.admits(name):
                continue
            current = self.generation(name)
            if self._passed_by(name, current):
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
            if self._passed_by(name, self.generation(name)):
                partial.add(name)
        self.names = [n for n in names if n not in partial]
        self.current, self.checked = current, time.monotonic()

    def _passed_by(self, name: str, gen: Generation | None) -> bool:
        """True if neither NAME/ nor .generations shows generation `name` (loaded as `gen`):
        it is gone since the listing (superseded or pruned; a damaged one is in `bad`), or it
        is a checkpoint (FORMAT.md 7.4) that --at did not name."""
        if gen is None:
            return name not in self.bad
        return gen.checkpoint and (self.at is None or self.at.name != name)

    def generation(self, name: str) -> Generation | None:
        """The generation `name`, loaded once; None (with one warning) if it is damaged."""
        gen = self.gens.get(name)
        if gen is None and name not in self.bad:
            try:
                gen = generations.load_listed(self.store, name)
                if gen is not None:     # else superseded or pruned since the listing
                    self.gens[name] = gen
            except StoreError as exc:
                if not self.still_there():
                    return None         # not damaged: the store went away (refresh tells)
                self.bad.add(name)
                log.warning("backup %s: leaving out damaged generation %s: %s",
                            self.store.name, name, exc)
        return gen

    def time_names(self) -> list[tuple[bytes, str]]:
        """(folder name, generation name) for every generation: the commit time in ISO 8601
        basic format to the millisecond (generations.folder_time)."""
        return [(generations.folder_time(generation_time(n)).encode(), n) for n in self.names]


def backup_dir_stores(backup_dir: Path | str) -> list[str]:
    """list_stores, with a BACKUP_DIR that is not a readable folder a ConfigError (exit 2) of
    one line: a file, a symlink loop or a folder without read permission is a setting to fix,
    not a damaged store. A BACKUP_DIR that does not exist (yet) holds no stores."""
    location = open_location(backup_dir)
    try:
        location.names()
    except LocationMissing as exc:      # a missing bucket: a setting to fix
        raise ConfigError(str(exc.strerror)) from None
    except FileNotFoundError:
        return []
    except NotADirectoryError:
        raise ConfigError(f"BACKUP_DIR {backup_dir} is not a folder; set BACKUP_DIR to the "
                          "folder that holds the backups") from None
    except OSError as exc:
        if is_remote(backup_dir):
            # The service refused us (403) or could not be reached: exit 7 as for every
            # command (README, exit codes), not a setting (2).
            raise StoreIOError(f"cannot read BACKUP_DIR {backup_dir}: {exc.strerror}") from None
        raise ConfigError(f"cannot read BACKUP_DIR {backup_dir}: {exc.strerror}") from None
    return list_stores(location)


def open_sources(backup_dir: Path | str, key: str | Passphrase, name: str | None = None,
                 allow_none: bool = False, cache: PackCache | None = None) -> list[Store]:
    """Opens every store in `backup_dir` that `key` opens (or only `name`), each read
    through `cache` if it is on object storage (mount_backend).

    A store the key does not open, or that cannot be opened (damaged, unreadable), is left out
    with one warning. If none opens: with `allow_none` (a mount that watches BACKUP_DIR for
    stores to come), [] with one more warning; else WrongKey, or the first store's error if
    none failed for the key. A BACKUP_DIR without stores (or none at all yet) gives [] with
    `allow_none`, else NoSuchStore; one that is not a readable folder is a ConfigError. The
    Argon2id unwraps run one after another: run concurrently in threads, the `cryptography`
    Argon2id (lanes > 1) deadlocks, and each unwrap already uses several cores.
    """
    if name is not None:
        backup_dir_stores(backup_dir)       # a BACKUP_DIR that is no readable folder: exit 2
        if not looks_like_store(backend_of(store_at(backup_dir, name))):
            raise NoSuchStore(f"no humiofs store at {store_at(backup_dir, name)}")
        return [_unlock(store_at(backup_dir, name), key, cache)]
    names = backup_dir_stores(backup_dir)
    if not names:
        if allow_none:
            return []
        raise NoSuchStore(f"no humiofs backups in {backup_dir}")
    stores = []
    damaged: list[StoreError | StoreIOError] = []
    for n in names:
        store = _open(store_at(backup_dir, n), key, cache)
        if isinstance(store, Store):
            stores.append(store)
        elif store is not None:
            damaged.append(store)
    if stores:
        return stores
    if allow_none:
        if len(damaged) < len(names):
            log.warning("the key opens none of the backups in %s (%s); the mount shows each "
                        "backup it opens once it appears. %s", backup_dir, ", ".join(names),
                        Passphrase.of(key).check_advice())
        return []
    if len(damaged) == len(names):
        raise damaged[0]      # not a matter of the key: say what is wrong with the store
    raise WrongKey(f"the key does not open any store in {backup_dir} ({', '.join(names)}). "
                   f"{Passphrase.of(key).check_advice()}. If the key is lost, nobody can "
                   "read these backups")


def _open(path: Path | str, key: str | Passphrase, cache: PackCache | None
          ) -> Store | StoreError | StoreIOError | None:
    """The store at `path`; else, told once in the log, None if the key does not open it or
    the error that keeps it out of the mount."""
    name = str(path).rstrip("/").rpartition("/")[2]
    try:
        return _unlock(path, key, cache)
    except WrongKey:
        log.warning("the key does not open the backup %s; it is left out of the mount",
                    name)
        return None
    except (StoreError, StoreIOError) as exc:       # damaged; or unreadable to this user
        log.warning("backup %s is left out of the mount: %s", name, exc)
        return exc
    except OSError as exc:      # an OS error Store.open does not map (a permission, say)
        log.warning("backup %s is left out of the mount: cannot open it: %s", name,
                    exc.strerror or exc)
        return StoreError(f"cannot open {path}: {exc.strerror or exc}")


def _unlock(path: Path | str, key: str | Passphrase, cache: PackCache | None) -> Store:
    """Store.open through mount_backend; a backend whose store does not open is closed."""
    backend = mount_backend(path, cache)
    try:
        return Store.open(backend, key)
    except BaseException:
        backend.close()
        raise


class NewStores:
    """Watches BACKUP_DIR for stores created after the mount started (or moved back, or
    replaced), and opens them with the key (one Argon2id unwrap each, in the caller's thread).
    A store the key does not open, or that is damaged, is told once and not tried again while
    its name stays in BACKUP_DIR."""

    def __init__(self, backup_dir: Path | str, key: Passphrase, known: list[str],
                 cache: PackCache | None = None) -> None:
        self.backup_dir, self.key, self.cache = backup_dir, key, cache
        self.checked = time.monotonic()
        self._seen = set(known)
        self._lock = threading.Lock()

    def stale(self, every_s: float) -> bool:
        return time.monotonic() - self.checked > every_s

    def forget(self, name: str) -> None:
        """Opens the store `name` again at the next poll that finds it (it went away)."""
        with self._lock:
            self._seen.discard(name)

    def poll(self) -> list[Store]:
        """The stores that appeared since the last poll and that the key opens (blocking)."""
        with self._lock:
            self.checked = time.monotonic()
            try:
                names = list_stores(self.backup_dir)
            except (StoreError, StoreIOError) as exc:
                log.debug("%s", exc)
                return []
            # A name that left BACKUP_DIR is tried again if it comes back.
            self._seen &= set(names)
            opened = []
            for n in names:
                if n in self._seen:
                    continue
                self._seen.add(n)
                store = _open(store_at(self.backup_dir, n), self.key, self.cache)
                if isinstance(store, Store):
                    opened.append(store)
                    log.info("backup %s appeared; it is now in the mount", n)
            return opened
