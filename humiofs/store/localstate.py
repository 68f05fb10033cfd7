"""Rollback detection (docs/FORMAT.md section 9.1): this host's record, kept outside the
store, of the newest generation of each store that it committed or saw, and the warning when a
store's newest generation is older than that.

The record is `BACKUP_STATE_DIR/<store id>-<place>.json` (`place` from the store's path),
plaintext: the store id, the store's path and a generation name, which hold nothing the store does not show anyway. Nothing
here ever fails a command: a record that cannot be written or read is one warning per process,
and the command carries on.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from humiofs.errors import StoreError
from humiofs.store import format
from humiofs.store.backend.factory import is_remote
from humiofs.store.generations import complete_name, format_time

if TYPE_CHECKING:
    from humiofs.store.repository import Store

log = logging.getLogger(__name__)

_warned: set[str] = set()


def _place(store_path: Path | str) -> str:
    """A short hash of where the store is: its real folder, or its s3:// URL."""
    where = str(store_path) if is_remote(store_path) else os.path.realpath(store_path)
    return hashlib.blake2b(os.fsencode(where), digest_size=8).hexdigest()


class LocalState:
    """The records in one state folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    @classmethod
    def of(cls, folder: Path | None) -> LocalState | None:
        """The records in BACKUP_STATE_DIR, or None where no folder is set (a Config made in
        code, not from settings)."""
        return None if folder is None else cls(folder)

    def _path(self, store_id: bytes, store_path: Path | str) -> Path:
        # Per store id and place: a copy of a store elsewhere (a clone, a restore from an
        # older copy) has the same id but is not a rollback of this one.
        place = _place(store_path)
        return self.folder / f"{store_id.hex()}-{place}.json"

    def _trouble(self, what: str, exc: OSError) -> None:
        """One warning per state folder and process; the command carries on without it."""
        key = str(self.folder)
        if key not in _warned:
            _warned.add(key)
            log.warning("cannot %s (%s); rollback detection (BACKUP_STATE_DIR) is off for this "
                        "run", what, exc.strerror)

    def recorded(self, store_id: bytes, store_path: Path | str) -> str | None:
        """The newest generation this host recorded for the store at `store_path`, or None."""
        path = self._path(store_id, store_path)
        try:
            doc = json.loads(path.read_bytes())
        except FileNotFoundError:
            # humiofs 0.2 kept one record per store id: it counts where it names this place.
            try:
                doc = json.loads((self.folder / f"{store_id.hex()}.json").read_bytes())
            except (OSError, ValueError):
                return None
            if not isinstance(doc, dict) or doc.get("store") != str(store_path):
                return None
        except OSError as exc:
            self._trouble(f"read {path}", exc)
            return None
        except ValueError:
            log.warning("%s is not a record of humiofs; ignoring it", path)
            return None
        name = doc.get("newest") if isinstance(doc, dict) else None
        if not isinstance(name, str) or not format.GENERATION_NAME.match(name):
            log.warning("%s is not a record of humiofs; ignoring it", path)
            return None
        return name

    def known_place(self, store_path: Path | str) -> bool:
        """True if this host recorded a store at `store_path` (whatever its id): a backup
        --watch then waits for that store rather than create a new one there."""
        place = _place(store_path)
        try:
            return any(name.endswith(f"-{place}.json") for name in os.listdir(self.folder))
        except OSError:
            return False

    def record(self, store: Store, newest: str) -> None:
        """Records `newest` (a complete generation this host just committed) if it is later
        than the record: `observe` without the rollback check, which needs a listing of the
        store's generations (a request on object storage) and whose warning a writer that
        has just committed has no use for."""
        self._record(store.store_id, store.path, newest)

    def observe(self, store: Store, newest: str | None,
                names: list[str] | None = None, record: bool = True) -> str | None:
        """Compares the store with the record, given its newest generation that authenticated
        (`newest`; None: it has none) and the names of its generation files (listed here if
        not given); then records `newest` if it is later than the record (unless not
        `record`: a dry run changes nothing). Returns the rollback
        warning if the generation recorded is gone from the store and newer than every
        generation that authenticates there, else None."""
        store_id, store_path = store.store_id, store.path
        if names is None:
            names = store.list_generations()
        recorded = self.recorded(store_id, store_path)
        if recorded is not None and recorded not in names:
            # A writer commits its generation, then records it: one committed after `names`
            # was listed may be on record already. Listed again, after the record was read,
            # such a generation is there; a deleted one is not.
            try:
                names = store.list_generations()
            except StoreError:
                pass
        warning = None
        # A generation `prune --set-aside-damaged` moved to NAME/damaged/ (prune.SET_ASIDE_DIR)
        # is known damage, reported by check, not a rollback; but only if it really fails to
        # read there: an intact file (or nothing) under its name is a rollback (FORMAT.md 9.1).
        if recorded is not None and recorded not in names and (newest is None or
                                                               recorded > newest) \
                and not _set_aside_damaged(store, recorded):
            warning = (
                f"the store {store_path} was rolled back: its newest generation is "
                + (f"{newest} ({format_time(format.generation_time(newest))})" if newest
                   else "none") + f", but this host committed or saw {recorded} "
                f"({format_time(format.generation_time(recorded))}), which is gone from it. "
                "Generations were deleted from the store, or it was replaced by an older copy. "
                "If that was not done on purpose, look at who can write the backup drive; "
                "restore from the generations that are there, and keep the store as it is. "
                "The next backup makes a newer generation, and this warning stops")
        if record and newest is not None and (recorded is None or newest > recorded):
            self._record(store_id, store_path, newest)
        return warning

    def rollback_of(self, store: Store, record: bool = True) -> str | None:
        """`observe` with the store's newest generation that authenticates, looked up here:
        the rollback warning, or None. Prune asks before it deletes anything."""
        names = store.list_generations()
        newest = None
        for name in reversed(names):
            try:
                gen = store.load_generation(name)
            except StoreError:
                continue
            # Only complete generations are recorded (FORMAT.md 9.1): a checkpoint stands
            # for its base.
            newest = complete_name(gen)
            break
        return self.observe(store, newest, names, record)

    def _record(self, store_id: bytes, store_path: Path | str, newest: str) -> None:
        try:
            os.makedirs(self.folder, mode=0o700, exist_ok=True)
            lock = os.open(self.folder / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            self._trouble(f"write to {self.folder}", exc)
            return
        try:
            # Backups, checks and mounts on this host may record at once: the newest wins.
            fcntl.flock(lock, fcntl.LOCK_EX)
            current = self.recorded(store_id, store_path)
            if current is not None and current >= newest:
                return
            path = self._path(store_id, store_path)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            doc = {"version": 1, "store_id": store_id.hex(), "store": str(store_path),
                   "newest": newest, "recorded_ms": int(time.time() * 1000)}
            with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600),
                      "w") as f:
                f.write(json.dumps(doc) + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.rename(tmp, path)
        except OSError as exc:
            self._trouble(f"write to {self.folder}", exc)
        finally:
            os.close(lock)


def _set_aside_damaged(store: Store, name: str) -> bool:
    """True if NAME/damaged/`name` is a damaged generation file (damage set aside by prune):
    one with a generation's header and room for its sealed body that fails to read. An
    intact generation, an empty file or other junk under that name is not (FORMAT.md 9.1)."""
    try:
        head = store.backend.read(f"damaged/{name}", format.HEADER_LEN + 64)
        format.check_header(head, format.TYPE_GENERATION, format.GENERATION_VERSION, name)
    except (OSError, StoreError):
        return False
    if len(head) < format.HEADER_LEN + 64:
        return False
    try:
        store.load_generation(name, "damaged")
    except StoreError as exc:
        log.debug("set-aside generation %s does not read: %s", name, exc)
        return True
    return False
