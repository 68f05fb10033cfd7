"""An opened store (docs/FORMAT.md sections 2, 6 and 8): reading blobs back, writing store
files, generations and key change, all through the store's backend (backend/__init__.py).
Creating and unlocking a store is opening.py's, writing packs packwriter.py's, the writer
lock writerlock.py's, config and telling damaged key files from a wrong key storemeta.py's,
and a failed run's packs journal.py's.
"""
from __future__ import annotations

import errno
import logging
import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path

from humiofs.errors import IntegrityError, NoSuchObject, StoreError, StoreIOError, refused
from humiofs.store import crypto, format, journal, keys, opening, writerlock
from humiofs.store.backend import FILE, FOLDER, Backend, Item, Location
from humiofs.store.backend.factory import open_location, store_at
from humiofs.store.crypto import CHUNK, STORED_CHUNK, ObjectCipher
from humiofs.store.durable import NotRegularFile, store_io_error
from humiofs.store.format import Ref
from humiofs.store.packwriter import PackWriter
from humiofs.store.storemeta import at, is_store, looks_like_store, pack_name

log = logging.getLogger(__name__)

MAX_TREE_BYTES = 1 << 30
MAX_GENERATION_BYTES = 16 << 20
_BATCH_CHUNKS = 4  # chunks per read of a whole blob (restore, check)
_REMOTE_BATCH_CHUNKS = 64   # the same from object storage: 4 MiB per request
_CHECKED_PACKS = 1 << 16    # packs whose checked header a Store remembers
_scratch = threading.local()

PACK_NAME = re.compile(r"^[0-9a-f]{32}$")

__all__ = ["PACK_NAME", "Store", "is_store", "list_packs", "list_stores", "looks_like_store",
           "backend_of", "generation_names", "new_generation_name", "pack_name"]


def _split(where: Path | str) -> tuple[Location, str]:
    """BACKUP_DIR/NAME as (BACKUP_DIR's location, NAME)."""
    text = os.fspath(where).rstrip("/")
    parent, slash, name = text.rpartition("/")
    return open_location(parent or (slash or ".")), name


def backend_of(where: Path | str | Backend) -> Backend:
    """The backend of the store at `where` (BACKUP_DIR/NAME), whether or not it exists."""
    if isinstance(where, Backend):
        return where
    location, name = _split(where)
    return location.store(name)


def list_stores(backup_dir: Path | str | Location) -> list[str]:
    """Names of the stores in BACKUP_DIR (see opening.list_stores)."""
    location = backup_dir if isinstance(backup_dir, Location) else open_location(backup_dir)
    return opening.list_stores(location)


def generation_names(where: Path | str | Backend) -> list[str]:
    """Names of the committed generations of the store at `where`, oldest first. Needs no
    key: the names hold only the commit times."""
    return opening.generation_names(backend_of(where))


def list_packs(store: Store) -> dict[bytes, Item]:
    """Every file under packs/ that is named like a pack and in its right folder (a listing
    entry with its size and mtime)."""
    out: dict[bytes, Item] = {}
    try:
        items = store.backend.list("packs", recursive=True)
    except OSError as exc:
        # The listing goes into packs/xx: name the folder that failed, not packs/.
        where = str(exc.filename) if exc.filename else at(store.backend, "packs")
        raise refused(exc, where) or StoreError(
            f"cannot list {where}: {exc.strerror} (run humiofs check)") from None
    for item in items:
        _, prefix, name = item.name.split("/", 2) if item.name.count("/") == 2 else ("", "", "")
        if item.kind == FILE and PACK_NAME.match(name) and name.startswith(prefix) \
                and len(prefix) == 2:
            out[bytes.fromhex(name)] = item
    return out


class Store:
    """An opened store: its backend, its id and the unwrapped master key.

    `path` is the store's folder for messages (and tests) only: every access goes through
    `backend`."""

    def __init__(self, backend: Backend | Path, store_id: bytes, master: bytes,
                 passphrase: str | None = None) -> None:
        self.backend = backend_of(backend)
        self.store_id = store_id
        self._master = master
        # The form of the passphrase that opened the store (check tries it on every key file).
        self.passphrase = passphrase
        # Packs whose header was checked, with their store file names (a lookup here is the
        # mount's hot path: cheaper than formatting the name). Bounded: once full it starts
        # again, and a pack is checked anew (an 8-byte read).
        self._checked_packs: dict[bytes, str] = {}

    def __repr__(self) -> str:
        return f"Store({self.backend.location!r})"

    @property
    def path(self) -> Path | str:
        """The store's folder, or its `s3://BUCKET/PREFIX/NAME`: for messages, not access."""
        return self.backend.local_path or self.backend.location

    @property
    def name(self) -> str:
        return self.backend.location.rstrip("/").rpartition("/")[2]

    def at(self, name: str = "") -> str:
        """The store file `name`, for messages."""
        return at(self.backend, name)

    # -- creating and opening -------------------------------------------------------------

    @classmethod
    def create(cls, path: Path | str, key: str | keys.Passphrase,
               kdf: keys.KdfParams | None = None) -> Store:
        """Creates a new store at `path` (BACKUP_DIR/NAME), atomically: it appears complete
        or not at all. Opens it instead if one is there already."""
        passphrase = keys.Passphrase.of(key).text
        keys.check_passphrase(passphrase)
        location, name = _split(path)
        made = opening.create(location, name, passphrase, kdf)
        if made is None:
            return cls.open(location.store(name), key)
        backend, store_id, master = made
        return cls(backend, store_id, master, passphrase)

    @classmethod
    def open_or_create(cls, path: Path | str, key: str | keys.Passphrase) -> Store:
        """Opens the store at `path`, creating it first if there is none (a first backup). A
        store that lost its config is reported as such, never created anew over it. What a
        killed creation of this store left in BACKUP_DIR is removed first."""
        location, name = _split(path)
        location.remove_dead_creations(name)
        backend = location.store(name)
        return cls.open(backend, key) if looks_like_store(backend) else cls.create(path, key)

    @classmethod
    def open(cls, path: Path | str | Backend, key: str | keys.Passphrase) -> Store:
        """Opens the store at `path` (see opening.unlock for what it raises)."""
        backend = backend_of(path)
        store_id, master, passphrase = opening.unlock(
            backend, keys.Passphrase.of(key),
            lambda sid, master: cls(backend, sid, master).opens_generations())
        return cls(backend, store_id, master, passphrase)

    # -- writing ----------------------------------------------------------------------------

    def write_file(self, rel: str, data: bytes) -> None:
        """Writes the new store file `rel` once, atomically and durably."""
        try:
            self.backend.write(rel, data)
        except OSError as exc:
            raise store_io_error(exc, self.at(rel)) from None

    def clean_tmp(self) -> None:
        """Removes what writers that failed or died left behind: the packs of each run that
        did not commit its generation (its journal in tmp/ lists them, FORMAT.md 8), then
        everything in tmp/. Call only while holding the writer lock.

        A missing tmp/ is made again (it only ever holds a running writer's files, and the
        writer lock is held); raises StoreError if something else is in its place."""
        tmp = self.at("tmp")
        try:
            kind = self.backend.stat("tmp").kind
        except FileNotFoundError:
            kind = None
        except OSError as exc:
            raise store_io_error(exc, tmp) from None
        if kind is None and self.backend.local_path is None:
            pass    # object storage: no folders, and a folder with nothing in it is not seen
        elif kind != FOLDER:
            if kind is not None:
                raise StoreError(f"{tmp} is not a folder, so nothing can be written into the "
                                 f"store: move it out of the store, then `mkdir -m 700 {tmp}`")
            try:
                self.backend.make_folder("tmp")
            except OSError as exc:
                raise store_io_error(exc, tmp) from None
            log.warning("%s was missing; made it again (it holds only a running backup's "
                        "files)", tmp)
        journal.reclaim(self)
        for item in self.backend.list("tmp"):
            try:
                if item.kind == FOLDER:
                    # No writer makes one: planted, or left by a tool. tmp/ holds only a running
                    # writer's files and the writer lock is held, so it goes too.
                    self.backend.delete_folder(item.name)
                    log.warning("removed the folder %s and what it held (tmp/ holds only a "
                                "running backup's files)", self.at(item.name))
                else:
                    self.backend.delete(item.name)
            except OSError as exc:
                where = str(exc.filename) if exc.filename else self.at(item.name)
                if exc.errno in (errno.EROFS, errno.ENOSPC):
                    raise store_io_error(exc, where) from None
                raise refused(exc, where) or StoreIOError(
                    f"cannot remove {where}: {exc.strerror or exc} (tmp/ holds only a running "
                    "backup's files: remove it by hand, then run again)") from None

    def new_pack(self) -> PackWriter:
        return PackWriter(self)

    def pack_path(self, pack_id: bytes) -> Path | str:
        """Where the store keeps the pack, for messages and tests: not for access."""
        return store_at(self.path, pack_name(pack_id))

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
        key_dir = self.at("keys")
        old = [i.name for i in self.backend.list("keys")]
        new_name = f"keys/{os.urandom(16).hex()}"
        self.write_file(new_name, keys.wrap(self._master, self.store_id, new_passphrase, kdf))
        check = keys.unwrap(self.backend.read(new_name, 1 << 16), self.store_id, new_passphrase)
        if check != self._master:
            raise StoreError(f"the new key file in {key_dir} does not read back; old keys kept")
        try:
            for name in old:
                self.backend.delete(name)
            self.backend.sync("keys")
        except OSError as exc:
            # Both key files open the store (the old and the new passphrase): check says so.
            raise store_io_error(exc, f"the old key file {self.at(name)}") from None
        self.passphrase = new_passphrase

    # -- reading ----------------------------------------------------------------------------

    def close(self) -> None:
        """Closes cached pack files."""
        self.backend.close()

    def _check_pack(self, pack_id: bytes) -> str:
        """Checks the pack's header (FORMAT.md 6); returns its store file name."""
        name = pack_name(pack_id)
        h = pack_id.hex()
        try:
            head = self.backend.read(name, format.HEADER_LEN)
        except FileNotFoundError:
            raise NoSuchObject(f"pack {h} is missing from the store") from None
        except OSError as exc:
            raise refused(exc, self.at(name)) or StoreError(
                f"cannot open pack {h}: {exc.strerror}") from None
        format.check_header(head, format.TYPE_PACK, format.PACK_VERSION, f"pack {h}")
        if len(self._checked_packs) >= _CHECKED_PACKS:
            self._checked_packs = {}
        self._checked_packs[pack_id] = name
        return name

    def read_stored_into(self, pack_id: bytes, offset: int, out: memoryview,
                         nowait: bool = False) -> bool:
        """Fills `out` with the stored bytes at `offset` of a pack; a short read is an error.
        With `nowait`, returns False instead of waiting for the disk or the network (see
        Backend.read_into), and when the pack's header is not checked yet."""
        name = self._checked_packs.get(pack_id)
        if name is None:
            if nowait:
                return False
            name = self._check_pack(pack_id)
        try:
            return self.backend.read_into(name, offset, out, nowait)
        except EOFError:
            raise IntegrityError(f"pack {pack_id.hex()} is truncated") from None
        except FileNotFoundError:
            raise NoSuchObject(f"pack {pack_id.hex()} is missing from the store") from None
        except NotRegularFile as exc:
            raise StoreError(f"cannot open pack {pack_id.hex()}: {exc.strerror}") from None
        except OSError as exc:
            raise refused(exc, self.at(name)) or StoreError(
                f"cannot read pack {pack_id.hex()}: {exc.strerror}") from None

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
        for attempt in (0, 1):
            pos = n = 0
            try:
                for index in range(first, last + 1):
                    piece = stored[pos:pos + STORED_CHUNK]
                    n += cipher.decrypt_chunk_into(index, piece, index == last_index, out[n:])
                    pos += len(piece)
                return n
            except IntegrityError as exc:
                if attempt or not self.backend.caches:
                    raise IntegrityError(f"pack {ref.pack.hex()} at offset {ref.offset}: "
                                         f"{exc}") from None
            # A cached copy (the mount's, on object storage) may be stale: a pack put back
            # after damage. Once more from the store itself (backend/cache.py).
            log.info("pack %s fails authentication at offset %d; reading it again from the "
                     "store, not the cache", ref.pack.hex(), ref.offset)
            self.backend.discard(pack_name(ref.pack))
            if nowait or not self.read_stored_into(ref.pack, start, stored):
                return None
        raise AssertionError("unreachable")

    def iter_blob(self, ref: Ref, kind: int,
                  batch_chunks: int | None = None) -> Iterator[bytearray]:
        """The authenticated plaintext of a blob in order, a batch of chunks at a time
        (default: 4 from a folder; 64, one ranged request of 4 MiB, from object storage,
        where the next batch is fetched while the caller uses this one)."""
        remote = self.backend.local_path is None
        batch = batch_chunks or (_REMOTE_BATCH_CHUNKS if remote else _BATCH_CHUNKS)
        n = crypto.chunk_count(ref.plain_len)
        spans = [(first, min(n - 1, first + batch - 1)) for first in range(0, n, batch)]
        if not remote or len(spans) < 2:
            for first, last in spans:
                yield self.read_chunks(ref, kind, first, last)
            return
        # A request's latency, not its bytes, is what a read from object storage costs.
        with ThreadPoolExecutor(1, thread_name_prefix="blob-ahead") as ahead:
            pending = ahead.submit(self.read_chunks, ref, kind, *spans[0])
            for i in range(len(spans)):
                got = pending.result()
                if i + 1 < len(spans):
                    pending = ahead.submit(self.read_chunks, ref, kind, *spans[i + 1])
                yield got

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
        return opening.generation_names(self.backend)

    def load_generation(self, name: str, folder: str = "generations") -> format.Generation:
        """Reads, authenticates and parses one generation (from `folder`: "damaged" for one
        set aside, FORMAT.md 10.4). NoSuchObject if there is no such file, IntegrityError if
        it is damaged or not a regular file, StoreError if it cannot be read."""
        try:
            data = self.backend.read(f"{folder}/{name}", MAX_GENERATION_BYTES + 1)
        except FileNotFoundError:
            raise NoSuchObject(f"generation {name} is missing from the store") from None
        except NotRegularFile as exc:
            # A FIFO or symlink under a generation's name is a damaged generation, for every
            # command alike (FORMAT.md 9.1): it is never opened through or read from.
            raise IntegrityError(f"generation {name} is {exc.strerror}") from None
        except OSError as exc:
            raise refused(exc, self.at(f"{folder}/{name}")) or StoreError(
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
