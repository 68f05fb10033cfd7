"""Reading a data directory: data extents of real sparse files, extent reads, excludes."""
from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from humiofs.backup import scan
from humiofs.backup.scan import Excluder, ReadAhead, data_extents, iter_extent_data
from humiofs.errors import SourceChanged

B = 4096
MiB = 1 << 20


def sparse(path: Path, size: int, blocks: list[tuple[int, int]]) -> Path:
    """A file of `size` bytes with data only in `blocks` (offset, length); holes elsewhere."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, size)
        for off, length in blocks:
            os.pwrite(fd, bytes([(off // B) % 251 + 1]) * length, off)
    finally:
        os.close(fd)
    return path


@pytest.fixture(scope="module")
def holes_supported(tmp_path_factory: pytest.TempPathFactory) -> None:
    probe = sparse(tmp_path_factory.mktemp("probe") / "p", 4 * MiB, [(2 * MiB, B)])
    if probe.stat().st_blocks * 512 >= probe.stat().st_size:
        pytest.skip("the filesystem of tmp_path does not store holes")


def extents_of(path: Path) -> list[tuple[int, int]]:
    fd = os.open(path, os.O_RDONLY)
    try:
        return data_extents(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)


CASES = {
    "hole_at_start": (MiB, [(512 * 1024, 512 * 1024)]),
    "hole_in_middle": (MiB, [(0, 64 * 1024), (768 * 1024, 256 * 1024)]),
    "hole_at_end": (MiB, [(0, 8 * B)]),
    "all_hole": (8 * MiB, []),
    "many_extents": (4 * MiB, [(i * 64 * 1024, B) for i in range(64)]),
    "dense": (3 * B, [(0, 3 * B)]),
    "empty": (0, []),
    "adjacent_writes_merge": (MiB, [(0, B), (B, B), (2 * B, B)]),
}


@pytest.mark.usefixtures("holes_supported")
@pytest.mark.parametrize("case", sorted(CASES))
def test_data_extents(tmp_path: Path, case: str) -> None:
    size, blocks = CASES[case]
    p = sparse(tmp_path / case, size, blocks)
    want: list[tuple[int, int]] = []
    for off, length in blocks:
        if want and want[-1][0] + want[-1][1] == off:
            want[-1] = (want[-1][0], want[-1][1] + length)
        else:
            want.append((off, length))
    assert extents_of(p) == want


@pytest.mark.usefixtures("holes_supported")
def test_data_extents_unaligned_tail(tmp_path: Path) -> None:
    # Data that ends mid-block at the end of the file: the extent stops at the size.
    p = tmp_path / "tail"
    with open(p, "wb") as f:
        f.truncate(MiB)
        f.seek(MiB - 100)
        f.write(b"x" * 100)
    assert extents_of(p) == [(MiB - B, B)]


@pytest.mark.usefixtures("holes_supported")
def test_data_extents_limited_to_given_size(tmp_path: Path) -> None:
    p = sparse(tmp_path / "f", MiB, [(0, B), (512 * 1024, B)])
    fd = os.open(p, os.O_RDONLY)
    try:
        assert data_extents(fd, 2 * B) == [(0, B)]
        assert data_extents(fd, 512 * 1024 + 10) == [(0, B), (512 * 1024, 10)]
    finally:
        os.close(fd)


@pytest.mark.usefixtures("holes_supported")
def test_iter_extent_data(tmp_path: Path) -> None:
    p = sparse(tmp_path / "f", MiB, [(0, B), (10 * B, 3 * B), (200 * B, B)])
    content = p.read_bytes()
    fd = os.open(p, os.O_RDONLY)
    try:
        extents = data_extents(fd, MiB)
        got = b"".join(bytes(v) for v in iter_extent_data(fd, extents, bufsize=5000))
    finally:
        os.close(fd)
    assert got == b"".join(content[o:o + n] for o, n in extents)
    assert len(got) == 5 * B


def test_iter_extent_data_reports_shrinking(tmp_path: Path) -> None:
    p = tmp_path / "f"
    p.write_bytes(b"a" * 3 * B)
    fd = os.open(p, os.O_RDWR)
    try:
        it = iter_extent_data(fd, [(0, 3 * B)], bufsize=B)
        next(it)
        os.ftruncate(fd, B)
        with pytest.raises(SourceChanged):
            list(it)
    finally:
        os.close(fd)


def test_signature(tmp_path: Path) -> None:
    p = tmp_path / "f"
    p.write_bytes(b"x")
    st = p.stat()
    sig = scan.Signature.of(st)
    assert sig == scan.Signature(1, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


# -- excludes ------------------------------------------------------------------------------------

def excluded(ex: Excluder, rel: str) -> bool:
    b = os.fsencode(rel)
    return ex.excluded(b, b.rsplit(b"/", 1)[-1])


def test_default_excludes_only_top_level_jvm_tmp() -> None:
    ex = Excluder(scan.DEFAULT_EXCLUDES)
    assert excluded(ex, "jvm-tmp")
    assert not excluded(ex, "dataspace_a/jvm-tmp")
    assert not excluded(ex, "jvm-tmp2")
    assert not excluded(ex, "JVM-TMP")


def test_anchored_patterns() -> None:
    ex = Excluder(["/dataspace_*/tmp", "/cache/"])
    assert excluded(ex, "dataspace_x/tmp")
    assert excluded(ex, "cache")
    assert not excluded(ex, "tmp")
    assert not excluded(ex, "dataspace_x")
    assert not excluded(ex, "a/dataspace_x/tmp")
    # A shell wildcard never matches across '/'.
    assert not excluded(ex, "dataspace_x/y/tmp")
    assert not excluded(ex, "sub/cache")


def test_unanchored_patterns_match_names_at_any_depth() -> None:
    ex = Excluder(["*.tmp", "lost+found"])
    assert excluded(ex, "a.tmp")
    assert excluded(ex, "dataspace_a/datasource_b/segment_x.gz.tmp")
    assert excluded(ex, "x/lost+found")
    assert not excluded(ex, "a.tmp/inner")
    assert not excluded(ex, "segment.gz")


def test_patterns_on_non_utf8_names() -> None:
    ex = Excluder(["*.tmp", "/raw*"])
    assert ex.excluded(b"raw\xff", b"raw\xff")
    assert ex.excluded(b"d/\xfe.tmp", b"\xfe.tmp")
    assert not ex.excluded(b"d/\xfe", b"\xfe")


def test_empty_patterns_exclude_nothing() -> None:
    ex = Excluder(["", "/"])
    assert not excluded(ex, "anything")
    assert not excluded(ex, "a/b")


def _sparse_file(path: Path) -> list[tuple[int, int]]:
    with open(path, "wb") as f:
        for i in range(6):
            f.seek(i * 3 * 65536)
            f.write(bytes([i + 1]) * (65536 + 123))
        f.truncate(20 * 65536)
    with open(path, "rb") as f:
        return data_extents(f.fileno(), os.fstat(f.fileno()).st_size)


def test_read_ahead_yields_the_same_bytes(tmp_path: Path) -> None:
    path = tmp_path / "f"
    extents = _sparse_file(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        want = b"".join(bytes(v) for v in iter_extent_data(fd, extents, bufsize=4096))
        with ReadAhead(fd, extents, bufsize=4096, depth=2) as reader:
            got = b"".join(bytes(v) for v in reader)
    finally:
        os.close(fd)
    assert got == want and len(got) == sum(n for _, n in extents)


def test_read_ahead_thread_is_joined_when_abandoned(tmp_path: Path) -> None:
    path = tmp_path / "f"
    extents = _sparse_file(path)
    before = threading.active_count()
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(RuntimeError):
            with ReadAhead(fd, extents, bufsize=4096, depth=2) as reader:
                for _ in reader:
                    raise RuntimeError("consumer gave up")
        # The thread is gone before the fd may be closed.
        assert threading.active_count() == before
    finally:
        os.close(fd)


def test_read_ahead_reports_a_shrunk_file(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x" * 100_000)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.truncate(path, 10_000)
        with pytest.raises(SourceChanged):
            with ReadAhead(fd, [(0, 100_000)], bufsize=4096) as reader:
                for _ in reader:
                    pass
    finally:
        os.close(fd)
