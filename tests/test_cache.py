"""The mount's pack cache (humiofs/store/backend/cache.py, blockfolder.py) over a real S3
backend on the local server (scripts/s3-server): hits, nowait, the size bound and eviction,
read-ahead, damaged block files, concurrency, processes sharing the folder.

`Counting` wraps the real backend and counts what reaches it (it is not a mock: every call
goes to the server)."""
from __future__ import annotations

import json
import os
import random
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from humiofs.store.backend import Backend, Item, Wrapper
from humiofs.store.backend.blockfolder import PIECE, BlockFolder, MemoryBlocks
from humiofs.store.backend.cache import CachedBackend
from humiofs.store.backend.s3 import location_from_env
from conftest import KEY
from s3util import S3Server

pytestmark = pytest.mark.s3

B = 128 << 10                 # the tests' block size: small, so that packs of a few MiB do
DEADLINE_S = 30.0


class Counting(Wrapper):
    """Passes every call to `inner`, recording the ranged reads and stats that reach it."""

    def __init__(self, inner: Backend) -> None:
        super().__init__(inner)
        self.reads: list[tuple[str, int, int]] = []
        self.stats = 0
        self._lock = threading.Lock()

    def blocks_read(self, name: str) -> list[int]:
        """Block indexes (of size B) of every byte range read of `name`, in order."""
        with self._lock:
            return [i for n, off, size in self.reads if n == name
                    for i in range(off // B, (off + size - 1) // B + 1)]

    def read_into(self, name: str, offset: int, out: memoryview, nowait: bool = False) -> bool:
        with self._lock:
            self.reads.append((name, offset, len(out)))
        return self.inner.read_into(name, offset, out, nowait)

    def stat(self, name: str) -> Item:
        with self._lock:
            self.stats += 1
        return self.inner.stat(name)

    def read(self, name: str, limit: int | None = None) -> bytes:
        with self._lock:
            self.reads.append((name, 0, -1))
        return self.inner.read(name, limit)











Packs = tuple[Backend, dict[str, bytes]]


@pytest.fixture(scope="module")
def packs(s3_server: S3Server) -> Iterator[Packs]:
    """A store on S3 (the real S3Backend) holding a config object and packs of a few MiB;
    none ends on a block edge."""
    bucket = s3_server.new_bucket()
    try:
        backend = s3_backend(s3_server.settings, bucket)
        rng = random.Random(15)
        data = {}
        for k, size in enumerate([10 * B + 1000, 6 * B + 7, 3 * B - 5, 20 * B + 123]):
            name = f"packs/{k:02x}/{os.urandom(16).hex()}"
            data[name] = rng.randbytes(size)
            backend.write(name, data[name])
        backend.write("config", b"the config")
        yield backend, data
    finally:
        s3_server.remove_bucket(bucket)


def s3_backend(settings: dict[str, str], bucket: str) -> Backend:
    return location_from_env(f"s3://{bucket}/backups", settings).store("node1")


def cached(packs: Packs, folder: Path, max_bytes: int = 64 * B,
           **kw: int) -> tuple[CachedBackend, Counting, dict[str, bytes]]:
    counting = Counting(packs[0])
    return CachedBackend(counting, folder, max_bytes, block_bytes=B, **kw), counting, packs[1]


def read(backend: Backend, name: str, offset: int, size: int, nowait: bool = False
         ) -> bytes | None:
    out = bytearray(size)
    if not backend.read_into(name, offset, memoryview(out), nowait):
        return None
    return bytes(out)


def block_file(cache: CachedBackend, name: str, index: int) -> Path:
    assert isinstance(cache.blocks, BlockFolder)
    return cache.blocks._path(name, index)


def block_files(folder: Path) -> list[Path]:
    return [p for p in folder.glob("??/*") if not p.name.startswith(".")]


def wait_for(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {DEADLINE_S:.0f} s: {what}")
        time.sleep(0.01)


def test_hits_do_not_reach_the_store(packs: Packs,
                                     tmp_path: Path) -> None:
    cache, counting, data = cached(packs, tmp_path / "c", readahead_blocks=0)
    name = next(iter(data))
    # A range across three blocks, not aligned: one read of the store, the blocks around it.
    assert read(cache, name, B - 100, B + 200) == data[name][B - 100:2 * B + 100]
    assert counting.reads == [(name, 0, 3 * B)] and counting.stats == 1
    for off, size in [(B - 100, B + 200), (0, 1), (3 * B - 1, 1), (B + 5, 10_000), (0, 3 * B)]:
        assert read(cache, name, off, size) == data[name][off:off + size]
    assert len(counting.reads) == 1 and counting.stats == 1
    assert cache.blocks.hits >= 5
    # A read that is partly cached fetches only the blocks it lacks.
    assert read(cache, name, 2 * B, 2 * B) == data[name][2 * B:4 * B]
    assert counting.reads[1:] == [(name, 3 * B, B)]
    # The last block is short; reading up to the pack's end works, beyond it is EOFError.
    size = len(data[name])
    assert read(cache, name, size - 10, 10) == data[name][-10:]
    assert read(cache, name, size - 10, 10) == data[name][-10:]
    with pytest.raises(EOFError):
        read(cache, name, size - 10, 11)
    with pytest.raises(EOFError):
        read(cache, name, size + B, 1)
    # Other files are passed through, never cached.
    assert cache.read("config") == b"the config"
    assert cache.read("config") == b"the config"
    assert counting.reads.count(("config", 0, -1)) == 2
    with pytest.raises(FileNotFoundError):
        read(cache, "packs/00/" + "0" * 32, 0, 10)
    cache.close()


def test_nowait_only_from_the_cache(packs: Packs,
                                    tmp_path: Path) -> None:
    cache, counting, data = cached(packs, tmp_path / "c", readahead_blocks=0)
    name = list(data)[1]
    assert read(cache, name, 10, 2 * B, nowait=True) is None
    assert counting.reads == [] and counting.stats == 0
    assert read(cache, name, 0, B) == data[name][:B]
    assert read(cache, name, 10, 2 * B, nowait=True) is None      # block 2 is missing
    assert read(cache, name, 10, B - 10, nowait=True) == data[name][10:B]
    assert len(counting.reads) == 1
    cache.close()


def test_bounded_and_least_recently_used_evicted(packs: Packs,
                                                 tmp_path: Path) -> None:
    folder = tmp_path / "c"
    limit = 5 * B
    cache, counting, data = cached(packs, folder, max_bytes=limit, readahead_blocks=0)
    name = list(data)[3]                  # 21 blocks
    assert read(cache, name, 0, 1) == data[name][:1]
    for index in range(1, 20):
        assert read(cache, name, index * B, 100) == data[name][index * B:index * B + 100]
        assert read(cache, name, 0, 1) == data[name][:1]   # block 0 stays the most recent
        on_disk = sum(p.stat().st_size for p in block_files(folder))
        assert on_disk <= limit
    assert cache.blocks.evictions > 0
    assert len(block_files(folder)) < 5
    assert counting.blocks_read(name) == list(range(20))        # block 0 never evicted
    before = len(counting.reads)
    assert read(cache, name, 0, B) == data[name][:B]
    assert read(cache, name, 19 * B, B) == data[name][19 * B:20 * B]
    assert len(counting.reads) == before                         # kept: recently used
    assert read(cache, name, B, 10) == data[name][B:B + 10]
    assert len(counting.reads) == before + 1                     # evicted long ago
    # Another cache over the same folder with a lower limit evicts down to it at once.
    cache.close()
    CachedBackend(counting, folder, 2 * B, block_bytes=B).close()
    assert sum(p.stat().st_size for p in block_files(folder)) <= 2 * B
    # Modes: the folder and its subfolders 0700, the block files 0600.
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    for p in folder.rglob("*"):
        assert stat.S_IMODE(p.stat().st_mode) == (0o700 if p.is_dir() else 0o600), p


def test_read_ahead_for_sequential_readers(packs: Packs,
                                           tmp_path: Path) -> None:
    cache, counting, data = cached(packs, tmp_path / "c", readahead_blocks=4)
    name = list(data)[3]                  # 21 blocks
    assert read(cache, name, 0, B // 2) == data[name][:B // 2]
    assert read(cache, name, B // 2, B // 2) == data[name][B // 2:B]
    assert read(cache, name, B, 100) == data[name][B:B + 100]     # sequential: 2-5 ahead
    wait_for(lambda: all(cache.blocks.has(name, i) for i in range(2, 6)), "blocks 2-5 fetched")
    wait_for(lambda: cache.fetched == 6, "read-ahead done")
    reads = len(counting.reads)
    assert read(cache, name, B + 100, 4 * B) == data[name][B + 100:5 * B + 100]
    assert len(counting.reads) == reads
    # Reading on keeps it ahead: to the pack's end, all of it fetched before it was read.
    pos = 5 * B + 100
    while pos < len(data[name]):
        size = min(B, len(data[name]) - pos)
        assert read(cache, name, pos, size) == data[name][pos:pos + size]
        pos += size
    wait_for(lambda: cache.fetched >= 21, "read-ahead to the end")
    cache.close()
    assert sorted(counting.blocks_read(name)) == list(range(21))   # each block once


def test_no_read_ahead_for_random_reads(packs: Packs,
                                        tmp_path: Path) -> None:
    cache, counting, data = cached(packs, tmp_path / "c", readahead_blocks=4)
    name = list(data)[3]
    for index in (7, 2, 12, 0, 18, 4):
        assert read(cache, name, index * B + 5, 50) == data[name][index * B + 5:index * B + 55]
    cache.close()      # waits for read-ahead that might have started
    assert counting.blocks_read(name) == [7, 2, 12, 0, 18, 4]


def damage(path: Path, how: str) -> None:
    raw = bytearray(path.read_bytes())
    if how == "flip":
        raw[-PIECE // 2] ^= 1
    elif how == "truncate":
        del raw[len(raw) // 2:]
    elif how == "header":
        raw[20] ^= 0x80
    elif how == "empty":
        raw = bytearray()
    path.write_bytes(raw)


@pytest.mark.parametrize("how", ["flip", "truncate", "header", "empty", "swap"])
def test_damaged_block_file_is_fetched_again(packs: Packs,
                                             tmp_path: Path, how: str) -> None:
    cache, counting, data = cached(packs, tmp_path / "c", readahead_blocks=0)
    name = list(data)[0]
    assert read(cache, name, 0, 2 * B) == data[name][:2 * B]
    first, second = (block_file(cache, name, i) for i in (0, 1))
    if how == "swap":          # another block's file (its CRCs match) under this name
        os.replace(second, first)
    else:
        damage(first, how)
    assert read(cache, name, 0, B) == data[name][:B]
    assert cache.blocks.damaged == 1
    assert counting.reads[1:] == [(name, 0, B)]
    assert read(cache, name, 0, B) == data[name][:B]             # whole again: a hit
    assert len(counting.reads) == 2
    cache.close()


def test_discard_and_delete_drop_a_packs_blocks(packs: Packs,
                                                tmp_path: Path) -> None:
    cache, counting, data = cached(packs, tmp_path / "c", readahead_blocks=0)
    a, b = list(data)[:2]
    assert read(cache, a, 0, 3 * B) == data[a][:3 * B]
    assert read(cache, b, 0, B) == data[b][:B]
    cache.discard(a)
    assert not any(cache.blocks.has(a, i) for i in range(3)) and cache.blocks.has(b, 0)
    assert read(cache, a, 0, 10) == data[a][:10]
    assert read(cache, b, 0, 10) == data[b][:10]
    assert counting.blocks_read(a) == [0, 1, 2, 0] and counting.blocks_read(b) == [0]
    cache.close()


def test_many_threads(packs: Packs, tmp_path: Path) -> None:
    """Threads reading at random, some sequentially, with a cache too small for it all: every
    byte right, the bound kept, and a block wanted by many at once fetched once."""
    folder = tmp_path / "c"
    limit = 12 * B
    cache, counting, data = cached(packs, folder, max_bytes=limit)
    names = list(data)
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def reader(seed: int) -> None:
        rng = random.Random(seed)
        try:
            start.wait()
            # All at once: the same block of one pack.
            assert read(cache, names[2], B + 7, 1000) == data[names[2]][B + 7:B + 1007]
            for _ in range(40):
                name = rng.choice(names)
                size = rng.randrange(1, 3 * B)
                off = rng.randrange(0, len(data[name]) - size)
                for _ in range(rng.choice([1, 1, 4])):   # now and then sequentially
                    if off + size > len(data[name]):
                        break
                    got = read(cache, name, off, size)
                    assert got == data[name][off:off + size], (name, off, size)
                    off += size
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=reader, args=(seed,)) for seed in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(DEADLINE_S * 4)
    assert not any(t.is_alive() for t in threads)
    assert not errors, errors[0]
    cache.close()
    assert counting.blocks_read(names[2]).count(1) >= 1
    first = [i for n, off, size in counting.reads[:8] if n == names[2]
             for i in range(off // B, (off + size - 1) // B + 1)]
    assert first.count(1) == 1, counting.reads[:8]
    assert sum(p.stat().st_size for p in block_files(folder)) <= limit + 8 * (B + 4096)
    assert cache.blocks.hits > 0 and cache.blocks.evictions > 0


CHILD = """
import json, sys
sys.path.insert(0, sys.argv[1])
from pathlib import Path
from test_cache import B, read, s3_backend
from humiofs.store.backend.cache import CachedBackend
cache = CachedBackend(s3_backend(json.loads(sys.argv[2]), sys.argv[3]), Path(sys.argv[4]),
                      int(sys.argv[5]), block_bytes=B, readahead_blocks=2)
name, size = sys.argv[6], int(sys.argv[7])
for rounds in range(3):
    for pos in range(0, size, B):
        n = min(B, size - pos)
        assert len(read(cache, name, pos, n)) == n
cache.close()
print(cache.blocks.hits)
"""


def test_processes_share_the_folder(packs: Packs,
                                    tmp_path: Path, s3_server: S3Server) -> None:
    """Two processes (the mount's server and its decryption worker) using one folder keep
    the one limit between them, and read right."""
    folder = tmp_path / "c"
    limit = 8 * B
    cache, counting, data = cached(packs, folder, max_bytes=limit, readahead_blocks=2)
    names = list(data)
    bucket = packs[0].location.split("/")[2]      # s3://BUCKET/backups/node1
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(Path(__file__).parent), json.dumps(s3_server.settings),
         bucket, str(folder), str(limit), names[3], str(len(data[names[3]]))],
        stdout=subprocess.PIPE, text=True)
    try:
        for _ in range(3):
            for pos in range(0, len(data[names[1]]) - B, B):
                assert read(cache, names[1], pos, B) == data[names[1]][pos:pos + B]
                assert sum(p.stat().st_size for p in block_files(folder)) <= limit + 4 * (B + 4096)
        out, _ = child.communicate(timeout=DEADLINE_S * 2)
    finally:
        child.kill()
        child.wait()
    assert child.returncode == 0
    cache.close()
    assert sum(p.stat().st_size for p in block_files(folder)) <= limit
    assert not list(folder.glob("??/.tmp-*"))


class InMemory(Counting):
    """Packs from a dict: for a forked child, where obstore cannot run (its runtime's threads
    stay in the parent)."""

    def __init__(self, inner: Backend, data: dict[str, bytes]) -> None:
        super().__init__(inner)
        self.data = data

    def read_into(self, name: str, offset: int, out: memoryview, nowait: bool = False) -> bool:
        out[:] = self.data[name][offset:offset + len(out)]
        return True

    def stat(self, name: str) -> Item:
        return Item(name, "file", len(self.data[name]), 0.0)


class Gated(Counting):
    """Holds reads of one pack until `gate` is set."""

    def __init__(self, inner: Backend, held: str) -> None:
        super().__init__(inner)
        self.held, self.gate, self.waiting = held, threading.Event(), threading.Event()

    def read_into(self, name: str, offset: int, out: memoryview, nowait: bool = False) -> bool:
        if name == self.held:
            self.waiting.set()
            self.gate.wait()
        return super().read_into(name, offset, out, nowait)


def test_a_forked_child_uses_the_cache(packs: Packs,
                                       tmp_path: Path) -> None:
    """A child forked while the parent's threads fetch (as the mount's decryption worker may
    be) starts with its own locks, fetches, read-ahead threads and flock: it neither waits for
    the parent's fetches nor takes their blocks, and shares the folder."""
    objects, data = packs
    names = list(data)
    gated = Gated(objects, names[2])
    cache = CachedBackend(gated, tmp_path / "c", 64 * B, block_bytes=B, readahead_blocks=2)
    for pos in range(0, 4 * B, B):                 # sequential: read-ahead threads exist
        assert read(cache, names[0], pos, B) == data[names[0]][pos:pos + B]
    wait_for(lambda: cache.fetched == 6, "read-ahead done")
    held = threading.Thread(target=read, args=(cache, names[2], 0, B))
    held.start()
    try:
        gated.waiting.wait(DEADLINE_S)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                import signal
                signal.alarm(int(DEADLINE_S))
                gated.inner = InMemory(objects, data)
                gated.held = ""
                if (read(cache, names[2], 0, 2 * B) == data[names[2]][:2 * B]
                        and read(cache, names[0], 0, 4 * B) == data[names[0]][:4 * B]
                        and read(cache, names[1], 0, B) == data[names[1]][:B]
                        and read(cache, names[1], B, B) == data[names[1]][B:2 * B]):
                    cache.discard(names[0])
                    cache.close()
                    code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
    finally:
        gated.gate.set()
        held.join(DEADLINE_S)
    assert os.waitstatus_to_exitcode(status) == 0
    assert not cache.blocks.has(names[0], 0) and cache.blocks.has(names[1], 1)
    assert read(cache, names[1], 0, 2 * B) == data[names[1]][:2 * B]
    assert gated.blocks_read(names[1]) == []       # fetched by the child
    cache.close()


def test_cache_folder_errors(packs: Packs,
                             tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(OSError):
        CachedBackend(packs[0], tmp_path / "file", 10 * B, block_bytes=B)
    loose = tmp_path / "loose"
    loose.mkdir(mode=0o755)
    CachedBackend(packs[0], loose, 10 * B, block_bytes=B).close()
    assert stat.S_IMODE(loose.stat().st_mode) == 0o700
    with pytest.raises(ValueError):
        CachedBackend(packs[0], loose, 10 * B, block_bytes=B + 1)


@pytest.mark.allow_warnings
def test_cache_trouble_never_fails_a_read(packs: Packs,
                                          tmp_path: Path) -> None:
    """The folder's subfolder is made unwritable (a full or broken cache disk): reads are
    served from the store, with one warning."""
    folder = tmp_path / "c"
    cache, counting, data = cached(packs, folder, readahead_blocks=0)
    name = list(data)[0]
    sub = block_file(cache, name, 0).parent
    sub.mkdir(mode=0o700)
    (sub / ".tmp-0").mkdir()
    os.chmod(sub, 0o500)
    try:
        if os.geteuid() == 0:
            # root writes anyway: take the name the temporary file needs instead
            os.chmod(sub, 0o700)
            tmp = sub / f".tmp-{os.getpid()}-{threading.get_ident()}"
            tmp.mkdir()
        for _ in range(2):
            assert read(cache, name, 0, B) == data[name][:B]
        assert len(counting.reads) == 2
    finally:
        os.chmod(sub, 0o700)
    cache.close()


def test_a_pack_put_back_after_damage_reads_again(s3_server: S3Server, s3_bucket: str,
                                                  tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A store on S3 read through the cache, as the mount does: a pack damaged on the server
    fails authentication (and its damaged blocks land in the cache); once the good pack is
    put back, the file reads again: the Store drops the stale blocks and reads the pack once
    more, so the damage does not outlive its repair (backend/cache.py)."""
    from storetools import FAST_KDF, backup, files

    from humiofs.errors import IntegrityError
    from humiofs.store import crypto
    from humiofs.store.backend import s3
    from humiofs.store.repository import Store, pack_name
    monkeypatch.setattr(s3, "_settings", s3.S3Settings.from_env(s3_server.settings))
    url = f"s3://{s3_bucket}/backups"
    node = tmp_path / "node"
    node.mkdir()
    contents = random.Random(3).randbytes(3 * B + 100)
    (node / "segment").write_bytes(contents)
    (node / "cluster_membership.uuid").write_text("3f0e6a8c-1b2d-4e5f-9a7b-0c1d2e3f4a5b")
    gen, _ = backup(Store.create(f"{url}/node1", KEY, FAST_KDF), node, host_id="1")
    plain = location_from_env(url, s3_server.settings).store("node1")
    cached = Counting(plain)
    store = Store.open(CachedBackend(cached, tmp_path / "cache", 64 * B, block_bytes=B), KEY)
    ref = files(store, gen)["segment"].data
    assert ref is not None
    last = crypto.chunk_count(ref.plain_len) - 1

    def read_file() -> bytes:
        return bytes(store.read_chunks(ref, crypto.KIND_DATA, 0, last))

    name = pack_name(ref.pack)
    good = plain.read(name)
    bad = bytearray(good)
    bad[ref.offset + 2 * B] ^= 1
    plain.write(name, bytes(bad), exclusive=False)
    with pytest.raises(IntegrityError):
        read_file()
    plain.write(name, good, exclusive=False)        # put back from a copy
    assert read_file() == contents
    fetched = len(cached.reads)
    assert read_file() == contents                   # and from the cache again
    assert len(cached.reads) == fetched


def test_in_memory_for_a_restore(packs: Packs) -> None:
    """Without a folder the blocks live in memory, bounded (a restore's read-ahead): reads
    right, each block fetched once while it stays, read-ahead for an in-order reader."""
    counting = Counting(packs[0])
    data = packs[1]
    cache = CachedBackend(counting, None, 6 * B, block_bytes=B, readahead_blocks=3)
    name = list(data)[3]                  # 21 blocks
    pos = 0
    while pos < len(data[name]):          # in order, in pieces that straddle blocks
        size = min(B // 3 + 17, len(data[name]) - pos)
        assert read(cache, name, pos, size) == data[name][pos:pos + size]
        pos += size
        assert isinstance(cache.blocks, MemoryBlocks) and cache.blocks._bytes <= 6 * B
    wait_for(lambda: cache.fetched >= 21, "read-ahead to the end")
    cache.close()
    assert sorted(counting.blocks_read(name)) == list(range(21))
    assert len(counting.reads) < 21       # read-ahead fetched runs of blocks in one request
    assert cache.blocks.evictions > 0
    with pytest.raises(EOFError):
        read(cache, name, len(data[name]) - 5, 6)
