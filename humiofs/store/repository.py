"""The store directory (docs/FORMAT.md sections 2, 6 and 8): creating and opening it, reading
blobs back, generations and key change. Writing packs is packwriter.py's, the write-once file
primitives are durable.py's, the writer lock writerlock.py's, config and telling damaged key
files from a wrong key storemeta.py's, and a failed run's packs journal.py's.
"""
from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import re
import shutil
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path

from humiofs.errors import (
    IntegrityError,
    NoSuchObject,
    NoSuchStore,
    StoreError,
    StoreMetadataDamaged,
    WrongKey,
    refused,
)
from humiofs.store import crypto, format, journal, keys, storemeta, writerlock
from humiofs.store.crypto import CHUNK, STORED_CHUNK, ObjectCipher
from humiofs.store.durable import (
    NotRegularFile,
    fsync_dir,
    open_store_file,
    read_store_file,
    store_io_error,
    unlink_quietly,
    write_new,
)
from humiofs.store.format import Ref
from humiofs.store.packwriter import PackWriter
from humiofs.store.storemeta import STORE_FORMAT, STORE_VERSION, is_store, looks_like_store

log = logging.getLogger(__name__)

MAX_TREE_BYTES = 1 << 30
MAX_GENERATION_BYTES = 16 << 20
_BATCH_CHUNKS = 4  # chunks per read of a whole blob (restore, check)
_scratch = threading.local()


_DEAD_CREATION_S = 10.0     # younger, a creation folder may not be locked by its creator yet


def remove_dead_creations(path: Path) -> None:
    """Removes the `.NAME.creating-*` folders that creations of the store `path` left when
    they were killed: those no process holds locked (Store.create holds its own until the
    rename), and that have not changed for a while."""
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.creating-[0-9a-f]{{8}}$")
    try:
        names = [n for n in os.listdir(path.parent) if pattern.match(n)]
    except OSError:
        return
    for name in names:
        folder = path.parent / name
        try:
            fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            if time.time() - os.fstat(fd).st_mtime < _DEAD_CREATION_S:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue            # its creator is still at work
            shutil.rmtree(folder, ignore_errors=True)
            log.info("removed %s, left by a store creation that was interrupted", folder)
        finally:
            os.close(fd)


def list_stores(backup_dir: Path) -> list[str]:
    """Names of the stores in `backup_dir` (those that lost their config included: opening
    one says so), sorted."""
    try:
        names = os.listdir(backup_dir)
    except FileNotFoundError:
        return []
    except NotADirectoryError:
        raise NoSuchStore(f"BACKUP_DIR {backup_dir} is not a folder") from None
    except OSError as exc:
        raise refused(exc, f"BACKUP_DIR {backup_dir}", setting=True) or StoreError(
            f"cannot list {backup_dir}: {exc.strerror}") from None
    return sorted(n for n in names if not n.startswith(".") and looks_like_store(backup_dir / n))


def generation_names(store_path: Path) -> list[str]:
    """Names of the committed generations of the store at `store_path`, oldest first. Needs
    no key: the names hold only the commit times."""
    gdir = store_path / "generations"
    try:
        names = os.listdir(gdir)
    except (FileNotFoundError, NotADirectoryError):
        raise StoreError(f"{gdir} is missing from the store, or is not a folder (run humiofs "
                         "check): the store's generations are gone. Put the folder back from a "
                         f"copy of the store, or make an empty one (`mkdir -m 700 {gdir}`, after "
                         "moving a file in its place out of the store)") from None
    except OSError as exc:
        raise refused(exc, str(gdir)) or StoreError(
            f"cannot list generations of {store_path}: {exc.strerror}") from None
    return sorted(n for n in names if format.GENERATION_NAME.match(n))


PACK_NAME = re.compile(r"^[0-9a-f]{32}$")


def list_packs(store: Store) -> dict[bytes, os.stat_result]:
    """Every file under packs/ that is named like a pack and in its right folder, with its
    stat."""
    out: dict[bytes, os.stat_result] = {}
    root = store.path / "packs"
    try:
        prefixes = sorted(os.listdir(root))
    except OSError as exc:
        raise refused(exc, str(root)) or StoreError(
            f"cannot list {root}: {exc.strerror} (run humiofs check)") from None
    for prefix in prefixes:
        if not re.fullmatch(r"[0-9a-f]{2}", prefix):
            continue
        try:
            with os.scandir(root / prefix) as it:
                for de in it:
                    if PACK_NAME.match(de.name) and de.name.startswith(prefix):
                        try:
                            out[bytes.fromhex(de.name)] = de.stat(follow_symlinks=False)
                        except FileNotFoundError:
                            pass
        except NotADirectoryError:
            continue
    return out


class _PackFile:
    """An open pack with a reference count, so a cached fd is never closed under a reader."""

    __slots__ = ("fd", "users", "evicted")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.users = 0
        self.evicted = False


class Store:
    """An opened store: its location, its id and the unwrapped master key."""

    def __init__(self, path: Path, store_id: bytes, master: bytes,
                 passphrase: str | None = None) -> None:
        self.path = path
        self.store_id = store_id
        self._master = master
        # The form of the passphrase that opened the store (check tries it on every key file).
        self.passphrase = passphrase
        self._open_packs: OrderedDict[bytes, _PackFile] = OrderedDict()
        self._packs_lock = threading.Lock()
        self.max_open_packs = 64

    def __repr__(self) -> str:
        return f"Store({str(self.path)!r})"

    @property
    def name(self) -> str:
        return self.path.name

    # -- creating and opening -------------------------------------------------------------

    @classmethod
    def create(cls, path: Path, key: str | keys.Passphrase,
               kdf: keys.KdfParams | None = None) -> Store:
        """Creates a new store at `path`, atomically: it appears complete or not at all."""
        passphrase = keys.Passphrase.of(key).text
        keys.check_passphrase(passphrase)
        parent = path.parent
        if parent.exists() and not parent.is_dir():
            raise NoSuchStore(f"BACKUP_DIR {parent} is not a folder")
        if not parent.is_dir():
            # Never create BACKUP_DIR: if it is an unmounted network drive, the backup would
            # silently fill the local disk instead.
            raise NoSuchStore(f"BACKUP_DIR {parent} does not exist; create it or mount the "
                              "backup drive there")
        staging = parent / f".{path.name}.creating-{os.urandom(4).hex()}"
        store_id = os.urandom(16)
        master = keys.new_master_key()
        held = -1
        try:
            os.mkdir(staging, 0o700)
            # Locked until it is renamed: a folder of this name that can be locked was left by
            # a creation that died (remove_dead_creations).
            held = os.open(staging, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            fcntl.flock(held, fcntl.LOCK_EX)
            for sub in ("keys", "packs", "generations", "tmp"):
                os.mkdir(staging / sub, 0o700)
            for i in range(256):
                os.mkdir(staging / "packs" / f"{i:02x}", 0o700)
            config = {"format": STORE_FORMAT, "version": STORE_VERSION,
                      "store_id": store_id.hex(), "created_ms": int(time.time() * 1000)}
            write_new(staging / "config", json.dumps(config).encode() + b"\n")
            write_new(staging / "keys" / os.urandom(16).hex(),
                       keys.wrap(master, store_id, passphrase, kdf))
            for sub in ("keys", "packs", "generations", "tmp", "."):
                fsync_dir(staging / sub)
            os.rename(staging, path)
        except OSError as exc:
            shutil.rmtree(staging, ignore_errors=True)
            if exc.errno in (errno.EEXIST, errno.ENOTEMPTY) and is_store(path):
                return cls.open(path, key)
            raise store_io_error(exc, f"the new store {path}") from None
        finally:
            if held >= 0:
                os.close(held)
        fsync_dir(parent)
        log.info("created store %s", path)
        return cls(path, store_id, master, passphrase)

    @classmethod
    def open_or_create(cls, path: Path, key: str | keys.Passphrase) -> Store:
        """Opens the store at `path`, creating it first if there is none (a first backup). A
        store that lost its config is reported as such, never created anew over it. What a
        killed creation of this store left in BACKUP_DIR is removed first."""
        remove_dead_creations(path)
        return cls.open(path, key) if looks_like_store(path) else cls.create(path, key)

    @classmethod
    def open(cls, path: Path, key: str | keys.Passphrase) -> Store:
        """Opens the store at `path` with the canonical passphrase, or else with a form of it
        an earlier version read from the same source (with a warning; FORMAT.md 4.4).

        Raises WrongKey if the key opens no key file of the store, and StoreMetadataDamaged
        if it is not the key but the store's config or key files that are missing, damaged
        or from another store (FORMAT.md 4.2): the advice for the two differs."""
        key = keys.Passphrase.of(key)
        key_dir = path / "keys"

        def fits(own_id: bytes) -> bool:
            """The key opens a key file under `own_id`, and that master key a generation."""
            try:
                for name in sorted(os.listdir(key_dir)):
                    for text in [key.text] + [t for t, _ in key.legacy]:
                        try:
                            master = keys.unwrap(read_store_file(key_dir / name, 1 << 16),
                                                 own_id, text)
                        except (IntegrityError, OSError):
                            break
                        if master is not None:
                            return bool(cls(path, own_id, master).opens_generations())
            except (OSError, StoreError):
                pass
            return False

        store_id = storemeta.read_config(path, fits)
        try:
            key_names = sorted(os.listdir(key_dir))
        except FileNotFoundError:
            key_names = []
        except OSError as exc:
            raise refused(exc, str(key_dir)) or StoreError(
                f"cannot list {key_dir}: {exc.strerror}") from None
        if not key_names:
            raise StoreMetadataDamaged(
                f"the store {path} has no key file ({key_dir} is "
                f"{'empty' if key_dir.is_dir() else 'missing'}), so no key can open it; this "
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
                    master = keys.unwrap(read_store_file(key_dir / name, 1 << 16), store_id,
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
                    return cls(path, store_id, master, passphrase)
        for name, problem in problems.items():
            if isinstance(problem, OSError) and (error := refused(problem, str(key_dir / name))):
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
        raise storemeta.damage(path, store_id, key_dir, problems, [t for t, _ in forms],
                               lambda sid, master: cls(path, sid, master).opens_generations())

    # -- writing ---    # -- writing ----------------------------------------------------------------------------

    def _tmp_path(self) -> Path:
        return self.path / "tmp" / f"{os.urandom(8).hex()}.tmp"

    def write_file(self, rel: str, data: bytes) -> None:
        """Writes the store file `rel` once, atomically and durably."""
        final = self.path / rel
        tmp = self._tmp_path()
        try:
            write_new(tmp, data)
            os.rename(tmp, final)
            fsync_dir(final.parent)
        except OSError as exc:
            unlink_quietly(tmp)
            raise store_io_error(exc, str(final)) from None

    def clean_tmp(self) -> None:
        """Removes what writers that failed or died left behind: the packs of each run that
        did not commit its generation (its journal in tmp/ lists them, FORMAT.md 8), then
        everything in tmp/. Call only while holding the writer lock.

        A missing tmp/ is made again (it only ever holds a running writer's files, and the
        writer lock is held); raises StoreError if something else is in its place."""
        tmp = self.path / "tmp"
        if not tmp.is_dir() or tmp.is_symlink():
            if os.path.lexists(tmp):
                raise StoreError(f"{tmp} is not a folder, so nothing can be written into the "
                                 f"store: move it out of the store, then `mkdir -m 700 {tmp}`")
            try:
                os.mkdir(tmp, 0o700)
                fsync_dir(self.path)
            except FileExistsError:
                pass
            except OSError as exc:
                raise store_io_error(exc, str(tmp)) from None
            log.warning("%s was missing; made it again (it holds only a running backup's "
                        "files)", tmp)
        journal.reclaim(self)
        for name in os.listdir(self.path / "tmp"):
            unlink_quietly(self.path / "tmp" / name)

    def new_pack(self) -> PackWriter:
        return PackWriter(self)

    def pack_path(self, pack_id: bytes) -> Path:
        h = pack_id.hex()
        return self.path / "packs" / h[:2] / h

    def cipher(self, kind: int, oid: bytes) -> ObjectCipher:
        return ObjectCipher(self._master, kind, oid)

    def writer_running(self) -> bool:
        """True if a writer holds the writer lock now (see writerlock.running)."""
        return writerlock.running(self)

    def lock(self) -> AbstractContextManager[None]:
        """Holds the exclusive writer lock for a writer's run (see writerlock.hold)."""
        return writerlock.hold(self)

    def change_key(self, new_key: str | keys.Passphrase,
                   kdf: keys.KdfParams | None = None) -> None:
        """Wraps the master key under a new passphrase and removes the old key files."""
        new_passphrase = keys.Passphrase.of(new_key).text
        keys.check_passphrase(new_passphrase)
        key_dir = self.path / "keys"
        old = os.listdir(key_dir)
        new_name = os.urandom(16).hex()
        self.write_file(f"keys/{new_name}",
                        keys.wrap(self._master, self.store_id, new_passphrase, kdf))
        check = keys.unwrap(read_store_file(key_dir / new_name, 1 << 16), self.store_id,
                            new_passphrase)
        if check != self._master:
            raise StoreError(f"the new key file in {key_dir} does not read back; old keys kept")
        try:
            for name in old:
                os.unlink(key_dir / name)
        except OSError as exc:
            # Both key files open the store (the old and the new passphrase): check says so.
            raise store_io_error(exc, f"the old key file {key_dir / name}") from None
        fsync_dir(key_dir)
        self.passphrase = new_passphrase

    # -- reading ----------------------------------------------------------------------------

    def _acquire_pack(self, pack_id: bytes) -> _PackFile:
        with self._packs_lock:
            pf = self._open_packs.get(pack_id)
            if pf is not None:
                self._open_packs.move_to_end(pack_id)
                pf.users += 1
                return pf
        path = self.pack_path(pack_id)
        try:
            fd = open_store_file(path)
        except FileNotFoundError:
            raise NoSuchObject(f"pack {pack_id.hex()} is missing from the store") from None
        except OSError as exc:
            raise refused(exc, f"pack {pack_id.hex()}") or StoreError(
                f"cannot open pack {pack_id.hex()}: {exc.strerror}") from None
        try:
            head = os.pread(fd, format.HEADER_LEN, 0)
            format.check_header(head, format.TYPE_PACK, format.PACK_VERSION,
                                f"pack {pack_id.hex()}")
        except BaseException:
            os.close(fd)
            raise
        with self._packs_lock:
            pf = self._open_packs.get(pack_id)
            if pf is not None:
                os.close(fd)
            else:
                pf = _PackFile(fd)
                self._open_packs[pack_id] = pf
                while len(self._open_packs) > self.max_open_packs:
                    _, old = self._open_packs.popitem(last=False)
                    old.evicted = True
                    if old.users == 0:
                        os.close(old.fd)
            pf.users += 1
            return pf

    def _release_pack(self, pf: _PackFile) -> None:
        with self._packs_lock:
            pf.users -= 1
            if pf.evicted and pf.users == 0:
                os.close(pf.fd)

    def close(self) -> None:
        """Closes cached pack files."""
        with self._packs_lock:
            for pf in self._open_packs.values():
                pf.evicted = True
                if pf.users == 0:
                    os.close(pf.fd)
            self._open_packs.clear()

    def read_stored_into(self, pack_id: bytes, offset: int, out: memoryview,
                         nowait: bool = False) -> bool:
        """Fills `out` with the stored bytes at `offset` of a pack; a short read is an error.
        With `nowait`, returns False instead of waiting for the disk: when the pack is not open
        yet or its bytes are not all in the page cache (RWF_NOWAIT)."""
        if nowait:
            with self._packs_lock:
                pf = self._open_packs.get(pack_id)
                if pf is None:
                    return False
                pf.users += 1
        else:
            pf = self._acquire_pack(pack_id)
        try:
            got = 0
            while got < len(out):
                if nowait:
                    try:
                        n = os.preadv(pf.fd, [out[got:]], offset + got, os.RWF_NOWAIT)
                    except BlockingIOError:
                        return False
                    if n < len(out) - got:  # partly cached, or truncated: ask without nowait
                        return False
                else:
                    n = os.preadv(pf.fd, [out[got:]], offset + got)
                if not n:
                    raise IntegrityError(f"pack {pack_id.hex()} is truncated")
                got += n
        except OSError as exc:
            raise StoreError(f"cannot read pack {pack_id.hex()}: {exc.strerror}") from None
        finally:
            self._release_pack(pf)
        return True

    def read_chunks(self, ref: Ref, kind: int, first: int, last: int) -> bytearray:
        """Authenticated plaintext of chunks first..last (inclusive) of the blob at `ref`,
        in a buffer of its own."""
        out = bytearray(min(ref.plain_len, (last + 1) * CHUNK) - first * CHUNK)
        self.read_chunks_into(ref, kind, first, last, memoryview(out))
        return out

    def read_chunks_into(self, ref: Ref, kind: int, first: int, last: int,
                         out: memoryview, nowait: bool = False) -> int | None:
        """Decrypts chunks first..last (inclusive) of the blob at `ref` into `out`, back to
        back; returns the plaintext length. If it raises, `out` may hold unauthenticated bytes
        and must be thrown away. With `nowait`, returns None rather than wait for the disk (see
        read_stored_into)."""
        last_index = crypto.chunk_count(ref.plain_len) - 1
        if not 0 <= first <= last <= last_index:
            raise ValueError(f"chunks {first}..{last} of a blob of {last_index + 1}")
        start, end = _stored_span(ref, first, last)
        stored = _scratch_buffer(end - start)
        if not self.read_stored_into(ref.pack, start, stored, nowait):
            return None
        cipher = self.cipher(kind, ref.oid)
        pos = n = 0
        try:
            for index in range(first, last + 1):
                piece = stored[pos:pos + STORED_CHUNK]
                n += cipher.decrypt_chunk_into(index, piece, index == last_index, out[n:])
                pos += len(piece)
        except IntegrityError as exc:
            raise IntegrityError(f"pack {ref.pack.hex()} at offset {ref.offset}: {exc}") from None
        return n

    def iter_blob(self, ref: Ref, kind: int,
                  batch_chunks: int = _BATCH_CHUNKS) -> Iterator[bytearray]:
        """The authenticated plaintext of a blob in order, a batch of chunks at a time."""
        n = crypto.chunk_count(ref.plain_len)
        for first in range(0, n, batch_chunks):
            last = min(n - 1, first + batch_chunks - 1)
            yield self.read_chunks(ref, kind, first, last)

    def read_blob(self, ref: Ref, kind: int) -> bytes:
        """The whole authenticated plaintext of a (metadata-sized) blob."""
        if ref.plain_len > MAX_TREE_BYTES:
            raise IntegrityError(f"blob in pack {ref.pack.hex()} is implausibly large")
        # bytes, not bytearray: tree decoding slices names out of it, and they must hash.
        return bytes(self.read_chunks(ref, kind, 0, crypto.chunk_count(ref.plain_len) - 1))

    def read_tree(self, ref: Ref) -> list[format.Entry]:
        """The entries of the tree blob at `ref`."""
        return format.decode_tree(self.read_blob(ref, crypto.KIND_TREE))

    # -- generations ------------------------------------------------------------------------

    def list_generations(self) -> list[str]:
        """Names of the committed generations, oldest first."""
        return generation_names(self.path)

    def load_generation(self, name: str, folder: str = "generations") -> format.Generation:
        """Reads, authenticates and parses one generation (from `folder`: "damaged" for one
        set aside, FORMAT.md 10.4). NoSuchObject if there is no such file, IntegrityError if
        it is damaged or not a regular file, StoreError if it cannot be read."""
        path = self.path / folder / name
        try:
            data = read_store_file(path, MAX_GENERATION_BYTES + 1)
        except FileNotFoundError:
            raise NoSuchObject(f"generation {name} is missing from the store") from None
        except NotRegularFile as exc:
            # A FIFO or symlink under a generation's name is a damaged generation, for every
            # command alike (FORMAT.md 9.1): it is never opened through or read from.
            raise IntegrityError(f"generation {name} is {exc.strerror}") from None
        except OSError as exc:
            raise refused(exc, f"generation {name}") or StoreError(
                f"cannot read generation {name}: {exc.strerror}") from None
        where = f"generation {name}"
        format.check_header(data, format.TYPE_GENERATION, format.GENERATION_VERSION, where)
        oid, stored = data[8:24], data[24:]
        plain_len = _plain_len_of(len(stored))
        if len(oid) != crypto.OBJECT_ID_LEN or plain_len is None or len(data) > MAX_GENERATION_BYTES:
            raise IntegrityError(f"{where} is truncated or malformed")
        try:
            plain = self.cipher(crypto.KIND_GENERATION, oid).open(stored, plain_len)
        except IntegrityError as exc:
            raise IntegrityError(f"{where}: {exc}") from None
        return format.decode_generation(plain, name)

    def opens_generations(self) -> bool | None:
        """True if the master key authenticates a generation of the store (the newest first),
        False if there are generation files and it opens none, None if there are none."""
        names = self.list_generations()
        for name in reversed(names):
            try:
                self.load_generation(name)
                return True
            except StoreError:
                continue
        return False if names else None

    def commit_generation(self, gen: format.Generation) -> None:
        """Writes `gen` as a new generation file; the last step of a backup run."""
        oid = crypto.new_object_id()
        sealed = self.cipher(crypto.KIND_GENERATION, oid).seal(format.encode_generation(gen))
        data = format.header(format.TYPE_GENERATION, format.GENERATION_VERSION) + oid + sealed
        self.write_file(f"generations/{gen.name}", data)


def _scratch_buffer(size: int) -> memoryview:
    """A per-thread reusable buffer of at least `size` bytes: a fresh one per call costs more
    in page faults than decrypting what it holds."""
    buf = getattr(_scratch, "buf", None)
    if buf is None or len(buf) < size:
        buf = _scratch.buf = bytearray(size)
    return memoryview(buf)[:size]


def new_generation_name(time_ms: int) -> str:
    return f"{time_ms:013d}-{os.urandom(8).hex()}"


def _plain_len_of(stored: int) -> int | None:
    chunks = max(1, -(-stored // STORED_CHUNK))
    plain = stored - crypto.TAG * chunks
    if plain < 0 or crypto.chunk_count(plain) != chunks:
        return None
    return plain


def _check_ref(ref: Ref) -> None:
    if ref.stored_len != crypto.stored_len(ref.plain_len):
        raise IntegrityError(f"ref into pack {ref.pack.hex()} has inconsistent lengths")


def _stored_span(ref: Ref, first: int, last: int) -> tuple[int, int]:
    """Pack offsets [start, end) of the stored bytes of chunks first..last of a blob."""
    _check_ref(ref)
    start = ref.offset + first * STORED_CHUNK
    end = min(ref.offset + (last + 1) * STORED_CHUNK, ref.offset + ref.stored_len)
    return start, end
