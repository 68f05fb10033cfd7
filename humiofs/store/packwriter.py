"""Writing one pack (docs/FORMAT.md section 6): blobs appended to an upload of the backend
(backend.Upload: on a local store a file under tmp/), then made durable under packs/ or
dropped.
"""
from __future__ import annotations

import os
from collections.abc import Iterable
from typing import TYPE_CHECKING

from humiofs.store import crypto, format
from humiofs.store.backend import Upload
from humiofs.store.crypto import CHUNK, STORED_CHUNK
from humiofs.store.durable import store_io_error
from humiofs.store.storemeta import pack_name
from humiofs.store.format import Ref

if TYPE_CHECKING:
    from humiofs.store.repository import Store

_BATCH_CHUNKS = 4  # chunks encrypted into one write: 256 KiB stays in the CPU cache


class PackWriter:
    """Writes one pack; `finish` makes it durable under packs/, `abort` drops it."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.pack_id = os.urandom(16)
        try:
            self._upload: Upload | None = store.backend.create(pack_name(self.pack_id))
        except OSError as exc:
            raise store_io_error(exc, "a new pack") from None
        self.size = 0
        self.blobs = 0
        self._write(format.header(format.TYPE_PACK, format.PACK_VERSION))

    def _write(self, data: bytes | memoryview) -> None:
        if self._upload is None:
            raise ValueError("the pack is finished or aborted")
        try:
            self._upload.write(data)
        except OSError as exc:
            raise store_io_error(exc, f"pack {self.pack_id.hex()}") from None
        self.size += len(data)

    def add(self, kind: int, plaintext: bytes) -> Ref:
        """Appends a blob held in memory; returns its ref."""
        oid = crypto.new_object_id()
        sealed = self.store.cipher(kind, oid).seal(plaintext)
        offset = self.size
        self._write(sealed)
        self.blobs += 1
        return Ref(self.pack_id, oid, offset, len(sealed), len(plaintext))

    def add_stream(self, kind: int, pieces: Iterable[bytes | memoryview], plain_len: int) -> Ref:
        """Appends a blob of exactly `plain_len` bytes given as pieces of any size.

        Raises ValueError if the pieces add up to another length; the pack must then be aborted.
        """
        oid = crypto.new_object_id()
        cipher = self.store.cipher(kind, oid)
        n_chunks = crypto.chunk_count(plain_len)
        offset = self.size
        out = bytearray(_BATCH_CHUNKS * STORED_CHUNK)
        out_view = memoryview(out)
        pending = bytearray()
        index = 0
        pos = 0
        seen = 0

        def emit(chunk: bytes | bytearray | memoryview) -> None:
            nonlocal index, pos
            if index >= n_chunks:
                raise ValueError("blob is longer than announced")
            pos += cipher.encrypt_chunk_into(index, chunk, index == n_chunks - 1, out_view[pos:])
            index += 1
            if pos > len(out) - STORED_CHUNK:
                self._write(out_view[:pos])
                pos = 0

        for piece in pieces:
            view = memoryview(piece)
            seen += len(view)
            if pending:
                need = CHUNK - len(pending)
                pending += view[:need]
                view = view[need:]
                if len(pending) < CHUNK:
                    continue
                emit(pending)
                pending = bytearray()
            while len(view) >= CHUNK:
                emit(view[:CHUNK])
                view = view[CHUNK:]
            if view:
                pending += view
        if seen != plain_len:
            raise ValueError(f"blob has {seen} bytes, {plain_len} announced")
        if pending or index == 0:
            emit(pending)
        if pos:
            self._write(out_view[:pos])
        self.blobs += 1
        return Ref(self.pack_id, oid, offset, crypto.stored_len(plain_len), plain_len)

    def finish(self) -> None:
        """Makes the pack durable under its final name; refs into it become valid."""
        upload, self._upload = self._upload, None
        if upload is None:
            raise ValueError("the pack is finished or aborted")
        try:
            upload.commit()
        except OSError as exc:
            upload.abort()
            raise store_io_error(exc, f"pack {self.pack_id.hex()}") from None

    def abort(self) -> None:
        """Drops the unfinished pack."""
        upload, self._upload = self._upload, None
        if upload is not None:
            upload.abort()
