"""The S3 backend (humiofs/store/backend/s3.py, s3lock.py) against the real server: the Backend
contract as the local backend keeps it, and what only object storage has (appends as pieces,
multipart packs, lease locks, the service's failures). Shaped like tests/test_backend.py's
contract tests, parametrised over a `backend` fixture, to be merged into it."""
from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from conftest import ROOT
from humiofs.store.backend import FILE, FOLDER, Busy, Lock
from humiofs.store.backend import s3upload
from humiofs.store.backend.s3 import S3Backend, S3Location, S3Settings, parse_url
from s3util import S3Server


def location(server: S3Server, url: str, **over: str) -> S3Location:
    return S3Location(url, S3Settings.from_env({**server.settings, **over}))


@pytest.fixture
def where(s3_server: S3Server, s3_bucket: str) -> S3Location:
    return location(s3_server, f"s3://{s3_bucket}/backups/node1")


@pytest.fixture
def backend(where: S3Location) -> Iterator[S3Backend]:
    b = where.store("store")
    yield b
    b.close()


def keys(server: S3Server, bucket: str) -> list[str]:
    res = server.admin().list_objects_v2(Bucket=bucket)
    return sorted(o["Key"] for o in res.get("Contents", []))


# -- the contract -------------------------------------------------------------------------------

@pytest.mark.s3
def test_whole_files(backend: S3Backend, s3_server: S3Server, s3_bucket: str) -> None:
    data = os.urandom(100_000)
    backend.write("generations/0001-a", data)
    assert backend.read("generations/0001-a") == data
    assert backend.read("generations/0001-a", 10) == data[:10]
    assert backend.read("generations/0001-a", 1 << 20) == data
    item = backend.stat("generations/0001-a")
    assert (item.name, item.kind, item.size) == ("generations/0001-a", FILE, len(data))
    assert abs(item.mtime - time.time()) < 300
    with pytest.raises(FileExistsError):
        backend.write("generations/0001-a", b"other")
    assert backend.read("generations/0001-a") == data
    backend.write("generations/0001-a", b"other", exclusive=False)
    assert backend.read("generations/0001-a") == b"other"
    backend.write("config", b"")
    assert backend.read("config") == b"" and backend.read("config", 5) == b""
    # One object per store file, under PREFIX/NAME/: nothing else is written.
    assert keys(s3_server, s3_bucket) == ["backups/node1/store/config",
                                          "backups/node1/store/generations/0001-a"]


@pytest.mark.s3
def test_missing_files(backend: S3Backend) -> None:
    for call in (lambda: backend.read("config"), lambda: backend.stat("config"),
                 lambda: backend.read_into("packs/ab/x", 0, memoryview(bytearray(4)))):
        with pytest.raises(FileNotFoundError) as e:
            call()
        assert "no such object" in str(e.value)
    backend.delete("config")     # a missing file is not an error


@pytest.mark.s3
def test_ranged_reads(backend: S3Backend) -> None:
    data = os.urandom(300_000)
    backend.write("packs/ab/abcd", data)
    out = bytearray(65536)
    assert backend.read_into("packs/ab/abcd", 100_000, memoryview(out)) is True
    assert out == data[100_000:165_536]
    # The mount asks from a worker thread instead: the network always waits.
    assert backend.read_into("packs/ab/abcd", 0, memoryview(out), nowait=True) is False
    with pytest.raises(EOFError):
        backend.read_into("packs/ab/abcd", 299_000, memoryview(bytearray(4096)))
    with pytest.raises(EOFError):
        backend.read_into("packs/ab/abcd", 400_000, memoryview(bytearray(10)))


@pytest.mark.s3
def test_small_reads_going_forward_share_requests(backend: S3Backend,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A restore of many small files reads a pack forward in small pieces: one request per
    4 MiB window, not per piece; reads that jump around, or are large, fetch what they ask."""
    data = os.urandom(6 << 20)
    backend.write("packs/ab/abcd", data)
    fetched: list[tuple[int, int]] = []
    real = backend._get_range

    def counting(name: str, offset: int, length: int) -> memoryview:
        fetched.append((offset, length))
        return real(name, offset, length)
    monkeypatch.setattr(backend, "_get_range", counting)
    pos = 0
    while pos < len(data):
        size = min(10_000 + pos % 7, len(data) - pos)
        out = bytearray(size)
        assert backend.read_into("packs/ab/abcd", pos, memoryview(out))
        assert out == data[pos:pos + size]
        pos += size
    assert len(fetched) <= 4, fetched           # the first piece, then two windows
    fetched.clear()
    backend.discard("packs/ab/abcd")      # what the windows hold is forgotten
    for at in (5 << 20, 1 << 20, 3 << 20, 100):
        out = bytearray(4096)
        assert backend.read_into("packs/ab/abcd", at, memoryview(out))
        assert out == data[at:at + 4096]
    assert [n for _, n in fetched] == [4096] * 4
    fetched.clear()
    out = bytearray(1 << 20)
    for at in (0, 1 << 20):
        assert backend.read_into("packs/ab/abcd", at, memoryview(out))
        assert out == data[at:at + (1 << 20)]
    assert [n for _, n in fetched] == [1 << 20] * 2
    with pytest.raises(EOFError):
        backend.read_into("packs/ab/abcd", len(data) - 100, memoryview(bytearray(4096)))


@pytest.mark.s3
def test_listing(backend: S3Backend) -> None:
    for name in ("config", "keys/k1", "packs/ab/p1", "packs/ab/p2", "packs/cd/p3",
                 "generations/g1"):
        backend.write(name, name.encode())
    root = backend.list()
    assert [(i.name, i.kind) for i in root] == [
        ("config", FILE), ("generations", FOLDER), ("keys", FOLDER), ("packs", FOLDER)]
    assert [(i.name, i.kind, i.size) for i in backend.list("packs")] == [
        ("packs/ab", FOLDER, 0), ("packs/cd", FOLDER, 0)]
    assert [i.name for i in backend.list("packs/ab")] == ["packs/ab/p1", "packs/ab/p2"]
    assert [i.name for i in backend.list("packs", recursive=True)] == [
        "packs/ab/p1", "packs/ab/p2", "packs/cd/p3"]
    assert [i.name for i in backend.list("", recursive=True)] == [
        "config", "generations/g1", "keys/k1", "packs/ab/p1", "packs/ab/p2", "packs/cd/p3"]
    # No folders on object storage: an empty one lists empty, and make_folder makes nothing.
    backend.make_folder("tmp")
    assert backend.list("tmp") == []
    # A prefix that is only the start of a name is not a folder.
    assert backend.list("pack") == [] and backend.list("con") == []


@pytest.mark.s3
def test_appends(backend: S3Backend, where: S3Location, s3_server: S3Server,
                 s3_bucket: str) -> None:
    name = "tmp/0123456789abcdef.journal"
    backend.append(name, b"pack 1\n", sync=False)
    backend.append(name, b"pack 2\n", sync=False)
    # Another process (a later run's recovery) continues and reads the same file.
    other = where.store("store")
    other.append(name, b"commit g\n", sync=True)
    assert other.read(name) == backend.read(name) == b"pack 1\npack 2\ncommit g\n"
    assert backend.read(name, 9) == b"pack 1\npa"
    listed = backend.list("tmp")
    assert [(i.name, i.kind, i.size) for i in listed] == [(name, FILE, 23)]
    assert backend.stat(name).size == 23
    assert len(keys(s3_server, s3_bucket)) == 3
    fresh = where.store("store")
    fresh.list("tmp")
    fresh.delete(name)
    assert keys(s3_server, s3_bucket) == []
    with pytest.raises(FileNotFoundError):
        backend.read(name)


@pytest.mark.s3
def test_rename(backend: S3Backend) -> None:
    backend.write("generations/g1", b"one")
    backend.write("generations/g2", b"two")
    with pytest.raises(FileExistsError):
        backend.rename("generations/g1", "generations/g2")
    backend.rename("generations/g1", "damaged/g1")
    assert backend.read("damaged/g1") == b"one"
    with pytest.raises(FileNotFoundError):
        backend.stat("generations/g1")


@pytest.mark.s3
@pytest.mark.parametrize("size", [1000, 2 * (5 << 20) + 12345])
def test_uploads_appear_only_complete(backend: S3Backend, s3_server: S3Server,
                                      s3_bucket: str, monkeypatch: pytest.MonkeyPatch,
                                      size: int) -> None:
    """Small packs go in one PUT on commit, large ones as a multipart upload while they are
    written; either way nothing is seen under the name before commit, and abort leaves
    nothing (no object, no unfinished multipart upload)."""
    monkeypatch.setattr(s3upload, "PART", 5 << 20)    # S3's smallest part
    data = os.urandom(size)
    admin = s3_server.admin()
    for finish in ("abort", "commit"):
        up = backend.create("packs/ab/p1")
        buf = bytearray(data[:4096])
        view = memoryview(buf)
        up.write(view)
        view[:] = bytes(len(view))     # the writer reuses its buffer: what was written is kept
        for at in range(4096, size, 1 << 20):
            up.write(memoryview(data)[at:at + (1 << 20)])
        with pytest.raises(FileNotFoundError):
            backend.stat("packs/ab/p1")
        if finish == "abort":
            up.abort()
            up.abort()
            assert keys(s3_server, s3_bucket) == []
            assert not admin.list_multipart_uploads(Bucket=s3_bucket).get("Uploads")
        else:
            up.commit()
    assert backend.read("packs/ab/p1") == data
    assert not admin.list_multipart_uploads(Bucket=s3_bucket).get("Uploads")


@pytest.mark.s3
def test_stores_in_a_location(where: S3Location, s3_server: S3Server, s3_bucket: str) -> None:
    assert where.names() == []
    made = where.create_store("one", {"config": b"c", "keys/k1": b"k"}, ["keys", "packs"])
    assert made.read("config") == b"c"
    with pytest.raises(FileExistsError):
        where.create_store("one", {"config": b"x", "keys/k2": b"k"}, [])
    assert made.read("config") == b"c"
    assert [i.name for i in made.list("keys")] == ["keys/k1"]
    where.create_store("two", {"config": b"c"}, [])
    s3_server.admin().put_object(Bucket=s3_bucket, Key="backups/node1/.trash/config", Body=b"")
    assert where.names() == ["one", "two"]
    # A prefix is optional.
    whole = location(s3_server, f"s3://{s3_bucket}")
    assert whole.names() == ["backups"]


# -- what only the object store has: its failures ----------------------------------------------

@pytest.mark.s3
def test_missing_bucket(s3_server: S3Server) -> None:
    where = location(s3_server, "s3://no-such-bucket-here/x")
    for call in (where.names, lambda: where.store("s").read("config"),
                 lambda: where.store("s").write("config", b"c"),
                 lambda: where.create_store("s", {"config": b"c"}, [])):
        with pytest.raises(FileNotFoundError) as e:
            call()
        assert str(e.value.strerror).startswith("the bucket no-such-bucket-here does not exist "
                                                f"at {s3_server.endpoint}")


@pytest.mark.s3
def test_wrong_credentials(s3_server: S3Server, s3_bucket: str) -> None:
    for over in ({"AWS_ACCESS_KEY_ID": "NOSUCHKEY"},
                 {"AWS_SECRET_ACCESS_KEY": "wrong" * 8}):
        where = location(s3_server, f"s3://{s3_bucket}", **over)
        for call in (where.names, lambda: where.store("s").read("config"),
                     lambda: where.store("s").write("config", b"c")):
            with pytest.raises(PermissionError) as e:
                call()
            assert "check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY" in str(e.value)
            assert "wrong" not in str(e.value)


def test_unreachable_service_is_one_line_after_bounded_retries() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    where = S3Location("s3://bucket/p", S3Settings.from_env({
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "a",
        "AWS_SECRET_ACCESS_KEY": "b"}))
    started = time.monotonic()
    with pytest.raises(ConnectionRefusedError) as e:
        where.store("s").read("config")
    took = time.monotonic() - started
    assert e.value.errno == errno.ECONNREFUSED
    assert f"cannot connect to http://127.0.0.1:{port} (tried for " in str(e.value.strerror)
    assert "\n" not in str(e.value.strerror)
    # Six retries, each wait at least 0.5 s (docs/S3.md): never less than 3 s, about 6 s.
    assert 3.0 <= took < 30


def test_settings() -> None:
    assert parse_url("s3://bucket") == ("bucket", "")
    assert parse_url("s3://my.bucket-1/a/b/") == ("my.bucket-1", "a/b")
    for bad in ("s3://", "s3://B/x", "s3://b", "s3://bucket/a//b", "s3://bucket/../x",
                "s3://bucket/a/.x", "/var/backups"):
        with pytest.raises(ValueError):
            parse_url(bad)
    s = S3Settings.from_env({"AWS_ACCESS_KEY_ID": "id", "AWS_SECRET_ACCESS_KEY": "sekrit"})
    assert (s.endpoint, s.region, s.allow_http) == (None, "us-east-1", False)
    assert "sekrit" not in repr(s)
    assert S3Settings.from_env({"AWS_ENDPOINT_URL": "http://127.0.0.1:9000"}).allow_http
    with pytest.raises(ValueError, match="plain http.*AWS_ALLOW_HTTP=true"):
        S3Settings.from_env({"AWS_ENDPOINT_URL": "http://s3.example.com"})
    assert S3Settings.from_env({"AWS_ENDPOINT_URL": "http://s3.example.com",
                                "AWS_ALLOW_HTTP": "true"}).allow_http
    with pytest.raises(ValueError, match="AWS_ALLOW_HTTP"):
        S3Settings.from_env({"AWS_ALLOW_HTTP": "maybe"})
    with pytest.raises(ValueError, match="AWS_ENDPOINT_URL"):
        S3Settings.from_env({"AWS_ENDPOINT_URL": "s3.example.com"})


# -- the lease lock ------------------------------------------------------------------------------

@pytest.mark.s3
def test_lock_is_exclusive(where: S3Location) -> None:
    first, second = where.store("store"), where.store("store")
    assert not first.locked("lock")
    held = first.lock("lock", b"holder one")
    assert first.locked("lock") and second.locked("lock")
    with pytest.raises(Busy) as e:
        second.lock("lock", b"holder two")
    assert e.value.info == b"holder one"
    started = time.monotonic()
    with pytest.raises(Busy):
        second.lock("lock", b"holder two", wait_s=1.0)
    assert time.monotonic() - started >= 1.0
    held.release()
    held.release()
    assert not second.locked("lock")
    with second.lock("lock", b"holder two"):
        assert first.locked("lock")
    assert not first.locked("lock")


@pytest.mark.s3
def test_lock_race_has_one_winner(where: S3Location) -> None:
    won: list[Lock] = []
    busy: list[int] = []
    barrier = threading.Barrier(6)

    def contend(i: int) -> None:
        backend = where.store("store")
        barrier.wait()
        try:
            won.append(backend.lock("lock", f"{i}".encode()))
        except Busy:
            busy.append(i)
    threads = [threading.Thread(target=contend, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(busy) == 5
    won[0].release()


HOLDER = """
import sys, time
from humiofs.store.backend.s3 import location_from_env
b = location_from_env(sys.argv[1]).store("store")
held = b.lock("lock", b"crashing holder")
print("held", flush=True)
time.sleep(600)
"""


@pytest.mark.s3
@pytest.mark.allow_warnings
def test_stale_lock_of_a_dead_holder_is_taken_over_after_its_lease(
        where: S3Location, s3_server: S3Server, s3_bucket: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    env = {**s3_server.env(), "HUMIOFS_S3_LEASE_S": "3", "PYTHONPATH": str(ROOT)}
    holder = subprocess.Popen([sys.executable, "-c", HOLDER,
                               f"s3://{s3_bucket}/backups/node1"],
                              env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline() == "held\n"
        backend = where.store("store")
        # Alive, it renews the lease: a taker waiting longer than the lease still waits.
        with pytest.raises(Busy) as e:
            backend.lock("lock", b"taker", wait_s=4.5)
        assert e.value.info == b"crashing holder"
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        assert backend.locked("lock")
        with pytest.raises(Busy):
            backend.lock("lock", b"taker")
        started = time.monotonic()
        with backend.lock("lock", b"taker", wait_s=30):
            assert time.monotonic() - started < 10
            assert backend.locked("lock")
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.s3
@pytest.mark.allow_warnings
def test_a_holder_that_loses_its_lock_writes_nothing_more(
        where: S3Location, s3_server: S3Server, s3_bucket: str,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("HUMIOFS_S3_LEASE_S", "3")
    backend = where.store("store")
    held = backend.lock("lock", b"me")
    backend.write("packs/ab/p1", b"before")
    up = backend.create("packs/ab/p2")
    up.write(b"pack")
    # Another host's clock thought the lease stale and took it (or an operator removed it):
    s3_server.admin().put_object(Bucket=s3_bucket, Key="backups/node1/store/lock",
                                 Body=b"someone else")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            backend.write("generations/g1", b"gen")
            backend.delete("generations/g1")
        except OSError as lost:
            assert lost.errno == errno.ENOLCK
            assert "lost the lock lock of" in str(lost.strerror)
            break
        time.sleep(0.05)
    else:
        pytest.fail("the writer kept writing")
    with pytest.raises(OSError) as e:
        up.commit()
    assert e.value.errno == errno.ENOLCK
    with pytest.raises(FileNotFoundError):
        backend.stat("packs/ab/p2")
    held.release()
    # The other's lock is left alone.
    assert backend.read("lock") == b"someone else"
    assert "lost the lock" in caplog.text

