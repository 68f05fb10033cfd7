"""The storage seam's contract (humiofs/store/backend/__init__.py), run against every backend:
the `location` fixture is parametrised, so object storage adds itself as another parameter.
What only a local folder can hold (symlinks, FIFOs, modes) is tested where `local_path` is
set."""
from __future__ import annotations

import os
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from humiofs.store.backend import FILE, FOLDER, OTHER, Backend, Busy, Location, iter_names
from humiofs.store.backend.local import LocalLocation
from humiofs.store.durable import NotRegularFile

FOLDERS = ["keys", "packs", "generations", "tmp", "packs/ab", "packs/cd"]


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def location(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Location]:
    """An empty BACKUP_DIR of each kind of backend: a folder, and a bucket on the local S3
    server (scripts/s3-server, a real RadosGW)."""
    if request.param == "local":
        (tmp_path / "backup").mkdir()
        yield LocalLocation(tmp_path / "backup")
        return
    from humiofs.store.backend.s3 import location_from_env
    server = request.getfixturevalue("s3_server")
    bucket = server.new_bucket()
    try:
        yield location_from_env(f"s3://{bucket}/backups", server.settings)
    finally:
        server.remove_bucket(bucket)


@pytest.fixture
def backend(location: Location) -> Iterator[Backend]:
    """A new store holding `config` and the folders of FORMAT.md 2."""
    b = location.create_store("node1", {"config": b"{}\n"}, FOLDERS)
    yield b
    b.close()


def local(backend: Backend) -> Path:
    if backend.local_path is None:
        pytest.skip("only a local folder holds this")
    return backend.local_path


# -- a location --------------------------------------------------------------------------------

def test_create_store_is_atomic_and_exclusive(location: Location) -> None:
    b = location.create_store("node1", {"config": b"c", "keys/k1": b"k"}, FOLDERS)
    assert b.read("config") == b"c" and b.read("keys/k1") == b"k"
    assert location.names() == ["node1"]
    with pytest.raises(FileExistsError):
        location.create_store("node1", {"config": b"other"}, FOLDERS)
    assert b.read("config") == b"c"
    assert location.store("node1").read("keys/k1") == b"k"
    assert location.store("node2").location != b.location


def test_create_store_never_makes_backup_dir(tmp_path: Path) -> None:
    missing = LocalLocation(tmp_path / "unmounted")
    with pytest.raises(FileNotFoundError):
        missing.create_store("node1", {"config": b"c"}, FOLDERS)
    with pytest.raises(FileNotFoundError):
        missing.names()
    assert not (tmp_path / "unmounted").exists()


def test_local_store_is_private_and_leaves_no_staging(location: Location) -> None:
    b = location.create_store("node1", {"config": b"c"}, FOLDERS)
    root = local(b)
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    assert stat.S_IMODE((root / "packs" / "ab").stat().st_mode) == 0o700
    assert stat.S_IMODE((root / "config").stat().st_mode) == 0o600
    b.write("generations/g1", b"x")
    assert stat.S_IMODE((root / "generations" / "g1").stat().st_mode) == 0o600
    assert sorted(os.listdir(root.parent)) == ["node1"]     # no .node1.creating-* left


# -- reading ---------------------------------------------------------------------------------

def test_read_and_limit(backend: Backend) -> None:
    backend.write("generations/g1", b"0123456789")
    assert backend.read("generations/g1") == b"0123456789"
    assert backend.read("generations/g1", 4) == b"0123"
    assert backend.read("generations/g1", 100) == b"0123456789"
    with pytest.raises(FileNotFoundError):
        backend.read("generations/none")
    # An empty file read with a limit (object storage answers a range past the end with 416).
    backend.write("generations/g0", b"")
    assert backend.read("generations/g0", 16) == b""
    assert backend.read("generations/g0") == b""
    with pytest.raises(EOFError):
        backend.read_into("generations/g0", 0, memoryview(bytearray(1)))


def test_read_into_and_eof(backend: Backend) -> None:
    data = bytes(range(256)) * 64
    backend.write("packs/ab/p1", data)
    out = bytearray(100)
    assert backend.read_into("packs/ab/p1", 1000, memoryview(out)) is True
    assert out == data[1000:1100]
    # Once read, a nowait read may be served at once (or, if the backend cannot tell, not).
    again = bytearray(100)
    if backend.read_into("packs/ab/p1", 1000, memoryview(again), nowait=True):
        assert again == data[1000:1100]
    with pytest.raises(EOFError):
        backend.read_into("packs/ab/p1", len(data) - 10, memoryview(bytearray(20)))
    with pytest.raises(FileNotFoundError):
        backend.read_into("packs/ab/none", 0, memoryview(bytearray(1)))


def test_read_into_from_many_threads(backend: Backend) -> None:
    names = [f"packs/ab/p{i}" for i in range(8)]
    for i, name in enumerate(names):
        backend.write(name, bytes([i]) * 4096)
    errors: list[str] = []

    def reader(k: int) -> None:
        for j in range(200):
            i = (k + j) % len(names)
            out = bytearray(64)
            backend.read_into(names[i], (j * 61) % 4000, memoryview(out))
            if out != bytes([i]) * 64:
                errors.append(f"{names[i]}: {bytes(out[:4])!r}")

    threads = [threading.Thread(target=reader, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_stat(backend: Backend) -> None:
    before = time.time()
    backend.write("generations/g1", b"12345")
    item = backend.stat("generations/g1")
    assert (item.name, item.kind, item.size) == ("generations/g1", FILE, 5)
    assert before - 5 <= item.mtime <= time.time() + 5
    assert abs(item.time_ns() - item.mtime * 1e9) < 1e6
    with pytest.raises(FileNotFoundError):
        backend.stat("generations/none")


def test_list_and_recursive(backend: Backend) -> None:
    backend.write("packs/cd/p2", b"22")
    backend.write("packs/ab/p1", b"1")
    backend.write("generations/b", b"b")
    backend.write("generations/a", b"a")
    assert [i.name for i in backend.list("generations")] == ["generations/a", "generations/b"]
    assert list(iter_names(backend.list("generations"))) == ["a", "b"]
    assert [(i.name, i.kind, i.size) for i in backend.list("packs", recursive=True)] == \
        [("packs/ab/p1", FILE, 1), ("packs/cd/p2", FILE, 2)]
    top = {i.name: i.kind for i in backend.list()}
    assert top["config"] == FILE and top["packs"] == FOLDER
    if backend.local_path is not None:
        with pytest.raises(FileNotFoundError):
            backend.list("damaged")
        with pytest.raises(NotADirectoryError):
            backend.list("config")
    else:       # object storage has no folders to miss: an empty one is just empty
        assert backend.list("damaged") == []


# -- writing ---------------------------------------------------------------------------------

def test_write_exclusive_and_replace(backend: Backend) -> None:
    backend.write("keys/k1", b"first")
    with pytest.raises(FileExistsError):
        backend.write("keys/k1", b"second")
    assert backend.read("keys/k1") == b"first"
    backend.write("keys/k1", b"third", exclusive=False)
    assert backend.read("keys/k1") == b"third"
    assert backend.list("tmp") == []            # nothing left behind


def test_upload_commit_and_abort(backend: Backend) -> None:
    up = backend.create("packs/ab/p1")
    up.write(b"head")
    up.write(memoryview(b"-body"))
    with pytest.raises(FileNotFoundError):
        backend.stat("packs/ab/p1")             # invisible until committed
    up.commit()
    assert backend.read("packs/ab/p1") == b"head-body"
    gone = backend.create("packs/ab/p2")
    gone.write(b"never")
    gone.abort()
    gone.abort()                                # idempotent, never raises
    with pytest.raises(FileNotFoundError):
        backend.stat("packs/ab/p2")
    assert backend.list("tmp") == []


def test_append(backend: Backend) -> None:
    backend.append("tmp/j.journal", b"pack a\n", sync=False)
    backend.append("tmp/j.journal", b"commit b\n", sync=True)
    assert backend.read("tmp/j.journal") == b"pack a\ncommit b\n"


def test_delete(backend: Backend) -> None:
    backend.write("packs/ab/p1", b"x")
    backend.read_into("packs/ab/p1", 0, memoryview(bytearray(1)))     # cached for reading
    backend.delete("packs/ab/p1")
    backend.delete("packs/ab/p1")               # a missing one is no error
    with pytest.raises(FileNotFoundError):
        backend.read("packs/ab/p1")
    with pytest.raises(FileNotFoundError):
        backend.read_into("packs/ab/p1", 0, memoryview(bytearray(1)))


def test_rename(backend: Backend) -> None:
    backend.write("generations/g1", b"1")
    backend.write("generations/g2", b"2")
    backend.make_folder("damaged")
    backend.make_folder("damaged")              # made once
    backend.rename("generations/g1", "damaged/g1")
    backend.sync("damaged")
    backend.sync("generations")
    assert backend.read("damaged/g1") == b"1"
    with pytest.raises(FileNotFoundError):
        backend.read("generations/g1")
    backend.write("damaged/g2", b"old")
    with pytest.raises(FileExistsError):
        backend.rename("generations/g2", "damaged/g2")
    assert backend.read("generations/g2") == b"2" and backend.read("damaged/g2") == b"old"


# -- locks -----------------------------------------------------------------------------------

def test_lock_busy_and_locked(backend: Backend) -> None:
    assert not backend.locked("lock")
    held = backend.lock("lock", b"pid 1\n")
    assert backend.locked("lock")
    with pytest.raises(Busy) as busy:
        backend.lock("lock", b"pid 2\n")
    assert busy.value.info == b"pid 1\n"
    start = time.monotonic()
    with pytest.raises(Busy):
        backend.lock("lock", b"pid 2\n", wait_s=0.3)
    assert time.monotonic() - start >= 0.3
    held.release()
    held.release()                              # idempotent
    assert not backend.locked("lock")
    with backend.lock("lock", b"pid 3\n"):
        assert backend.locked("lock")
    assert not backend.locked("lock")


def test_lock_waits_until_released(backend: Backend) -> None:
    held = backend.lock("prune.lock", b"")
    threading.Timer(0.2, held.release).start()
    start = time.monotonic()
    with backend.lock("prune.lock", b"", wait_s=10.0):
        assert 0.1 < time.monotonic() - start < 10.0


# -- what is planted in a local store --------------------------------------------------------

def test_a_planted_fifo_is_never_opened(backend: Backend) -> None:
    root = local(backend)
    os.mkfifo(root / "generations" / "g1", 0o600)
    os.mkfifo(root / "packs" / "ab" / "p1", 0o600)
    with pytest.raises(NotRegularFile, match="FIFO"):
        backend.read("generations/g1")
    with pytest.raises(NotRegularFile):
        backend.read_into("packs/ab/p1", 0, memoryview(bytearray(1)))
    assert backend.stat("generations/g1").kind == OTHER
    assert [i.kind for i in backend.list("packs", recursive=True)] == [OTHER]


def test_a_planted_symlink_is_never_followed(backend: Backend, tmp_path: Path) -> None:
    root = local(backend)
    victim = tmp_path / "victim"
    victim.write_bytes(b"host file")
    (root / "generations" / "g1").symlink_to(victim)
    (root / "lock").symlink_to(victim)
    with pytest.raises(NotRegularFile, match="symlink"):
        backend.read("generations/g1")
    with pytest.raises(NotRegularFile):
        backend.lock("lock", b"overwrite")
    with pytest.raises(NotRegularFile):
        backend.append("lock", b"more", sync=False)
    assert victim.read_bytes() == b"host file"
    item = backend.stat("generations/g1")
    assert item.kind == OTHER and item.symlink
    assert backend.planted(("generations",), ("lock",)) is not None


def test_planted_names_what_is_in_the_way(backend: Backend, tmp_path: Path) -> None:
    root = local(backend)
    assert backend.planted(("keys", "packs", "tmp"), ("lock",)) is None
    (root / "lock").mkdir()
    assert "is a folder, not the lock file" in (backend.planted((), ("lock",)) or "")
    (root / "packs" / "ef").symlink_to(tmp_path)
    assert "packs/ef is a symlink" in (backend.planted((), ()) or "")
