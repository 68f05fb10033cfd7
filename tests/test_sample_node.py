"""Tests for scripts/make-sample-node (the sample Humio node data directory generator)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import subprocess
import sys
import time
import uuid
import zlib
from pathlib import Path
from typing import Any

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "make-sample-node"
SMALL_MAX = 8 * 1024
ARGS = ["--size", "4M", "--small-files", "200"]


def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """Run the generator with ``args`` and return the completed process."""
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def make(dest: Path, *args: str) -> Path:
    """Generate a sample node into ``dest`` (small and fast) and return ``dest``."""
    proc = run(dest, *ARGS, *args)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert len(proc.stdout.strip().splitlines()) == 1
    return dest


def snapshot(root: Path) -> dict[str, tuple[Any, ...]]:
    """Describe every entry below ``root``: type, size, mode, mtime, content or target."""
    out: dict[str, tuple[Any, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            st = os.lstat(path)
            kind = stat.S_IFMT(st.st_mode)
            if stat.S_ISREG(st.st_mode):
                with open(path, "rb") as f:
                    extra: Any = hashlib.file_digest(f, "sha256").hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                extra = os.readlink(path)
            else:
                extra = None
            size = st.st_size if not stat.S_ISDIR(st.st_mode) else None
            out[rel] = (kind, size, stat.S_IMODE(st.st_mode), st.st_mtime_ns, extra)
    return out


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One generated sample node, shared by the structure tests."""
    return make(tmp_path_factory.mktemp("node") / "data", "--seed", "7", "--node-id", "3")


def fs_supports_holes(where: Path) -> bool:
    """Whether the filesystem at ``where`` stores holes (a probe sparse file)."""
    probe = where / "hole-probe"
    with open(probe, "wb") as f:
        f.truncate(4 * 1024 * 1024)
        f.seek(2 * 1024 * 1024)
        f.write(b"x" * 4096)
    st = probe.stat()
    probe.unlink()
    return st.st_blocks * 512 < st.st_size


def test_deterministic(tmp_path: Path) -> None:
    """Same seed gives an identical tree; another seed gives a different one."""
    a = snapshot(make(tmp_path / "a", "--seed", "5"))
    b = snapshot(make(tmp_path / "b", "--seed", "5"))
    assert a == b
    c = snapshot(make(tmp_path / "c", "--seed", "6"))
    assert set(a) != set(c)
    assert sorted(v[4] for v in a.values() if v[0] == stat.S_IFREG) != sorted(
        v[4] for v in c.values() if v[0] == stat.S_IFREG)


def test_accepts_empty_dir(tmp_path: Path) -> None:
    """An existing empty DIR is accepted and filled."""
    dest = tmp_path / "empty"
    dest.mkdir()
    make(dest)
    assert (dest / "cluster_membership.uuid").is_file()


def test_layout(node: Path) -> None:
    """Dataspaces hold datasources with segments; the fixed files and dirs exist."""
    spaces = sorted(node.glob("dataspace_*"))
    assert len(spaces) >= 2
    for sp in spaces:
        assert sp.is_dir()
        assert len(sp.name.split("_", 1)[1]) >= 16
        assert list(sp.glob("datasource_*"))
    segments = list(node.glob("dataspace_*/datasource_*/segment_*.gz"))
    assert len(segments) >= 2
    total = sum(p.stat().st_size for p in segments)
    assert 4 * 1024 * 1024 * 0.9 <= total <= 4 * 1024 * 1024 * 1.1
    assert all(p.stat().st_size > SMALL_MAX for p in segments)
    # Distinct, incompressible-looking contents.
    digests = {hashlib.sha256(p.read_bytes()).digest() for p in segments}
    assert len(digests) == len(segments)
    blob = segments[0].read_bytes()[: 256 * 1024]
    assert len(zlib.compress(blob)) > 0.99 * len(blob)

    cur = node / "humiodata.current"
    assert cur.is_symlink()
    target = os.readlink(cur)
    assert not os.path.isabs(target)
    assert cur.resolve().is_dir()
    assert cur.resolve().parent == node.resolve()
    assert list(cur.resolve().iterdir())

    jvm = node / "jvm-tmp"
    assert jvm.is_dir() and any(jvm.rglob("*"))

    names = {p.name for p in node.rglob("*")}
    assert "notes-ü.txt" in names
    assert any(" " in n for n in names)
    assert any(p.is_dir() and not any(p.iterdir()) for p in node.rglob("*"))


def test_uuid_and_snapshot(node: Path) -> None:
    """cluster_membership.uuid holds a uuid that is vhost --node-id in the snapshot."""
    raw = (node / "cluster_membership.uuid").read_text()
    assert raw == raw.strip()
    u = uuid.UUID(raw)
    assert str(u) == raw and u.version == 4
    snap_path = node / "global-data-snapshot.json"
    assert 100 * 1024 <= snap_path.stat().st_size <= 1024 * 1024
    snap = json.loads(snap_path.read_text())
    hosts = snap["hosts"]
    assert len(hosts) >= 2
    mine = [h for h in hosts if h["uuid"] == raw]
    assert len(mine) == 1 and mine[0]["vhost"] == 3
    others = [h for h in hosts if h["uuid"] != raw]
    assert others and all(h["vhost"] != 3 for h in others)
    assert len({h["uuid"] for h in hosts}) == len(hosts)


def test_small_files_count(node: Path) -> None:
    """Exactly --small-files regular files are at most 8 KiB; some are empty."""
    small = [p for p in node.rglob("*")
             if p.is_file() and not p.is_symlink() and p.stat().st_size <= SMALL_MAX]
    assert len(small) == 200
    assert sum(1 for p in small if p.stat().st_size == 0) >= 3


def test_modes_and_times(node: Path) -> None:
    """Modes vary; mtimes are in the past and vary (dirs and symlinks too)."""
    entries = list(node.rglob("*"))
    file_modes = {stat.S_IMODE(p.lstat().st_mode) for p in entries if p.is_file()}
    assert {0o644, 0o600} <= file_modes
    dir_modes = {stat.S_IMODE(p.lstat().st_mode) for p in entries if p.is_dir()
                 and not p.is_symlink()}
    assert {0o755, 0o700} <= dir_modes
    mtimes = {p.lstat().st_mtime_ns for p in entries}
    assert len(mtimes) > len(entries) // 2
    year_ago = (time.time() - 86_400 * 30) * 1e9
    assert all(p.lstat().st_mtime_ns < year_ago for p in entries)


def test_sparse_files(node: Path) -> None:
    """The sparse *.gz.tmp files really have holes (if the filesystem supports them)."""
    sparse = list(node.glob("dataspace_*/datasource_*/*.gz.tmp"))
    assert len(sparse) >= 4
    if not fs_supports_holes(node.parent):
        pytest.skip("filesystem does not store holes")
    for p in sparse:
        st = p.stat()
        assert st.st_blocks * 512 < st.st_size, p
    assert any(p.stat().st_blocks == 0 for p in sparse)


def test_summary_line(tmp_path: Path) -> None:
    """The summary line reports the counts."""
    proc = run(tmp_path / "s", *ARGS)
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout.strip()
    m = re.search(r"(\d+) files, (\d+) dirs, (\d+) symlinks, (\d+) sparse files, "
                  r"(\d+) apparent bytes, (\d+) allocated bytes", line)
    assert m, line
    files, dirs, links = (int(x) for x in m.group(1, 2, 3))
    entries = list((tmp_path / "s").rglob("*"))
    assert files == sum(1 for p in entries if p.is_file() and not p.is_symlink())
    assert dirs == sum(1 for p in entries if p.is_dir() and not p.is_symlink())
    assert links == sum(1 for p in entries if p.is_symlink()) >= 1


def test_refuses_non_empty_dir(tmp_path: Path) -> None:
    """A non-empty DIR is refused with exit 2 and a one-line error; nothing is written."""
    dest = tmp_path / "full"
    dest.mkdir()
    (dest / "keep").write_text("x")
    proc = run(dest, *ARGS)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert len(proc.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in dest.iterdir()) == ["keep"]


def test_refuses_file_and_too_few_small_files(tmp_path: Path) -> None:
    """DIR that is a file, or --small-files below the fixed minimum, exit 2."""
    f = tmp_path / "afile"
    f.write_text("x")
    assert run(f, *ARGS).returncode == 2
    proc = run(tmp_path / "d", "--size", "4M", "--small-files", "1")
    assert proc.returncode == 2
    assert not (tmp_path / "d").exists()
