"""Stores on S3-compatible object storage: BACKUP_DIR=s3://BUCKET/PREFIX (docs/S3.md).

Each store is the objects under `PREFIX/NAME/`, one object per store file under the file's
name (`PREFIX/NAME/packs/ab/abcd…`). Object storage has no folders, no appends and no renames,
so: `make_folder` does nothing and a folder with nothing in it lists empty rather than
missing; an appended file (a run's journal) is one object per append, `NAME~00000001`,
`NAME~00000002`, …, read back and listed as the one file `NAME`; `rename` is copy + delete.
The writer lock is a lease object (s3lock.py). obstore is the client (docs/S3.md says why).
"""
from __future__ import annotations

import errno
import logging
import os
import re
import threading
from collections.abc import Mapping
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from humiofs.store.backend import (
    FILE,
    FOLDER,
    Backend,
    Item,
    Location,
    LocationMissing,
    Lock,
    Upload,
)
from humiofs.store.backend.s3reads import ReadWindows
from humiofs.store.backend.s3settings import (
    BACKOFF_S,
    CONNECT_S,
    MAX_BACKOFF_S,
    REQUEST_S,
    RETRIES,
    RETRY_WINDOW_S,
    SETTINGS,
    S3Settings,
    parse_url,
)

__all__ = ["SETTINGS", "S3Backend", "S3Location", "S3Settings", "location_from_env", "open_s3",
           "parse_url", "use_settings"]

if TYPE_CHECKING:
    from obstore.store import S3Store

    from humiofs.store.backend.s3lock import S3Lock

log = logging.getLogger(__name__)

_PIECE = re.compile(r"^(.+)~(\d{8})$")    # one append of an appended file

class S3Location(Location):
    """BACKUP_DIR=s3://BUCKET/PREFIX. One HTTP client, shared by its stores (thread-safe).
    The bucket must exist: it is never created, as a local BACKUP_DIR is not."""

    def __init__(self, url: str, settings: S3Settings) -> None:
        from obstore.store import S3Store

        self.bucket, self.prefix = parse_url(url)
        self.location = f"s3://{self.bucket}" + (f"/{self.prefix}" if self.prefix else "")
        self.settings = settings
        self.endpoint = settings.endpoint or f"https://s3.{settings.region}.amazonaws.com"
        config: dict[str, Any] = {"region": settings.region}
        if settings.endpoint:
            config["endpoint"] = settings.endpoint
        if settings.access_key_id:
            config["access_key_id"] = settings.access_key_id
        if settings.secret_access_key:
            config["secret_access_key"] = settings.secret_access_key
        if settings.session_token:
            config["token"] = settings.session_token
        self.client: S3Store = S3Store(
            self.bucket, **config,
            client_options={"allow_http": settings.allow_http,
                            "connect_timeout": timedelta(seconds=CONNECT_S),
                            "timeout": timedelta(seconds=REQUEST_S)},
            retry_config={"max_retries": RETRIES,
                          "retry_timeout": timedelta(seconds=RETRY_WINDOW_S),
                          "backoff": {"init_backoff": timedelta(seconds=BACKOFF_S),
                                      "max_backoff": timedelta(seconds=MAX_BACKOFF_S),
                                      "base": 2}})

    def key(self, rel: str) -> str:
        return f"{self.prefix}/{rel}" if self.prefix else rel

    def names(self) -> list[str]:
        import obstore
        try:
            found = obstore.list_with_delimiter(self.client, self.prefix or None)
        except Exception as exc:
            raise self.error(exc, self.location) from None
        cut = len(self.prefix) + 1 if self.prefix else 0
        return sorted(n for n in (p[cut:] for p in found["common_prefixes"])
                      if n and not n.startswith("."))

    def store(self, name: str) -> S3Backend:
        return S3Backend(self, name)

    def create_store(self, name: str, files: dict[str, bytes], folders: list[str]
                     ) -> S3Backend:
        """Writes every file but `config`, then `config` if absent (If-None-Match): the
        store exists from that one PUT on. A creation that dies before it leaves key files
        without a config (docs/S3.md); one that loses the race removes its own files."""
        backend = S3Backend(self, name)
        self.names()    # a missing bucket: FileNotFoundError naming it
        try:
            backend.stat("config")
            raise FileExistsError(errno.EEXIST, f"a store exists at {backend.location}")
        except FileNotFoundError:
            pass
        last = "config" if "config" in files else max(files)
        written = []
        try:
            for rel in sorted(files):
                if rel != last:
                    backend.write(rel, files[rel], exclusive=True)
                    written.append(rel)
            backend.write(last, files[last], exclusive=True)
        except BaseException:
            for rel in written:
                backend.delete(rel)
            raise
        return backend

    def error(self, exc: BaseException, what: str) -> OSError:
        """The OSError (FORMAT of store/backend/__init__) for an obstore failure about `what`:
        one line a user can act on."""
        from obstore import exceptions as ox
        text = str(exc)
        head = text.split("\n", 1)[0]
        if isinstance(exc, (ox.PermissionDeniedError, ox.UnauthenticatedError)) \
                or " 403 " in head:
            code = re.search(r"<Code>([A-Za-z]+)</Code>", text)
            return PermissionError(errno.EACCES, (
                f"{self.endpoint} refused access to the bucket {self.bucket}"
                f" ({code.group(1) if code else 'forbidden'}): check AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, and that this user may use the bucket"))
        if "NoSuchBucket" in text:
            return LocationMissing(errno.ENOENT, (
                f"the bucket {self.bucket} does not exist at {self.endpoint}; create it "
                "(humiofs never does) or correct BACKUP_DIR"))
        if isinstance(exc, FileNotFoundError) or isinstance(exc, ox.NotFoundError):
            return FileNotFoundError(errno.ENOENT, f"{what}: no such object")
        if isinstance(exc, ox.AlreadyExistsError):
            return FileExistsError(errno.EEXIST, f"{what} exists")
        if isinstance(exc, OSError) and exc.errno is not None:
            return exc
        if "ConnectionRefused" in text or "kind: Connect" in text:
            return ConnectionRefusedError(errno.ECONNREFUSED, (
                f"cannot connect to {self.endpoint} (tried for {_tried(text)}): is the S3 "
                "service up, and AWS_ENDPOINT_URL right?"))
        if "kind: Timeout" in text or "TimedOut" in text:
            return TimeoutError(errno.ETIMEDOUT, (
                f"{self.endpoint} did not answer in time (tried for {_tried(text)})"))
        status = re.search(r"status code: (\d{3} [A-Za-z ]+?):", text)
        code = re.search(r"<Code>([A-Za-z]+)</Code>", text)
        if status and status.group(1).startswith("404") and not code:
            # A bucket call answered 404 with no S3 error code: not an S3 service (a web
            # server at AWS_ENDPOINT_URL), or BACKUP_DIR's bucket part is a path there.
            return LocationMissing(errno.ENOENT, (
                f"{self.endpoint} answered 404 Not Found without an S3 error code for {what}: "
                "it does not look like an S3 service; correct AWS_ENDPOINT_URL or BACKUP_DIR"))
        if status:
            reason = status.group(1) + (f", {code.group(1)}" if code else "")
            return OSError(errno.EIO, f"{self.endpoint} answered {reason} for {what}")
        return OSError(errno.EIO, f"S3 request for {what} failed: {head[:200]}")


def _range_not_satisfiable(exc: BaseException) -> bool:
    """True if `exc` is the server's 416 for a range past the end (an empty object). Matched on
    the status itself: a bare "416" in the first line also turns up inside request ids and
    times, and an error taken for an empty object read as a damaged config."""
    return bool(re.search(r"status code: 416\b|\b416 Range Not Satisfiable\b|<Code>InvalidRange<",
                          str(exc)))


def _tried(text: str) -> str:
    m = re.search(r" in ([0-9.]+)(m?s)", text)
    if not m:
        return "a while"
    seconds = float(m.group(1)) / (1000 if m.group(2) == "ms" else 1)
    return f"{seconds:.1f} s"


class S3Backend(Backend):
    """The store NAME of an S3Location: the objects under PREFIX/NAME/. Thread-safe."""

    def __init__(self, where: S3Location, name: str) -> None:
        self.where = where
        self.client = where.client
        self.root = where.key(name) + "/"
        self.location = f"{where.location}/{name}"
        self.local_path = None
        self._pieces: dict[str, int] = {}   # appended file -> its last piece number, ours
        self._lock = threading.Lock()
        self._windows = ReadWindows()
        self._held: list[S3Lock] = []        # the locks taken through this backend

    # -- helpers ------------------------------------------------------------------------------

    def key(self, name: str) -> str:
        return self.root + name

    def error(self, exc: BaseException, name: str) -> OSError:
        return self.where.error(exc, f"{self.location}/{name}" if name else self.location)

    def _rel(self, key: str) -> str:
        return key[len(self.root):]

    def _pieces_of(self, name: str) -> list[Any]:
        """The objects of the appended file `name`, in order."""
        import obstore
        # obstore lists by folder, never by a part of a name: list the folder, pick ours.
        folder, _, _ = self.key(name).rpartition("/")
        try:
            metas = obstore.list_with_delimiter(self.client, folder or None)["objects"]
        except Exception as exc:
            raise self.error(exc, name) from None
        mine = self.key(name) + "~"
        return sorted((m for m in metas if m["path"].startswith(mine)
                       and _PIECE.match(self._rel(m["path"]))), key=lambda m: m["path"])

    def ensure_held(self) -> None:
        """Raises OSError(ENOLCK) if a lease lock taken through this backend has run out: a
        writer that lost its lease must not commit anything (docs/S3.md)."""
        for held in list(self._held):
            held.check()

    # -- reading ------------------------------------------------------------------------------

    def read(self, name: str, limit: int | None = None) -> bytes:
        import obstore
        try:
            if limit is None:
                return bytes(obstore.get(self.client, self.key(name)).bytes())
            if limit <= 0:
                return b""
            return bytes(obstore.get(self.client, self.key(name),
                                     options={"range": (0, limit)}).bytes())
        except FileNotFoundError as exc:
            if "NoSuchBucket" in str(exc):
                raise self.error(exc, name) from None
            pieces = self._pieces_of(name)
            if not pieces:
                raise self.error(exc, name) from None
        except Exception as exc:
            if limit is not None and _range_not_satisfiable(exc):
                return b""      # an empty object has no first byte to range over
            raise self.error(exc, name) from None
        out = bytearray()
        for meta in pieces:
            if limit is not None and len(out) >= limit:
                break
            try:
                out += obstore.get(self.client, meta["path"]).bytes()
            except Exception as exc:
                raise self.error(exc, name) from None
        return bytes(out if limit is None else out[:limit])

    def read_into(self, name: str, offset: int, out: memoryview, nowait: bool = False) -> bool:
        if nowait:
            return False
        if not len(out):
            return True
        got = self._windows.read(name, offset, len(out), self._get_range)
        if len(got) < len(out):
            raise EOFError(f"{self.location}/{name} ends at {offset + len(got)}, "
                           f"{offset + len(out)} needed")
        out[:] = got
        return True

    def _get_range(self, name: str, offset: int, length: int) -> memoryview:
        """At most `length` bytes at `offset` of `name`: one ranged GET (fewer bytes at the
        end of the object, none past it)."""
        import obstore
        try:
            return memoryview(obstore.get_range(self.client, self.key(name), start=offset,
                                                length=length))
        except Exception as exc:
            if _range_not_satisfiable(exc):
                return memoryview(b"")
            raise self.error(exc, name) from None

    def stat(self, name: str) -> Item:
        import obstore
        try:
            meta = obstore.head(self.client, self.key(name))
            return Item(name, FILE, meta["size"], meta["last_modified"].timestamp())
        except FileNotFoundError as exc:
            if "NoSuchBucket" in str(exc):
                raise self.error(exc, name) from None
            pieces = self._pieces_of(name)
            if pieces:
                return Item(name, FILE, sum(m["size"] for m in pieces),
                            pieces[-1]["last_modified"].timestamp())
            if self._has_objects(name):
                return Item(name, FOLDER, 0, 0.0)
            raise self.error(exc, name) from None
        except Exception as exc:
            raise self.error(exc, name) from None

    def _has_objects(self, folder: str) -> bool:
        """Whether any object is under `folder`/: a folder exists while it holds something."""
        import obstore
        try:
            for batch in obstore.list(self.client, self.key(folder), chunk_size=1):
                if batch:
                    return True
            return False
        except Exception as exc:
            raise self.error(exc, folder) from None

    def list(self, folder: str = "", recursive: bool = False) -> list[Item]:
        """As Backend.list, except that object storage has no empty folders: a folder with
        nothing in it lists empty (FileNotFoundError only for a missing bucket), and a file in
        a folder's place is not noticed."""
        import obstore
        prefix = self.key(folder).rstrip("/")
        items: dict[str, Item] = {}
        metas: list[Any]
        folders: list[str] = []
        try:
            if recursive:
                metas = [m for batch in obstore.list(self.client, prefix) for m in batch]
            else:
                found = obstore.list_with_delimiter(self.client, prefix)
                metas, folders = list(found["objects"]), list(found["common_prefixes"])
        except Exception as exc:
            raise self.error(exc, folder) from None
        for p in folders:
            rel = self._rel(p).rstrip("/")
            items[rel] = Item(rel, FOLDER, 0, 0.0)
        for m in metas:
            rel = self._rel(m["path"])
            piece = _PIECE.match(rel)
            if piece:
                rel = piece.group(1)
                with self._lock:
                    self._pieces.setdefault(rel, 0)
                had = items.get(rel)
                size = m["size"] + (had.size if had else 0)
                items[rel] = Item(rel, FILE, size, max(m["last_modified"].timestamp(),
                                                       had.mtime if had else 0.0))
            else:
                items[rel] = Item(rel, FILE, m["size"], m["last_modified"].timestamp())
        return [items[k] for k in sorted(items)]

    # -- writing ------------------------------------------------------------------------------

    def write(self, name: str, data: bytes, exclusive: bool = True) -> None:
        import obstore
        self.ensure_held()
        try:
            obstore.put(self.client, self.key(name), data, use_multipart=False,
                        mode="create" if exclusive else "overwrite")
        except Exception as exc:
            err = self.error(exc, name)
            if isinstance(err, FileExistsError) and self._own_retry(name, data):
                return
            raise err from None

    def _own_retry(self, name: str, data: bytes) -> bool:
        """Whether `name` holds exactly `data`: a create whose first try landed but whose
        answer was lost is retried by the client and then finds its own object."""
        try:
            return self.read(name, len(data) + 1) == data
        except OSError:
            return False

    def create(self, name: str) -> Upload:
        from humiofs.store.backend.s3upload import S3Upload
        return S3Upload(self, name)

    def append(self, name: str, data: bytes, sync: bool) -> None:
        """One object per append (`name~00000001`, …): durable when this returns, whatever
        `sync`. The first append of a file this process did not start continues its count."""
        import obstore
        self.ensure_held()
        with self._lock:
            last = self._pieces.get(name)
        if not last:
            pieces = self._pieces_of(name)
            found = _PIECE.match(self._rel(pieces[-1]["path"])) if pieces else None
            last = int(found.group(2)) if found else 0
        piece = f"{name}~{last + 1:08d}"
        try:
            obstore.put(self.client, self.key(piece), data, use_multipart=False, mode="create")
        except Exception as exc:
            err = self.error(exc, piece)
            if not (isinstance(err, FileExistsError) and self._own_retry(piece, data)):
                raise err from None
        with self._lock:
            self._pieces[name] = last + 1

    def delete(self, name: str) -> None:
        """Removes the object `name`, and the pieces of an appended file that this backend
        has appended to, listed, read or stat'd."""
        import obstore
        self.ensure_held()      # a prune that lost its lock deletes nothing more
        with self._lock:
            appended = name in self._pieces
        keys = [self.key(name)]
        if appended:
            keys += [m["path"] for m in self._pieces_of(name)]
        try:
            obstore.delete(self.client, keys)
        except FileNotFoundError:
            pass
        except Exception as exc:
            raise self.error(exc, name) from None
        with self._lock:
            self._pieces.pop(name, None)
        self._windows.forget(name)

    # Reads forward through a pack are served from windows (s3reads.py): a pack put back
    # after damage is worth one more read, afresh.
    caches = True

    def discard(self, name: str) -> None:
        self._windows.forget(name)

    def rename(self, src: str, dst: str) -> None:
        """Copy, then delete: not atomic (a crash between leaves both, which names the same
        bytes twice), and the check that `dst` is free is a separate request."""
        import obstore
        self.ensure_held()
        try:
            self.stat(dst)
            raise FileExistsError(errno.EEXIST, f"{self.location}/{dst} exists")
        except FileNotFoundError:
            pass
        data = self.read(src)
        try:
            obstore.put(self.client, self.key(dst), data, use_multipart=False, mode="create")
        except Exception as exc:
            raise self.error(exc, dst) from None
        self.delete(src)

    def make_folder(self, folder: str) -> None:
        pass

    # -- locks --------------------------------------------------------------------------------

    def lock(self, name: str, info: bytes, wait_s: float = 0.0) -> Lock:
        from humiofs.store.backend.s3lock import take
        return take(self, name, info, wait_s)

    def locked(self, name: str) -> bool:
        from humiofs.store.backend.s3lock import is_held
        return is_held(self, name)


_settings: S3Settings | None = None
_locations: dict[tuple[str, S3Settings], S3Location] = {}
_locations_lock = threading.Lock()


def use_settings(env: Mapping[str, str]) -> None:
    """Makes the AWS_* values of `env` (config.load merges the environment and the env file)
    the settings of every S3Location opened from now on. ValueError for a bad value."""
    global _settings
    _settings = S3Settings.from_env(env)


def open_s3(url: str) -> S3Location:
    """The S3Location of `url` with the settings of use_settings (else os.environ's): one
    per URL and settings, so that its stores share one HTTP client."""
    settings = _settings if _settings is not None else S3Settings.from_env(os.environ)
    bucket, prefix = parse_url(url)
    canonical = f"s3://{bucket}/{prefix}"
    with _locations_lock:
        found = _locations.get((canonical, settings))
        if found is None:
            found = _locations[(canonical, settings)] = S3Location(url, settings)
        return found


def location_from_env(url: str, env: Mapping[str, str] | None = None) -> S3Location:
    """The S3Location of BACKUP_DIR=`url` with the AWS_* settings of `env` (os.environ by
    default). ValueError with one line for a bad URL or setting."""
    return S3Location(url, S3Settings.from_env(os.environ if env is None else env))
