"""A bounded cache of decrypted, authenticated 64 KiB chunks of file data, shared by the
mount's readers; loads go through Store.read_chunks_into, so every byte is authenticated
before it enters the cache.
"""
from __future__ import annotations

import threading
from collections import OrderedDict

from humiofs import crypto
from humiofs.crypto import CHUNK
from humiofs.format import Ref
from humiofs.store import Store

CACHE_BYTES = 64 << 20        # decrypted file data kept


_Slot = tuple[bytearray, int, int]  # a decrypted chunk: its buffer, start and length there


class ChunkCache:
    """Decrypted 64 KiB chunks of file data, least recently used dropped past `max_bytes`.

    A load decrypts a run of chunks into one buffer, and each chunk is kept as a slot (buffer,
    start, length) of it, so that a read within a run is answered with a memoryview and no copy.
    Loads are shared: a reader that needs a chunk another thread is decrypting waits for it.
    """

    def __init__(self, max_bytes: int = CACHE_BYTES) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._data: OrderedDict[tuple[bytes, bytes, int], _Slot] = OrderedDict()
        self._loading: dict[tuple[bytes, bytes, int], threading.Event] = {}
        self._lock = threading.Lock()

    def get(self, ref: Ref, first: int, last: int) -> list[_Slot] | None:
        """Chunks first..last if all are cached, else None; never blocks on I/O."""
        out = []
        with self._lock:
            for i in range(first, last + 1):
                slot = self._data.get((ref.pack, ref.oid, i))
                if slot is None:
                    return None
                self._data.move_to_end((ref.pack, ref.oid, i))
                out.append(slot)
        return out

    def load(self, store: Store, ref: Ref, first: int, last: int) -> list[_Slot]:
        """Chunks first..last, read and authenticated from the store where not cached."""
        mine: list[int] = []
        waits: list[threading.Event] = []
        with self._lock:
            for i in range(first, last + 1):
                key = (ref.pack, ref.oid, i)
                if key in self._data:
                    continue
                event = self._loading.get(key)
                if event is not None:
                    waits.append(event)
                else:
                    self._loading[key] = threading.Event()
                    mine.append(i)
        try:
            for lo, hi in _runs(mine):
                slots = _decrypt(store, ref, lo, hi)
                assert slots is not None
                self._insert(ref, lo, slots)
        finally:
            with self._lock:
                for i in mine:
                    self._loading.pop((ref.pack, ref.oid, i)).set()
        for event in waits:
            event.wait(60)
        out = self.get(ref, first, last)
        # None if another thread's load failed or the cache is too small for the request.
        if out is None:
            out = _decrypt(store, ref, first, last)
            assert out is not None
        return out

    def _insert(self, ref: Ref, first: int, slots: list[_Slot]) -> None:
        with self._lock:
            for i, slot in enumerate(slots, first):
                old = self._data.pop((ref.pack, ref.oid, i), None)
                if old is not None:
                    self.bytes -= old[2]
                self._data[(ref.pack, ref.oid, i)] = slot
                self.bytes += slot[2]
            while self.bytes > self.max_bytes and self._data:
                self.bytes -= self._data.popitem(last=False)[1][2]

    def load_nowait(self, store: Store, ref: Ref, first: int, last: int) -> list[_Slot] | None:
        """Chunks first..last if their stored bytes are in the page cache (else None), for a
        small read on the event loop: it then never waits for the disk, and decrypting a
        chunk or two costs less than the hand-over to a worker thread."""
        with self._lock:
            if any((ref.pack, ref.oid, i) in self._loading for i in range(first, last + 1)):
                return None
        slots = _decrypt(store, ref, first, last, nowait=True)
        if slots is not None:
            self._insert(ref, first, slots)
        return slots


def _decrypt(store: Store, ref: Ref, first: int, last: int,
             nowait: bool = False) -> list[_Slot] | None:
    """Chunks first..last decrypted into one new buffer, as slots of it (None: see nowait)."""
    size = min(ref.plain_len, (last + 1) * CHUNK) - first * CHUNK
    buf = bytearray(size)
    if store.read_chunks_into(ref, crypto.KIND_DATA, first, last, memoryview(buf),
                              nowait) is None:
        return None
    return [(buf, k, min(CHUNK, size - k)) for k in range(0, size, CHUNK)] or [(buf, 0, 0)]


def _runs(indexes: list[int]) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    for i in indexes:
        if runs and runs[-1][1] == i - 1:
            runs[-1] = (runs[-1][0], i)
        else:
            runs.append((i, i))
    return runs
