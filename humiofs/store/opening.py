"""Creating a store and unlocking one with the key (docs/FORMAT.md 4 and 5), and what needs no
key: which stores BACKUP_DIR holds and which generations a store has. Store (repository.py)
wraps these; everything goes through the backend (backend/__init__.py).
"""
from __future__ import annotations

import errno
import json
import logging
import os
import time
from collections.abc import Callable

from humiofs.errors import (
    IntegrityError,
    NoSuchStore,
    StoreError,
    StoreMetadataDamaged,
    WrongKey,
    refused,
)
from humiofs.store import format, keys, storemeta
from humiofs.store.backend import Backend, Location, LocationMissing, iter_names
from humiofs.store.durable import store_io_error
from humiofs.store.storemeta import STORE_FORMAT, STORE_VERSION, at, looks_like_store

log = logging.getLogger(__name__)

#: The folders of a new store (FORMAT.md 2), the 256 folders of packs/ included.
FOLDERS = ["keys", "packs", "generations", "tmp"] + [f"packs/{i:02x}" for i in range(256)]

# (store id, master key) -> whether that master key authenticates a generation of the store
# (True), none (False), or the store has none (None).
OpensGenerations = Callable[[bytes, bytes], "bool | None"]


def list_stores(location: Location) -> list[str]:
    """Names of the stores in BACKUP_DIR (those that lost their config included: opening one
    says so), sorted; [] if BACKUP_DIR does not exist."""
    try:
        names = location.names()
    except LocationMissing as exc:
        raise NoSuchStore(str(exc.strerror)) from None
    except FileNotFoundError:
        return []
    except NotADirectoryError:
        raise NoSuchStore(f"BACKUP_DIR {location.location} is not a folder") from None
    except OSError as exc:
        raise refused(exc, f"BACKUP_DIR {location.location}", setting=True) or StoreError(
            f"cannot list {location.location}: {exc.strerror}") from None
    return [n for n in names if looks_like_store(location.store(n))]


def generation_names(backend: Backend) -> list[str]:
    """Names of the committed generations of the store, oldest first. Needs no key: the names
    hold only the commit times."""
    gdir = at(backend, "generations")
    try:
        items = backend.list("generations")
    except (FileNotFoundError, NotADirectoryError):
        raise StoreError(f"{gdir} is missing from the store, or is not a folder (run humiofs "
                         "check): the store's generations are gone. Put the folder back from a "
                         f"copy of the store, or make an empty one (`mkdir -m 700 {gdir}`, after "
                         "moving a file in its place out of the store)") from None
    except OSError as exc:
        raise refused(exc, gdir) or StoreError(
            f"cannot list generations of {backend.location}: {exc.strerror}") from None
    # Every entry named like a generation: a FIFO or symlink there is a damaged generation
    # (FORMAT.md 9.1), which reading it says.
    return [i.name.rpartition("/")[2] for i in items
            if format.GENERATION_NAME.match(i.name.rpartition("/")[2])]


def create(location: Location, name: str, passphrase: str,
           kdf: keys.KdfParams | None) -> tuple[Backend, bytes, bytes] | None:
    """Creates the store `name` in `location`, atomically: it appears complete or not at all.
    Returns (backend, store id, master key), or None if a store of that name is there already
    (open it instead). NoSuchStore if BACKUP_DIR is missing or not a folder (it is never
    created), StoreIOError if the store cannot be written."""
    store_id = os.urandom(16)
    master = keys.new_master_key()
    config = {"format": STORE_FORMAT, "version": STORE_VERSION,
              "store_id": store_id.hex(), "created_ms": int(time.time() * 1000)}
    files = {"config": json.dumps(config).encode() + b"\n",
             f"keys/{os.urandom(16).hex()}": keys.wrap(master, store_id, passphrase, kdf)}
    where = f"{location.location}/{name}"
    try:
        backend = location.create_store(name, files, FOLDERS)
    except NotADirectoryError:
        raise NoSuchStore(f"BACKUP_DIR {location.location} is not a folder") from None
    except LocationMissing as exc:
        raise NoSuchStore(str(exc.strerror)) from None
    except FileNotFoundError:
        # Never create BACKUP_DIR: if it is an unmounted network drive, the backup would
        # silently fill the local disk instead.
        raise NoSuchStore(f"BACKUP_DIR {location.location} does not exist; create it or mount "
                          "the backup drive there") from None
    except FileExistsError as exc:
        if storemeta.is_store(location.store(name)):
            return None
        raise store_io_error(exc, f"the new store {where}") from None
    except OSError as exc:
        if exc.errno == errno.ENAMETOOLONG:
            raise           # a setting to fix (the CLI says so), not a disk that fails
        raise store_io_error(exc, f"the new store {where}") from None
    log.info("created store %s", where)
    return backend, store_id, master


def unlock(backend: Backend, key: keys.Passphrase,
           opens_generations: OpensGenerations) -> tuple[bytes, bytes, str]:
    """(store id, master key, passphrase) of the store, unwrapped with the canonical
    passphrase, or else with a form of it an earlier version read from the same source (with
    a warning; FORMAT.md 4.4).

    Raises WrongKey if the key opens no key file of the store, and StoreMetadataDamaged if it
    is not the key but the store's config or key files that are missing, damaged or from
    another store (FORMAT.md 4.2): the advice for the two differs."""
    path, key_dir = backend.location, at(backend, "keys")

    def fits(own_id: bytes) -> bool:
        """The key opens a key file under `own_id`, and that master key a generation."""
        try:
            for name in iter_names(backend.list("keys")):
                for text in [key.text] + [t for t, _ in key.legacy]:
                    try:
                        master = keys.unwrap(backend.read(f"keys/{name}", 1 << 16), own_id, text)
                    except (IntegrityError, OSError):
                        break
                    if master is not None:
                        return bool(opens_generations(own_id, master))
        except (OSError, StoreError):
            pass
        return False

    store_id = storemeta.read_config(backend, fits)
    try:
        listed = backend.list("keys")
    except FileNotFoundError:
        listed = None
    except OSError as exc:
        raise refused(exc, key_dir) or StoreError(
            f"cannot list {key_dir}: {exc.strerror}") from None
    key_names = [i.name.rpartition("/")[2] for i in listed or []]
    if not key_names:
        raise StoreMetadataDamaged(
            f"the store {path} has no key file ({key_dir} is "
            f"{'empty' if listed is not None else 'missing'}), so no key can open it; this "
            "is not a wrong key. The key files hold the store's master key, wrapped: copy "
            f"{key_dir} back from a copy of the store (an rsync or snapshot of BACKUP_DIR). "
            "Without one nobody can read this backup; keep it anyway, and start a fresh "
            "backup under a new BACKUP_NAME")
    problems: dict[str, IntegrityError | OSError] = {}
    forms = [(key.text, "")] + [(text, how) for text, how in key.legacy if text != key.text]
    for passphrase, how in forms:
        for name in key_names:
            if name in problems:
                continue
            try:
                master = keys.unwrap(backend.read(f"keys/{name}", 1 << 16), store_id,
                                     passphrase)
            except (IntegrityError, OSError) as exc:
                problems[name] = exc
                continue
            if master is not None:
                if how:
                    log.warning(
                        "the store %s opens only with the key read %s (as an earlier humiofs "
                        "read it), not with the key as it is read now (README, The key). If "
                        "this key is not the one the store's other users give (such as "
                        "the backup service's env file), leave it so; if it is, `humiofs "
                        "key change` with --new-key-file holding it makes the store open "
                        "with it as read now", path, how)
                return store_id, master, passphrase
    for name, problem in problems.items():
        if isinstance(problem, OSError) and (error := refused(problem, f"{key_dir}/{name}")):
            raise error
    if any(name not in problems for name in key_names):
        # A key file of this very store that the key does not open: the key is wrong (a
        # bit flipped inside the wrapped key would look the same; nothing can tell).
        for name, problem in problems.items():
            log.warning("store %s: key file %s: %s", path, name, problem)
        raise WrongKey(
            f"the key does not open the store {path}. {key.check_advice()}. If the key "
            "is lost, nobody can read this backup: start a fresh backup under a new "
            "BACKUP_NAME or BACKUP_DIR, and keep this store: with the right key it opens "
            "again")
    raise storemeta.damage(backend, store_id, problems, [t for t, _ in forms],
                           opens_generations)
