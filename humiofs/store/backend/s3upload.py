"""Uploading a pack to object storage (Backend.create on S3, docs/S3.md): in one PUT on commit
up to PART bytes, else a multipart upload streamed while the pack is written."""
from __future__ import annotations

import errno
import queue
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING

from humiofs.store.backend import Upload
from humiofs.store.backend.s3settings import REQUEST_S, RETRY_WINDOW_S

if TYPE_CHECKING:
    from humiofs.store.backend.s3 import S3Backend

# A pack larger than this is sent as a multipart upload in parts of this size while it is
# written (memory: the queue plus the parts in flight, ~PART * (QUEUED_PARTS + PARALLEL_PARTS));
# a smaller one is sent in one PUT on commit.
PART = 8 << 20
QUEUED_PARTS = 1
PARALLEL_PARTS = 2

_DONE = object()
_ABORT = object()


class S3Upload(Upload):
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
