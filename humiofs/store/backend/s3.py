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
import queue
import re
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from humiofs.store.backend import FILE, FOLDER, Backend, Item, Location, Lock, Upload

if TYPE_CHECKING:
    from obstore.store import S3Store

log = logging.getLogger(__name__)

# Requests: a connection must be made in CONNECT_S and a whole request (a part of a pack, a
# ranged read) done in REQUEST_S. A failed request (5xx, refused or dropped connection,
# timeout) is tried again after 0.2, 0.4, 0.8, 1.6, 3.2 s (with jitter), at most RETRIES times
# and not after RETRY_WINDOW_S: a server that is down is reported after about 6 s, one that
# hangs after at most RETRY_WINDOW_S + REQUEST_S = 50 s.
CONNECT_S = 5
REQUEST_S = 20
RETRIES = 5
RETRY_WINDOW_S = 30
# A pack larger than this is sent as a multipart upload in parts of this size while it is
# written (memory: the queue plus the parts in flight, ~PART * (QUEUED_PARTS + PARALLEL_PARTS));
# a smaller one is sent in one PUT on commit.
PART = 8 << 20
QUEUED_PARTS = 1
PARALLEL_PARTS = 2

_PIECE = re.compile(r"^(.+)~(\d{8})$")    # one append of an appended file

SETTINGS = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
            "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ALLOW_HTTP")


@dataclass(frozen=True)
class S3Settings:
    """Where the S3 service is and who we are there, from the AWS_* settings. The secret is
    kept out of repr (and so out of logs and tracebacks)."""
    endpoint: str | None
    access_key_id: str | None
    secret_access_key: str | None = field(repr=False)
    region: str = "us-east-1"
    allow_http: bool = False
    session_token: str | None = field(default=None, repr=False)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> S3Settings:
        """Reads AWS_ENDPOINT_URL (none: AWS itself), AWS_ACCESS_KEY_ID,
        AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN (temporary credentials), AWS_REGION (else
        AWS_DEFAULT_REGION, else us-east-1) and AWS_ALLOW_HTTP (true/false; an http://
        endpoint on a loopback address is allowed without it). ValueError with one line for
        a bad value."""
        endpoint = env.get("AWS_ENDPOINT_URL") or None
        allow = env.get("AWS_ALLOW_HTTP", "").strip().lower()
        if allow not in ("", "true", "false", "1", "0", "yes", "no"):
            raise ValueError(f"AWS_ALLOW_HTTP must be true or false, not {allow!r}")
        allow_http = allow in ("true", "1", "yes")
        if endpoint is not None:
            m = re.match(r"^(https?)://([^/:]+|\[[^]]+\])(:\d+)?/?$", endpoint)
            if not m:
                raise ValueError(f"AWS_ENDPOINT_URL must look like https://HOST[:PORT], "
                                 f"not {endpoint!r}")
            if m.group(1) == "http" and not allow_http:
                if m.group(2) not in ("127.0.0.1", "localhost", "[::1]"):
                    raise ValueError(f"AWS_ENDPOINT_URL {endpoint} is plain http, which shows "
                                     "object names and sizes on the network: use https, or set "
                                     "AWS_ALLOW_HTTP=true")
                allow_http = True
        return cls(endpoint, env.get("AWS_ACCESS_KEY_ID") or None,
                   env.get("AWS_SECRET_ACCESS_KEY") or None,
                   env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1",
                   allow_http, env.get("AWS_SESSION_TOKEN") or None)


def parse_url(url: str) -> tuple[str, str]:
    """(bucket, prefix) of `s3://BUCKET[/PREFIX]`; the prefix has no leading or trailing `/`.
    ValueError with one line if it is not such a URL."""
    m = re.match(r"^s3://([a-z0-9][a-z0-9.-]{1,61}[a-z0-9])(/.*)?$", url)
    if not m:
        raise ValueError(f"{url!r} is not s3://BUCKET/PREFIX (a bucket name is 3-63 lower-case "
                         "letters, digits, dots and hyphens)")
    prefix = (m.group(2) or "").strip("/")
    parts = prefix.split("/") if prefix else []
    if any(p in ("", ".", "..") or p.startswith(".") for p in parts):
        raise ValueError(f"{url!r}: the prefix may not have empty, '.' or '..' parts, or parts "
                         "starting with '.'")
    return m.group(1), prefix


def _unquote(etag: str | None) -> str:
    # RadosGW answers 412 to If-Match with the quoted ETag (docs/S3.md).
    return (etag or "").strip('"')


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
                          "backoff": {"init_backoff": timedelta(milliseconds=200),
                                      "max_backoff": timedelta(seconds=4), "base": 2}})

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
            return FileNotFoundError(errno.ENOENT, (
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
        if status:
            reason = status.group(1) + (f", {code.group(1)}" if code else "")
            return OSError(errno.EIO, f"{self.endpoint} answered {reason} for {what}")
        return OSError(errno.EIO, f"S3 request for {what} failed: {head[:200]}")


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
        self._held: list[Any] = []           # s3lock.S3Lock objects this backend holds

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
            if limit is not None and "416" in str(exc).split("\n", 1)[0]:
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
        import obstore
        if nowait:
            return False
        if not len(out):
            return True
        try:
            data = obstore.get_range(self.client, self.key(name), start=offset,
                                     length=len(out))
        except Exception as exc:
            if "416" in str(exc).split("\n", 1)[0]:
                raise EOFError(f"{self.location}/{name} ends before {offset}") from None
            raise self.error(exc, name) from None
        got = memoryview(data)
        if len(got) < len(out):
            raise EOFError(f"{self.location}/{name} ends at {offset + len(got)}, "
                           f"{offset + len(out)} needed")
        out[:] = got
        return True

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
        return _S3Upload(self, name)

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


_DONE = object()
_ABORT = object()


class _S3Upload(Upload):
    """A pack on its way: held in memory up to PART bytes and PUT on commit; past that, a
    multipart upload fed from this thread through a queue of parts, completed on commit and
    aborted (by the client, on the failed iterator) on abort. The object appears only
    complete."""

    def __init__(self, backend: S3Backend, name: str) -> None:
        self.backend = backend
        self.name = name
        self._buffer = bytearray()
        self._queue: queue.Queue[object] | None = None
        self._thread: threading.Thread | None = None
        self._failure: BaseException | None = None
        self._closed = False

    def write(self, data: bytes | memoryview) -> None:
        if self._closed:
            raise ValueError("upload is closed")
        self._buffer += data
        if len(self._buffer) < PART:
            return
        if self._thread is None:
            self._start()
        while len(self._buffer) >= PART:
            part = bytes(self._buffer[:PART])
            del self._buffer[:PART]
            self._send(part)

    def _start(self) -> None:
        self._queue = queue.Queue(QUEUED_PARTS)
        self._thread = threading.Thread(target=self._run, name="s3-upload", daemon=True)
        self._thread.start()

    def _parts(self) -> Iterator[bytes]:
        assert self._queue is not None
        while True:
            part = self._queue.get()
            if part is _DONE:
                return
            if part is _ABORT:
                raise _Aborted()
            yield part      # type: ignore[misc]

    def _run(self) -> None:
        import obstore
        try:
            obstore.put(self.backend.client, self.backend.key(self.name), self._parts(),
                        chunk_size=PART, max_concurrency=PARALLEL_PARTS)
        except BaseException as exc:
            self._failure = exc
            assert self._queue is not None
            while True:     # unblock a writer waiting on a full queue
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    break

    def _send(self, item: object) -> None:
        assert self._queue is not None and self._thread is not None
        while self._failure is None:
            try:
                self._queue.put(item, timeout=0.5)
                return
            except queue.Full:
                if not self._thread.is_alive():
                    break
        self._raise()

    def _raise(self) -> None:
        exc = self._failure
        self.abort()
        if isinstance(exc, _Aborted) or exc is None:
            raise OSError(errno.EIO, f"the upload of {self.backend.location}/{self.name} "
                                     "stopped")
        raise self.backend.error(exc, self.name) from None

    def commit(self) -> None:
        import obstore
        if self._closed:
            raise ValueError("upload is closed")
        try:
            self.backend.ensure_held()
        except OSError:
            self.abort()
            raise
        if self._thread is None:
            data, self._buffer = bytes(self._buffer), bytearray()
            self._closed = True
            try:
                obstore.put(self.backend.client, self.backend.key(self.name), data,
                            use_multipart=False)
            except Exception as exc:
                raise self.backend.error(exc, self.name) from None
            return
        if self._buffer:
            self._send(bytes(self._buffer))
            self._buffer = bytearray()
        self._send(_DONE)
        self._thread.join()
        self._closed = True
        if self._failure is not None:
            self._raise()

    def abort(self) -> None:
        self._closed = True
        self._buffer = bytearray()
        if self._thread is not None and self._queue is not None:
            if self._thread.is_alive():
                try:
                    self._queue.put(_ABORT, timeout=REQUEST_S)
                except queue.Full:
                    pass
            self._thread.join(RETRY_WINDOW_S + REQUEST_S)
            self._thread = None


class _Aborted(Exception):
    pass


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
