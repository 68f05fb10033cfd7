"""Where a store's bytes live: the one interface every store access goes through.

A `Location` is BACKUP_DIR (a local folder, or `s3://BUCKET/PREFIX`); each store in it is a
`Backend` holding the store's files under names relative to the store's root, such as
`config`, `keys/<hex32>`, `packs/ab/<hex32>`, `generations/<name>`, `tmp/<hex16>.journal`,
`lock` (docs/FORMAT.md 2 lists them). Names use `/` and never start with `/` or hold `..`.

Nothing above this package opens, lists, renames or deletes a store path itself (STYLE.md:
restic's `internal/backend` under `internal/repository` is the model). The local folder is
`local.py`; object storage is `s3.py`; `factory.open_location` picks one for a BACKUP_DIR.

Errors follow the filesystem's, so one caller's handling serves every backend: a missing
object raises FileNotFoundError; something that is not a regular file under a store file's
name raises durable.NotRegularFile; a refused access raises PermissionError (or OSError with
EROFS for a read-only store); a full store raises OSError with ENOSPC; anything else an
OSError whose strerror is one line a user can act on, and whose `filename`, where set, is the
exact file or folder it is about (a recursive listing's may be a subfolder's). Backends retry
transient failures themselves (with backoff) before raising.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

FILE = "file"
FOLDER = "folder"
OTHER = "other"      # a symlink, FIFO, device or socket where a store file belongs (local only)


@dataclass(frozen=True)
class Item:
    """One entry of a listing. `name`: relative to the store's root (`packs/ab/abcd…`);
    `kind`: FILE, FOLDER or OTHER; `size`: bytes (0 for a folder); `mtime`: seconds since
    the epoch (the upload time on object storage). Added with local.py, both optional:
    `symlink`, an OTHER that is a symlink (for check's advice; object storage leaves it
    False); `mtime_ns`, the mtime in nanoseconds where the backend has it exactly (a local
    file's; 0 if not: see `time_ns`)."""
    name: str
    kind: str
    size: int
    mtime: float
    symlink: bool = False
    mtime_ns: int = 0

    def time_ns(self) -> int:
        """The mtime in nanoseconds: exact where the backend gave it (prune and the journal
        compare a pack's time with a generation's, and a float of seconds cannot tell
        apart two times less than a microsecond apart)."""
        return self.mtime_ns or round(self.mtime * 1e9)


class Upload(ABC):
    """A store file being written (a pack): invisible under its name until `commit`, gone
    after `abort`. Not thread-safe; `write` may block on the network or the disk."""

    @abstractmethod
    def write(self, data: bytes | memoryview) -> None:
        """Appends `data`. OSError (ENOSPC, EROFS, …) on failure: then `abort`."""

    @abstractmethod
    def commit(self) -> None:
        """Makes the file durable under its name, atomically. OSError on failure, after which
        the upload is aborted."""

    @abstractmethod
    def abort(self) -> None:
        """Drops what was written. Never raises."""


class Lock(ABC):
    """A held lock (see Backend.lock). `release` is idempotent and never raises."""

    @abstractmethod
    def release(self) -> None: ...

    def __enter__(self) -> Lock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class LocationMissing(FileNotFoundError):
    """BACKUP_DIR itself is not there where a backend cannot make it tell (a bucket that
    does not exist): raised by any call; strerror is the one line to show."""


class Busy(Exception):
    """Backend.lock found the lock held. `info`: the bytes its holder stored with it (b""
    if none or unreadable)."""

    def __init__(self, info: bytes) -> None:
        super().__init__("held")
        self.info = info


class Backend(ABC):
    """One store's files. Thread-safe: the mount reads from many threads at once."""

    #: For messages: the store's folder, or s3://BUCKET/PREFIX/NAME.
    location: str
    #: The store's folder when it is on a local filesystem, else None. Only for what needs a
    #: real path and is not store access: advice in messages, excluding the store from a
    #: backup of a node it lives in, telling a watch that its drive went away.
    local_path: Path | None = None

    # -- reading ----------------------------------------------------------------------------

    @abstractmethod
    def read(self, name: str, limit: int | None = None) -> bytes:
        """The whole file `name`, or at most its first `limit` bytes."""

    @abstractmethod
    def read_into(self, name: str, offset: int, out: memoryview, nowait: bool = False) -> bool:
        """Fills `out` with the bytes at `offset` of the immutable file `name` (a pack). A file
        that ends before `out` is full raises EOFError. With `nowait`, returns False instead of
        waiting for a disk or the network (the mount then asks again from a worker thread);
        a backend that cannot tell always returns False then."""

    @abstractmethod
    def stat(self, name: str) -> Item:
        """The entry `name` (FileNotFoundError if there is none)."""

    @abstractmethod
    def list(self, folder: str = "", recursive: bool = False) -> list[Item]:
        """The entries of `folder` ("" is the store's root), sorted by name; with `recursive`,
        every file below it and no folders. FileNotFoundError if the folder is missing;
        NotADirectoryError if a file is in its place. Object storage has no folders: there
        a folder with nothing in it lists empty, and neither is raised (s3.py)."""

    # -- writing ----------------------------------------------------------------------------

    @abstractmethod
    def write(self, name: str, data: bytes, exclusive: bool = True) -> None:
        """Writes the whole file `name` atomically and durably: a reader sees all of it or none.
        `exclusive`: FileExistsError if `name` exists (the check and the write are one step);
        otherwise replaces it."""

    @abstractmethod
    def create(self, name: str) -> Upload:
        """Starts writing the file `name` in pieces (a pack); see Upload."""

    @abstractmethod
    def append(self, name: str, data: bytes, sync: bool) -> None:
        """Appends `data` to the file `name`, creating it (a run's journal, FORMAT.md 8).
        `sync`: durable before returning. Reading `name` gives every append in order."""

    @abstractmethod
    def delete(self, name: str) -> None:
        """Removes the file `name`; a missing one is not an error."""

    def delete_folder(self, folder: str) -> None:
        """Removes the folder `folder` and everything below it, never following a symlink
        (something planted in tmp/, which only ever holds a running writer's files); a missing
        one is not an error. Object storage deletes every object under the prefix. (Added
        with the cleaning of tmp/.)"""
        for item in self.list(folder, recursive=True):
            self.delete(item.name)

    @abstractmethod
    def rename(self, src: str, dst: str) -> None:
        """Moves the file `src` to `dst` (setting a damaged generation aside, FORMAT.md 10.4).
        FileExistsError if `dst` exists."""

    @abstractmethod
    def make_folder(self, folder: str) -> None:
        """Makes `folder` (mode 0700) if it is missing. Object storage has no folders: no-op."""

    def sync(self, folder: str = "") -> None:
        """Makes earlier deletes and renames in `folder` durable (a local folder's fsync)."""

    # -- locks ------------------------------------------------------------------------------

    @abstractmethod
    def lock(self, name: str, info: bytes, wait_s: float = 0.0) -> Lock:
        """Takes the exclusive lock `name` (`lock`, `prune.lock`) and stores `info` with it for
        others to read (b"": keep what is there). Waits up to `wait_s` seconds (infinite:
        until it is free), then raises Busy. Held until released or the process dies; on
        object storage, until its lease runs out (s3.py, docs/S3.md)."""

    @abstractmethod
    def locked(self, name: str) -> bool:
        """True if someone holds the lock `name` now, or that cannot be told."""

    def planted(self, folders: tuple[str, ...], files: tuple[str, ...]) -> str | None:
        """One line saying what is planted where a store folder of `folders` or a lock file
        of `files` belongs (a symlink, or the wrong type of file), which a writer or prune
        refuses to write into or through; None if nothing is. Object storage has neither
        symlinks nor folders: None. (Added with local.py.)"""
        return None

    #: True for a backend that serves packs from a cache of its own (cache.CachedBackend):
    #: bytes that fail authentication may then be a stale copy, worth one more read after
    #: `discard`.
    caches = False

    def discard(self, name: str) -> None:
        """Forgets what this backend caches of the file `name` (see `caches`). Never raises."""

    def close(self) -> None:
        """Releases cached handles. The backend may not be used afterwards."""


class Wrapper(Backend):
    """A backend that passes every call to the backend `inner`: the base of one that adds to
    some calls (cache.CachedBackend serves packs from its cache) and passes the rest on."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.location = inner.location
        self.local_path = inner.local_path

    def read(self, name: str, limit: int | None = None) -> bytes:
        return self.inner.read(name, limit)

    def read_into(self, name: str, offset: int, out: memoryview, nowait: bool = False) -> bool:
        return self.inner.read_into(name, offset, out, nowait)

    def stat(self, name: str) -> Item:
        return self.inner.stat(name)

    def list(self, folder: str = "", recursive: bool = False) -> list[Item]:
        return self.inner.list(folder, recursive)

    def write(self, name: str, data: bytes, exclusive: bool = True) -> None:
        self.inner.write(name, data, exclusive)

    def create(self, name: str) -> Upload:
        return self.inner.create(name)

    def append(self, name: str, data: bytes, sync: bool) -> None:
        self.inner.append(name, data, sync)

    def delete(self, name: str) -> None:
        self.inner.delete(name)

    def rename(self, src: str, dst: str) -> None:
        self.inner.rename(src, dst)

    def make_folder(self, folder: str) -> None:
        self.inner.make_folder(folder)

    def sync(self, folder: str = "") -> None:
        self.inner.sync(folder)

    def lock(self, name: str, info: bytes, wait_s: float = 0.0) -> Lock:
        return self.inner.lock(name, info, wait_s)

    def locked(self, name: str) -> bool:
        return self.inner.locked(name)

    def planted(self, folders: tuple[str, ...], files: tuple[str, ...]) -> str | None:
        return self.inner.planted(folders, files)

    def discard(self, name: str) -> None:
        self.inner.discard(name)

    def close(self) -> None:
        self.inner.close()


class Location(ABC):
    """BACKUP_DIR: a place that holds stores, each under its BACKUP_NAME."""

    #: For messages: the folder, or s3://BUCKET/PREFIX.
    location: str
    local_path: Path | None = None

    @abstractmethod
    def names(self) -> list[str]:
        """Names of the entries that may be stores (not starting with "."), sorted.
        FileNotFoundError if BACKUP_DIR is missing; NotADirectoryError if it is a file."""

    @abstractmethod
    def store(self, name: str) -> Backend:
        """The backend of the store `name`, whether or not it exists yet."""

    @abstractmethod
    def create_store(self, name: str, files: dict[str, bytes], folders: list[str]) -> Backend:
        """Creates the store `name` holding `files` (and, where folders exist, `folders`),
        atomically: it appears complete or not at all. FileExistsError if a store of that
        name exists (then open it instead); FileNotFoundError if BACKUP_DIR is missing (it is
        never created: an unmounted drive must not fill the local disk)."""

    def remove_dead_creations(self, name: str) -> None:
        """Removes what creations of the store `name` that were killed left behind (a local
        staging folder). Object storage creates a store by writing its files: nothing to do.
        (Added with local.py.)"""


def iter_names(items: list[Item], kind: str = FILE) -> Iterator[str]:
    """The last path component of each item of `kind`."""
    for item in items:
        if item.kind == kind:
            yield item.name.rpartition("/")[2]
