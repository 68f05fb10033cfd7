"""A bounded cache of decrypted 64 KiB chunks of file data in one shared-memory buffer.

The buffer is a MAP_SHARED mapping cut into 64 KiB slots, so that the decryption worker process
(decryptd) can decrypt into it and the mount read from it without a copy between them. Slots
are handed out from a ring: a load takes a contiguous run of slots at the hand (so that a read
within it is one slice), dropping the chunks that were there first in first out.

A slot is in one of three states: free, loading (a load owns it; its bytes are not to be read,
and may be unauthenticated if the load fails) or ready (an authenticated chunk). Only ready
slots are ever read. A loading slot is never handed out again; nor is a pinned one, which a
reader is waiting to copy out.

All bookkeeping runs on the trio thread; only the decryption itself (in the worker process or a
thread) writes into slots, and only into slots of a load that owns them.
"""
from __future__ import annotations

import mmap

import trio

from humiofs.store.crypto import CHUNK
from humiofs.store.format import Ref

CACHE_BYTES = 64 << 20        # decrypted file data kept

Key = tuple[bytes, bytes, int]  # (pack, object id, chunk index)


class Load:
    """A run of chunks being decrypted into slots start.. of the cache."""

    __slots__ = ("keys", "start", "sizes", "done", "error")

    def __init__(self, keys: list[Key], start: int, sizes: list[int]) -> None:
        self.keys, self.start, self.sizes = keys, start, sizes  # sizes: plaintext per chunk
        self.done = trio.Event()
        self.error: str | None = None


class ChunkCache:
    def __init__(self, max_bytes: int = CACHE_BYTES) -> None:
        self.slots = max(1, max_bytes // CHUNK)
        self.shared = mmap.mmap(-1, self.slots * CHUNK)  # MAP_SHARED | MAP_ANONYMOUS
        self.view = memoryview(self.shared)
        self.bytes = 0                                # ready bytes held
        self._slot: dict[Key, int] = {}               # ready or loading chunks
        self._key: list[Key | None] = [None] * self.slots
        self._size = [0] * self.slots                 # bytes in a ready slot
        self._load: list[Load | None] = [None] * self.slots
        self._pins = [0] * self.slots
        self._hand = 0
        self.closed = False       # close() released the slots: a load still running fails

    def close(self) -> None:
        self.closed = True
        try:
            self.view.release()
            self.shared.close()
        except BufferError:  # a slice is still referenced somewhere: freed with it
            pass

    def find(self, key: Key) -> tuple[int, Load | None] | None:
        """(slot, the load filling it or None if ready), or None if the chunk is not here."""
        slot = self._slot.get(key)
        return None if slot is None else (slot, self._load[slot])

    def ready_run(self, ref: Ref, first: int, last: int) -> int | None:
        """The first slot, if chunks first..last are all ready in slots slot, slot + 1, ...
        (as one load leaves them): the common case of a read, answered in one pass."""
        get, loads, pack, oid = self._slot.get, self._load, ref.pack, ref.oid
        start = get((pack, oid, first))
        if start is None or start + last - first >= self.slots:
            return None
        for slot in range(start, start + last - first + 1):
            if loads[slot] is not None or get((pack, oid, first + slot - start)) != slot:
                return None
        return start

    def pin(self, slot: int) -> None:
        self._pins[slot] += 1

    def unpin(self, slot: int) -> None:
        self._pins[slot] -= 1

    def reserve(self, ref: Ref, first: int, last: int) -> Load | None:
        """A load of chunks first..last into a run of slots taken at the hand (their old
        chunks dropped); None if no run that long is free of loading and pinned slots."""
        n = last - first + 1
        if n > self.slots:
            return None
        start, scanned = self._hand, 0
        while scanned < self.slots + n:
            if start + n > self.slots:          # runs do not wrap around
                scanned += self.slots - start
                start = 0
                continue
            busy = next((s for s in range(start + n - 1, start - 1, -1)
                         if self._pins[s] or self._load[s] is not None), None)
            if busy is None:
                break
            scanned += busy + 1 - start
            start = busy + 1
        else:
            return None
        keys = [(ref.pack, ref.oid, i) for i in range(first, last + 1)]
        load = Load(keys, start, [min(CHUNK, ref.plain_len - i * CHUNK)
                                  for i in range(first, last + 1)])
        for slot, key in enumerate(keys, start):
            self._drop(slot)
            self._key[slot], self._load[slot] = key, load
            self._slot[key] = slot
        self._hand = (start + n) % self.slots
        return load

    def region(self, load: Load) -> memoryview:
        """Where a load decrypts to: its slots, back to back."""
        return self.view[load.start * CHUNK:(load.start + len(load.keys)) * CHUNK]

    def finish(self, load: Load, error: str | None) -> None:
        """Ends a load: its chunks become readable, or on `error` are dropped unread; wakes its
        waiters."""
        load.error = error
        for slot, size in enumerate(load.sizes, load.start):
            self._load[slot] = None
            if error is None:
                self._size[slot] = size
                self.bytes += size
            else:
                self._drop(slot)
        load.done.set()

    def chunk(self, slot: int) -> memoryview:
        """The plaintext in a ready slot."""
        assert self._load[slot] is None and self._key[slot] is not None
        return self.view[slot * CHUNK:slot * CHUNK + self._size[slot]]

    def run(self, slot: int, skip: int, n: int) -> memoryview:
        """`n` bytes at `skip` into the ready slots slot, slot + 1, ..."""
        return self.view[slot * CHUNK + skip:slot * CHUNK + skip + n]

    def _drop(self, slot: int) -> None:
        key = self._key[slot]
        if key is not None:
            del self._slot[key]
            self._key[slot] = None
            self.bytes -= self._size[slot]  # 0 while loading
            self._size[slot] = 0
