"""A store's plaintext metadata (docs/FORMAT.md 4.1, 4.2): reading `config`, and telling a
wrong key apart from a `config` or key files that are missing, damaged or from another store,
whose remedies differ.
"""
from __future__ import annotations

import errno
import json
from collections.abc import Callable

from humiofs.errors import IntegrityError, NoSuchStore, StoreError, StoreMetadataDamaged, refused
from humiofs.store import keys
from humiofs.store.backend import FILE, FOLDER, Backend, LocationMissing, iter_names
from humiofs.store.durable import NotRegularFile

STORE_FORMAT = "humiofs-store"
STORE_VERSION = 1


# What a writer (backup, watch, key change) or prune writes into or through, and refuses to
# follow a symlink at (FORMAT.md 11): a symlink there could make a run as root write a host
# file outside the store. BACKUP_DIR and NAME themselves may be symlinks (a store on another
# disk): that is the operator's choice, not something planted inside the store.
_FOLDERS = ("keys", "packs", "generations", "tmp", "prune", "damaged")


def pack_name(pack_id: bytes) -> str:
    """The store file of a pack: `packs/<first 2 hex digits>/<32 hex digits>` (FORMAT.md 2)."""
    h = pack_id.hex()
    return f"packs/{h[:2]}/{h}"


def at(backend: Backend, name: str = "") -> str:
    """The store file or folder `name` of `backend`, for messages: a path on a local store."""
    return f"{backend.location}/{name}" if name else backend.location


def refuse_planted(backend: Backend) -> None:
    """Raises StoreError (exit 5, one line) if a store folder or lock file of the store, or
    one of packs/'s 256 folders, is a symlink, or if lock or prune.lock is not a regular
    file (Backend.planted). Call before a writer or prune opens anything in the store."""
    try:
        if backend.stat("config").symlink:
            raise StoreError(f"{at(backend, 'config')} is a symlink, not part of a humiofs "
                             "store: move it out")
    except OSError:
        pass            # missing: what needs it says so
    why = backend.planted(_FOLDERS, ("lock", "prune.lock"))
    if why is not None:
        raise StoreError(why)


def _kind(backend: Backend, name: str) -> str | None:
    """The kind of the entry `name`, None if there is none (or a symlink loop is in the
    way); other OSErrors (a name too long, a permission) are raised."""
    try:
        return backend.stat(name).kind
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return None
        raise


def is_store(backend: Backend) -> bool:
    """True if `backend` looks like a humiofs store (it has a config file)."""
    return _kind(backend, "config") == FILE


def looks_like_store(backend: Backend) -> bool:
    """True if `backend` is a store, or what is left of one that lost its config; also True if
    it is a folder this user may not look into (opening it then says why)."""
    try:
        return (_kind(backend, "config") == FILE or _kind(backend, "generations") == FOLDER
                or _kind(backend, "keys") == FOLDER)
    except PermissionError:
        return True


def read_config(backend: Backend, fits: Callable[[bytes], bool] = lambda _: False) -> bytes:
    """The store id from the store's config; NoSuchStore if `backend` holds no store at all,
    StoreMetadataDamaged if it holds one whose config is missing or damaged. `fits(store_id)`
    tells whether the master key the key files hold under that store id (unwrapped with the
    key given) authenticates a generation of the store: only then does the advice offer the
    key files' store id for a new config (key files copied from another store carry its
    id)."""
    path = backend.location
    config_path = at(backend, "config")
    try:
        raw = backend.read("config", 1 << 16)
    except LocationMissing as exc:
        raise NoSuchStore(str(exc.strerror)) from None
    except FileNotFoundError:
        if not looks_like_store(backend):
            raise NoSuchStore(f"no humiofs store at {path}") from None
        raise StoreMetadataDamaged(
            f"{config_path} is missing, but {path} holds a humiofs store (generations/ and "
            f"keys/ are there); the data may be intact. {config_fix(backend, fits)}") from None
    except NotRegularFile as exc:
        if not looks_like_store(backend):
            raise NoSuchStore(f"no humiofs store at {path}: {config_path} is "
                              f"{exc.strerror}") from None
        raise StoreError(f"{config_path} is {exc.strerror}: move it out of the store, and put "
                         "the store's config back from a copy of it") from None
    except (NotADirectoryError, IsADirectoryError) as exc:
        if not looks_like_store(backend):     # BACKUP_DIR or the store is a file, not a folder
            raise NoSuchStore(f"no humiofs store at {path}: {exc.strerror}") from None
        raise StoreError(f"cannot read {config_path}: {exc.strerror}") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise NoSuchStore(f"no humiofs store at {path}: {exc.strerror}") from None
        raise refused(exc, str(config_path), setting=True) or StoreError(
            f"cannot read {config_path}: {exc.strerror}") from None
    try:
        config = json.loads(raw)
        if config["format"] != STORE_FORMAT:
            raise StoreError(f"{path} is not a humiofs store")
        if config["version"] != STORE_VERSION:
            raise StoreError(f"{path}: unsupported store version {config['version']}")
        store_id = bytes.fromhex(config["store_id"])
        if len(store_id) != 16:
            raise ValueError("store id of the wrong length")
    except (ValueError, KeyError, TypeError):
        raise StoreMetadataDamaged(f"{config_path} is damaged (not the JSON of FORMAT.md "
                                   f"4.1); the data may be intact. {config_fix(backend, fits)}") from None
    return store_id


def config_fix(backend: Backend, fits: Callable[[bytes], bool]) -> str:
    """How to put back a store's config: it holds nothing but the format, its version and the
    store id, which every key file repeats; offered only if `fits` that id (see read_config),
    never on the key files' word alone."""
    ids = set()
    try:
        for name in iter_names(backend.list("keys")):
            try:
                ids.add(json.loads(backend.read(f"keys/{name}", 1 << 16))["store_id"])
            except (OSError, ValueError, KeyError, TypeError):
                continue
    except OSError:
        pass
    advice = "Copy config back from a copy of the store"
    if len(ids) == 1:
        own_id = ids.pop()
        try:
            opens = isinstance(own_id, str) and fits(bytes.fromhex(own_id))
        except ValueError:
            opens = False
        if opens:
            doc = json.dumps({"format": STORE_FORMAT, "version": STORE_VERSION,
                              "store_id": own_id, "created_ms": 0})
            return (advice + ", or write this line into it (the store id is the key files', "
                    f"and the key opens the store's generations with them): {doc}")
        advice += (" (the key files' store id is not offered: the key opens none of the "
                   "store's generations with them, so they may come from another store)")
    return advice


def damage(backend: Backend, store_id: bytes,
           problems: dict[str, IntegrityError | OSError],
           passphrases: list[str],
           opens_generations: Callable[[bytes, bytes], bool | None]) -> StoreMetadataDamaged:
    """Why no key file of the store could be tried with the key: each is damaged, or made
    for another store id than config names (then config or keys/ is the damaged one).
    `opens_generations(store_id, master)` tells whether that master key authenticates a
    generation of the store (None: the store has none), which tells a config that changed
    from key files that came from another store."""
    path, key_dir = backend.location, at(backend, "keys")
    foreign = {name: exc.store_id for name, exc in problems.items()
               if isinstance(exc, keys.ForeignKeyFile)}
    config_id = store_id.hex()
    if foreign:
        # The store id inside a key file is authenticated by the wrap: if the key opens a key
        # file under its own id, that id is the key file's store's. Whether that store is this
        # one, only its generations can say.
        for name, own_id in foreign.items():
            for passphrase in passphrases:
                try:
                    opened = keys.unwrap(backend.read(f"keys/{name}", 1 << 16), own_id,
                                         passphrase)
                except (IntegrityError, OSError):
                    break
                if opened is None:
                    continue
                fits = opens_generations(own_id, opened)
                if fits:
                    return StoreMetadataDamaged(
                        f"{at(backend, 'config')} is damaged: it names the store id {config_id}, "
                        f"but the key file keys/{name} is for store id {own_id.hex()}, and "
                        "the key opens it and the store's generations with it, so key and key "
                        f"files are right. Set \"store_id\" in config back to {own_id.hex()} "
                        "(or copy config back from a copy of the store); the data is not "
                        "affected")
                if fits is False:
                    return StoreMetadataDamaged(
                        f"the key files in {key_dir} belong to another store (store id "
                        f"{own_id.hex()}; config names {config_id}): the master key they hold "
                        "opens none of this store's generations. They were copied from another "
                        "store with the same key: put this store's keys/ back from a copy of "
                        "it, and leave config as it is. Keep the store; its data may be intact")
                return StoreMetadataDamaged(
                    f"config names the store id {config_id}, but the key file keys/{name} is "
                    f"for store id {own_id.hex()}; the store has no generation to tell which "
                    "is right. If config was edited, set \"store_id\" back to "
                    f"{own_id.hex()}; if keys/ came from another store, put back this store's "
                    "(from a copy of it)")
        ids = ", ".join(sorted({i.hex() for i in foreign.values()}))
        return StoreMetadataDamaged(
            f"no key file in {key_dir} belongs to the store {path}: config names the store id "
            f"{config_id}, the key files {ids} (and the key opens none of them either). config "
            "or keys/ is damaged, or was copied from another store: copy them back from a copy "
            "of this store. Keep the store; its data may be intact")
    first = next(iter(problems.items()))
    return StoreMetadataDamaged(
        f"every key file of the store {path} is damaged (keys/{first[0]}: {first[1]}), so no "
        f"key can open it; this is not a wrong key. Copy {key_dir} back from a copy of the "
        "store. Keep the store; its data may be intact")
