"""Where the pack cache (cache.py) keeps its blocks: the mount's cache folder (BlockFolder:
block files, their checks, and eviction of the least recently used under a size limit,
shared by the processes using it), or memory for a restore's read-ahead (MemoryBlocks).

`folder` (mode 0700, made if missing) holds one file per block, mode 0600, named
`ab/<32 hex>.<block index>`, where the hex is the first 128 bits of SHA-256 over a namespace
(the wrapped backend's location) and the pack's name, so stores sharing one folder never
share a block (`ab` is its first two digits). A block file is a header, then the block's
bytes (the pack's stored bytes at block index x block size):

    magic "humiofsB" | version u16 = 1 | piece count u16 | length u32 | pack size u64
    | block index u64 | name digest 16 bytes | piece CRC-32s, u32 each | header CRC-32 u32

all little-endian; each CRC-32 covers one PIECE (64 KiB) of the block, so a read checks only
the pieces it uses. A file that is truncated, has another version, another name digest or
block index, or a CRC that does not match is a miss: it is deleted, to be fetched again. The
CRCs catch a damaged disk or a half-written file, not an attacker: one who can write this
folder can write matching CRCs, and is stopped by the store's authentication above.

`usage` holds the bytes of all block files (u64), and its flock serialises the processes that
share the folder (the mount's server and its decryption worker). When an addition takes it
over the limit, a pass over the folder removes the least recently used files (by mtime, set
on every hit) down to LOW_WATER of the limit, and sets it to what is really there.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import os
import stat
import struct
import threading
import time
import zlib
from collections import OrderedDict
from pathlib import Path

log = logging.getLogger(__name__)

PIECE = 64 << 10             # bytes per CRC-32
LOW_WATER = 0.9              # an eviction pass leaves the folder at this share of its limit
_TMP_AGE_S = 60.0            # a leftover temporary file older than this is removed

MAGIC = b"humiofsB"
VERSION = 1
_HEAD = struct.Struct("<8sHHIQQ16s")
_CRC = struct.Struct("<I")


class BlockFolder:
    """Block files of packs in `folder`, at most `max_bytes` of them (headers included; a
    folder shared by processes may exceed it briefly by the blocks being written at that
    moment). Thread-safe; call `reset` in a forked child. Reading and writing never raise:
    a problem is a miss, logged once at warning level.
    Raises OSError if `folder` cannot be made, or is not a folder this user owns."""

    def __init__(self, folder: Path, namespace: str, max_bytes: int, block_bytes: int) -> None:
        if block_bytes <= 0 or block_bytes % PIECE or block_bytes // PIECE > 0xFFFF:
            raise ValueError(f"block_bytes {block_bytes} is not a multiple of {PIECE}")
        self.folder = Path(folder)
        self.max_bytes = max_bytes
        self.block_bytes = block_bytes
        self._header_len = _HEAD.size + _CRC.size * (block_bytes // PIECE + 1)
        self._namespace = os.fsencode(namespace) + b"\0"
        # For tests: blocks served, block files found damaged, eviction passes.
        self.hits = self.damaged = self.evictions = 0
        make_folder(self.folder)
        self.reset()
        with self._usage_locked() as fd:
            self._rescan(fd, self.max_bytes)

    def reset(self) -> None:
        """Fresh locks and a usage fd of this process's own (after a fork)."""
        self._lock = threading.Lock()
        self._usage_lock = threading.Lock()
        self._usage_fd: int | None = None
        self._warned = False

    def close(self) -> None:
        with self._usage_lock:
            if self._usage_fd is not None:
                os.close(self._usage_fd)
                self._usage_fd = None

    def has(self, name: str, index: int) -> bool:
        """Whether a file for the block is there (unchecked)."""
        return self._path(name, index).exists()

    def _stem(self, name: str) -> str:
        return hashlib.sha256(self._namespace + name.encode()).hexdigest()[:32]

    def _path(self, name: str, index: int) -> Path:
        stem = self._stem(name)
        return self.folder / stem[:2] / f"{stem}.{index}"

    def get(self, name: str, index: int, skip: int, out: memoryview,
            nowait: bool = False) -> int | None:
        """Copies the bytes at `skip` of block `index` of the pack `name` into `out`, and
        returns the pack's size; None if the block is not here (or, with `nowait`, not all in
        the page cache). A damaged block file is deleted: None. EOFError if the block ends
        before `out` is full (the pack ends there)."""
        path = self._path(name, index)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return None
        flags = os.RWF_NOWAIT if nowait else 0
        try:
            head = _pread(fd, self._header_len, 0, flags)
            if head is None:
                return None
            parsed = self._parse_header(head, name, index)
            if parsed is None:
                self._drop_damaged(path, fd, "its header is damaged")
                return None
            length, size, crcs, data_at = parsed
            if skip + len(out) > length:
                raise EOFError(f"{name} ends at byte {index * self.block_bytes + length}")
            lo, hi = skip // PIECE, (skip + len(out) - 1) // PIECE
            start = lo * PIECE
            data = _pread(fd, min(length, (hi + 1) * PIECE) - start, data_at + start, flags)
            if data is None:
                return None
            for k in range(lo, hi + 1):
                piece = data[(k - lo) * PIECE:(k - lo + 1) * PIECE]
                if len(piece) != min(PIECE, length - k * PIECE) or zlib.crc32(piece) != crcs[k]:
                    self._drop_damaged(path, fd, f"piece {k} is damaged or missing")
                    return None
            out[:] = memoryview(data)[skip - start:skip - start + len(out)]
            try:
                os.utime(fd)          # its last use, for eviction (least recently used first)
            except OSError:
                pass
        except OSError as exc:
            if exc.errno == errno.EAGAIN:
                return None
            self._warn(f"cannot read {path}: {exc.strerror}")
            return None
        finally:
            os.close(fd)
        with self._lock:
            self.hits += 1
        return size

    def _parse_header(self, head: bytes, name: str, index: int
                      ) -> tuple[int, int, list[int], int] | None:
        """(length, pack size, piece CRCs, where the data starts), or None if the header is
        not this block's or does not check."""
        if len(head) < _HEAD.size:
            return None
        magic, version, pieces, length, size, got_index, digest = _HEAD.unpack_from(head)
        end = _HEAD.size + _CRC.size * pieces
        if (magic != MAGIC or version != VERSION or got_index != index
                or digest != bytes.fromhex(self._stem(name)) or len(head) < end + _CRC.size
                or pieces != -(-length // PIECE) or length > self.block_bytes
                or index * self.block_bytes + length > size
                or _CRC.unpack_from(head, end)[0] != zlib.crc32(head[:end])):
            return None
        crcs = [c for (c,) in _CRC.iter_unpack(head[_HEAD.size:end])]
        return length, size, crcs, end + _CRC.size

    def _drop_damaged(self, path: Path, fd: int, why: str) -> None:
        log.info("cache block %s: %s; fetching it again", path, why)
        with self._lock:
            self.damaged += 1
        try:
            size = os.fstat(fd).st_size
            os.unlink(path)
            self._add_usage(-size)
        except OSError:
            pass

    def put(self, name: str, index: int, size: int, data: bytes | memoryview) -> None:
        """Stores block `index` (`data`) of the pack `name` of `size` bytes, atomically: a
        temporary file renamed into place (a crash leaves at worst a file whose CRCs do not
        match). Never raises."""
        pieces = -(-len(data) // PIECE)
        head = _HEAD.pack(MAGIC, VERSION, pieces, len(data), size, index,
                          bytes.fromhex(self._stem(name)))
        head += b"".join(_CRC.pack(zlib.crc32(data[k * PIECE:(k + 1) * PIECE]))
                         for k in range(pieces))
        head += _CRC.pack(zlib.crc32(head))
        path = self._path(name, index)
        tmp = path.parent / f".tmp-{os.getpid()}-{threading.get_ident()}"
        try:
            for attempt in (0, 1):
                try:
                    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
                                 | os.O_CLOEXEC, 0o600)
                    break
                except FileNotFoundError:
                    if attempt:
                        raise
                    path.parent.mkdir(mode=0o700, exist_ok=True)
            try:
                if os.writev(fd, [head, data]) != len(head) + len(data):
                    raise OSError(errno.EIO, "short write")
            finally:
                os.close(fd)
            os.rename(tmp, path)
        except OSError as exc:
            self._warn(f"cannot write {path}: {exc.strerror}")
            try:
                os.unlink(tmp)
            except OSError:
                pass
            return
        self._add_usage(len(head) + len(data))

    def discard(self, name: str) -> None:
        """Removes every block file of the pack `name`. Never raises."""
        stem = self._stem(name)
        try:
            entries = list(os.scandir(self.folder / stem[:2]))
        except OSError:
            return
        freed = 0
        for entry in entries:
            if entry.name.startswith(stem + "."):
                try:
                    size = entry.stat(follow_symlinks=False).st_size
                    os.unlink(entry.path)
                    freed += size
                except OSError:
                    pass
        if freed:
            self._add_usage(-freed)

    # -- usage and eviction -------------------------------------------------------------------

    def _usage_locked(self) -> _UsageLock:
        return _UsageLock(self)

    def _add_usage(self, delta: int) -> None:
        try:
            with self._usage_locked() as fd:
                raw = os.pread(fd, 8, 0)
                total = max(0, (int.from_bytes(raw, "little") if len(raw) == 8 else 0) + delta)
                if total > self.max_bytes:
                    self._rescan(fd, int(self.max_bytes * LOW_WATER))
                else:
                    os.pwrite(fd, total.to_bytes(8, "little"), 0)
        except OSError as exc:
            self._warn(f"cannot update {self.folder / 'usage'}: {exc.strerror}")

    def _rescan(self, fd: int, target: int) -> None:
        """Counts the block files (under the usage flock), removes the least recently used
        until at most `target` bytes remain (and temporary files left by dead writers), and
        records the total."""
        files: list[tuple[float, int, str]] = []
        now = time.time()
        try:
            subs = [e for e in os.scandir(self.folder) if len(e.name) == 2 and e.is_dir(
                follow_symlinks=False)]
        except OSError as exc:
            self._warn(f"cannot list {self.folder}: {exc.strerror}")
            return
        for sub in subs:
            try:
                entries = list(os.scandir(sub.path))
            except OSError:
                continue
            for entry in entries:
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                if entry.name.startswith(".tmp-"):
                    if now - st.st_mtime > _TMP_AGE_S:
                        _unlink(entry.path)
                    continue
                if stat.S_ISREG(st.st_mode):
                    files.append((st.st_mtime, st.st_size, entry.path))
        total = sum(f[1] for f in files)
        if total > target:
            with self._lock:
                self.evictions += 1
            files.sort()
            for _, size, path in files:
                if total <= target:
                    break
                if _unlink(path):
                    total -= size
        os.pwrite(fd, total.to_bytes(8, "little"), 0)

    def _warn(self, msg: str) -> None:
        with self._lock:
            warned, self._warned = self._warned, True
        (log.debug if warned else log.warning)(
            "the mount's cache: %s (reads are served from the store meanwhile)", msg)


class _UsageLock:
    """Holds the usage file's flock and this process's lock; gives the usage file's fd."""

    def __init__(self, cache: BlockFolder) -> None:
        self.cache = cache

    def __enter__(self) -> int:
        c = self.cache
        c._usage_lock.acquire()
        try:
            if c._usage_fd is None:
                c._usage_fd = os.open(c.folder / "usage", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW
                                      | os.O_CLOEXEC, 0o600)
            fcntl.flock(c._usage_fd, fcntl.LOCK_EX)
        except BaseException:
            c._usage_lock.release()
            raise
        return c._usage_fd

    def __exit__(self, *exc: object) -> None:
        c = self.cache
        try:
            if c._usage_fd is not None:
                fcntl.flock(c._usage_fd, fcntl.LOCK_UN)
        finally:
            c._usage_lock.release()


def make_folder(folder: Path) -> None:
    """Makes `folder` mode 0700 (and its parents), or checks that it is a folder this user
    owns, and makes it 0700. OSError otherwise."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = os.lstat(folder)
    if not stat.S_ISDIR(st.st_mode):
        raise NotADirectoryError(errno.ENOTDIR, "not a folder", str(folder))
    if st.st_uid != os.geteuid():
        raise PermissionError(errno.EPERM, "owned by another user", str(folder))
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(folder, 0o700)


def _pread(fd: int, n: int, offset: int, flags: int) -> bytes | None:
    """Up to `n` bytes at `offset`; None if RWF_NOWAIT would have had to wait."""
    if not flags:
        return os.pread(fd, n, offset)
    buf = bytearray(n)
    try:
        got = os.preadv(fd, [buf], offset, flags)
    except BlockingIOError:
        return None
    if got < n and got < os.fstat(fd).st_size - offset:
        return None     # partly in the page cache
    return bytes(buf[:got])

def _unlink(path: str) -> bool:
    try:
        os.unlink(path)
        return True
    except OSError:
        return False



class MemoryBlocks:
    """BlockFolder's interface over memory: at most `max_bytes` of blocks, the least recently
    used dropped first. For a reader that reads each pack once, in order (a restore), where
    read-ahead is what counts and a cache on disk would only be written and thrown away.
    Thread-safe."""

    def __init__(self, max_bytes: int, block_bytes: int) -> None:
        self.max_bytes, self.block_bytes = max_bytes, block_bytes
        self.hits = self.damaged = self.evictions = 0
        self._blocks: OrderedDict[tuple[str, int], tuple[int, bytes]] = OrderedDict()
        self._bytes = 0
        self.reset()

    def reset(self) -> None:
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._blocks.clear()
            self._bytes = 0

    def has(self, name: str, index: int) -> bool:
        with self._lock:
            return (name, index) in self._blocks

    def get(self, name: str, index: int, skip: int, out: memoryview,
            nowait: bool = False) -> int | None:
        """As BlockFolder.get."""
        with self._lock:
            found = self._blocks.get((name, index))
            if found is None:
                return None
            self._blocks.move_to_end((name, index))
            self.hits += 1
        size, data = found
        if skip + len(out) > len(data):
            raise EOFError(f"{name} ends at byte {index * self.block_bytes + len(data)}")
        out[:] = memoryview(data)[skip:skip + len(out)]
        return size

    def put(self, name: str, index: int, size: int, data: bytes | memoryview) -> None:
        block = bytes(data)
        with self._lock:
            old = self._blocks.pop((name, index), None)
            if old is not None:
                self._bytes -= len(old[1])
            self._blocks[(name, index)] = (size, block)
            self._bytes += len(block)
            while self._bytes > self.max_bytes and len(self._blocks) > 1:
                _, (_, dropped) = self._blocks.popitem(last=False)
                self._bytes -= len(dropped)
                self.evictions += 1

    def discard(self, name: str) -> None:
        with self._lock:
            for key in [k for k in self._blocks if k[0] == name]:
                self._bytes -= len(self._blocks.pop(key)[1])
