"""Every entry of a live node is saved, or explained: far-future and pre-1970 times, a file
appended to during the run, files rewritten in place, hard links, FIFOs, sockets, devices,
xattrs and ACLs, odd names, and paths longer than PATH_MAX. Backups run through the CLI (or
in-process where the store itself is inspected); restore and a real mount give it all back."""
from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import KEY, ROOT, clean_env, run_cli, write_env
from messynode import (
    IS_ROOT,
    Y1901_NS,
    Y2300_NS,
    Appender,
    digest,
    is_record_prefix,
    long_path,
    make_messy_node,
    record,
)
from mountutil import Mount, wait_for
from storetools import backup, create_store, files, restore, walk

from humiofs.errors import EXIT_OK, EXIT_PARTIAL
from humiofs.store.repository import Store

pytestmark = pytest.mark.allow_warnings


def env_for(tmp_path: Path, node: Path) -> Path:
    (tmp_path / "backup").mkdir(exist_ok=True)
    return write_env(tmp_path / "node.env", tmp_path / "backup", directory=node)


def cli_backup(env: Path) -> subprocess.CompletedProcess[str]:
    r = run_cli("backup", "--config", env)
    assert "Traceback" not in r.stderr, r.stderr
    return r


def cli_restore(env: Path, target: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    r = run_cli("restore", "--config", env, "--to", target, *extra)
    assert "Traceback" not in r.stderr, r.stderr
    return r


def start_watch(env: Path, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as err:
        return subprocess.Popen([sys.executable, "-m", "humiofs", "backup", "--config", str(env),
                                 "--watch", "--interval", "0.3"], env=clean_env(), cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=err)


def stop_watch(proc: subprocess.Popen[bytes], log: Path) -> None:
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(30)
    assert rc == EXIT_OK, log.read_text()
    assert "Traceback" not in log.read_text()


def watch_until(env: Path, log: Path, generations: int) -> None:
    """Runs `backup --watch` until the store holds `generations` generations, then stops it
    with SIGTERM; it must exit 0 without a traceback."""
    store = env.parent / "backup" / "node1"
    proc = start_watch(env, log)
    try:
        def enough() -> bool:
            assert proc.poll() is None, log.read_text()
            gens = store / "generations"
            return gens.is_dir() and len(os.listdir(gens)) >= generations
        wait_for(enough, f"{generations} generations", 60)
    finally:
        stop_watch(proc, log)


def read_at(root: Path, parts: list[bytes]) -> bytes:
    """The bytes of a file reached component by component (its path may exceed PATH_MAX)."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for name in parts[:-1]:
            sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = sub
        f = os.open(parts[-1], os.O_RDONLY, dir_fd=fd)
        try:
            return os.read(f, 1 << 20)
        finally:
            os.close(f)
    finally:
        os.close(fd)


# -- times ------------------------------------------------------------------------------------

def test_far_future_and_1901_times_back_up_and_round_trip(tmp_path: Path) -> None:
    node = tmp_path / "node"
    node.mkdir()
    (node / "x").write_bytes(b"x")
    (node / "old").write_bytes(b"o")
    (node / "d").mkdir()
    os.utime(node / "x", ns=(Y2300_NS, Y2300_NS))
    os.utime(node / "old", ns=(Y1901_NS, Y1901_NS))
    os.utime(node / "d", ns=(Y2300_NS, Y2300_NS))
    env = env_for(tmp_path, node)
    r = cli_backup(env)
    assert r.returncode == EXIT_OK, r.stderr
    r = cli_restore(env, tmp_path / "r")
    assert r.returncode == EXIT_OK, r.stderr
    assert (tmp_path / "r" / "x").stat().st_mtime_ns == Y2300_NS
    assert (tmp_path / "r" / "old").stat().st_mtime_ns == Y1901_NS
    assert (tmp_path / "r" / "d").stat().st_mtime_ns == Y2300_NS
    # A second run finds the far-future file unchanged.
    r = cli_backup(env)
    assert r.returncode == EXIT_OK and "0 new, 0 changed" in r.stdout, r.stdout + r.stderr


def test_far_future_time_in_watch(tmp_path: Path) -> None:
    node = tmp_path / "node"
    node.mkdir()
    (node / "x").write_bytes(b"x")
    os.utime(node / "x", ns=(Y2300_NS, Y2300_NS))
    watch_until(env_for(tmp_path, node), tmp_path / "watch.log", 1)


# -- files that change while they are read ------------------------------------------------------

@pytest.mark.parametrize("start_bytes", [0, 3 << 20], ids=["small", "large"])
def test_appended_file_is_stored_as_a_consistent_prefix(tmp_path: Path,
                                                        start_bytes: int) -> None:
    """A file that gets 4 KiB every 5 ms is in the generation, as a prefix it really had."""
    node = tmp_path / "node"
    node.mkdir()
    live = node / "segment_live"
    with open(live, "wb") as f:
        for j in range(start_bytes // 4096):
            f.write(record(j))
    env = env_for(tmp_path, node)
    with Appender(live, start=start_bytes // 4096) as app:
        wait_for(lambda: app.count > start_bytes // 4096 + 20, "appends")
        r = cli_backup(env)
        assert r.returncode == EXIT_OK, r.stdout + r.stderr
        assert "still being written" in r.stdout
        r = cli_restore(env, tmp_path / "r")
    assert r.returncode == EXIT_OK, r.stderr
    data = (tmp_path / "r" / "segment_live").read_bytes()
    assert len(data) >= start_bytes + 20 * 4096
    assert is_record_prefix(data)


def test_appended_file_in_every_watch_generation(tmp_path: Path) -> None:
    node = tmp_path / "node"
    node.mkdir()
    live = node / "segment_live"
    # Big enough that reading it always overlaps an append.
    live.write_bytes(b"".join(record(j) for j in range(768)))
    with Appender(live, start=768):
        watch_until(env_for(tmp_path, node), tmp_path / "watch.log", 3)
    store = Store.open(tmp_path / "backup" / "node1", KEY)
    sizes = []
    for name in store.list_generations():
        gen = store.load_generation(name)
        e = files(store, gen)["segment_live"]
        target = tmp_path / f"r-{name}"
        restore(store, gen, target)
        data = (target / "segment_live").read_bytes()
        assert len(data) == e.size and is_record_prefix(data)
        sizes.append(e.size)
    assert sizes == sorted(sizes) and sizes[-1] > sizes[0], sizes


def boundaries(data: bytes) -> int:
    return sum(1 for a, b in zip(data, data[1:]) if a != b)


@pytest.mark.parametrize("size", [200_000, 3 << 20], ids=["small", "large"])
def test_file_rewritten_in_place_is_never_stored_torn(tmp_path: Path, size: int) -> None:
    """A file overwritten front to back, again and again, alternately with A and B, holds at
    every moment new bytes up to some point and old ones after it: one boundary at most.
    A backup stores such a state, or keeps the file out with a warning; never a torn mix."""
    node = tmp_path / "node"
    node.mkdir()
    victim = node / "rewritten"
    victim.write_bytes(b"A" * size)
    stop = threading.Event()

    def rewrite() -> None:
        fd = os.open(victim, os.O_WRONLY)
        try:
            letter = b"B"
            while not stop.is_set():
                for off in range(0, size, 65536):
                    os.pwrite(fd, letter * min(65536, size - off), off)
                letter = b"A" if letter == b"B" else b"B"
        finally:
            os.close(fd)
    env = env_for(tmp_path, node)
    writer = threading.Thread(target=rewrite, daemon=True)
    writer.start()
    try:
        r = cli_backup(env)
    finally:
        stop.set()
        writer.join()
    assert r.returncode in (EXIT_OK, EXIT_PARTIAL), r.stderr
    r2 = cli_restore(env, tmp_path / "r")
    assert r2.returncode == EXIT_OK, r2.stderr
    restored = tmp_path / "r" / "rewritten"
    if r.returncode == EXIT_PARTIAL:
        assert "rewritten: it " in r.stderr and not restored.exists(), r.stderr
    else:
        data = restored.read_bytes()
        assert len(data) == size and boundaries(data) <= 1


# -- kinds of entry ------------------------------------------------------------------------------

def test_hard_links_are_stored_once_and_come_back_as_links(tmp_path: Path) -> None:
    node = tmp_path / "node"
    (node / "a").mkdir(parents=True)
    (node / "b").mkdir()
    (node / "a" / "one").write_bytes(os.urandom(1_000_000))
    os.link(node / "a" / "one", node / "a" / "two")
    os.link(node / "a" / "one", node / "b" / "three")
    store = create_store(tmp_path / "backup" / "node1")
    gen, stats = backup(store, node)
    entries = files(store, gen)
    refs = {entries[p].data for p in ("a/one", "a/two", "b/three")}
    assert len(refs) == 1 and {entries[p].nlink for p in entries} == {3}
    assert stats.bytes_read == 1_000_000
    stored = sum(p.stat().st_size for p in (store.path / "packs").glob("*/*"))
    assert stored < 1_100_000
    assert gen.stats["data_bytes"] == 1_000_000
    restore(store, gen, tmp_path / "r")
    inos = {(tmp_path / "r" / p).stat().st_ino for p in ("a/one", "a/two", "b/three")}
    assert len(inos) == 1 and (tmp_path / "r" / "a" / "one").stat().st_nlink == 3
    assert (tmp_path / "r" / "b" / "three").read_bytes() == (node / "a" / "one").read_bytes()


def test_fifo_socket_and_devices(tmp_path: Path) -> None:
    node = tmp_path / "node"
    node.mkdir()
    os.mkfifo(node / "pipe")
    os.chmod(node / "pipe", 0o620)
    os.mknod(node / "sock", stat.S_IFSOCK | 0o600)
    if IS_ROOT:
        os.mknod(node / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
        os.mknod(node / "loop", stat.S_IFBLK | 0o640, os.makedev(7, 300))
    env = env_for(tmp_path, node)
    r = cli_backup(env)
    assert r.returncode == EXIT_PARTIAL, r.stdout + r.stderr
    assert "sock: a socket cannot be backed up" in r.stderr
    r = cli_restore(env, tmp_path / "r")
    assert r.returncode == EXIT_OK, r.stderr
    st = (tmp_path / "r" / "pipe").lstat()
    assert stat.S_ISFIFO(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o620
    assert not (tmp_path / "r" / "sock").exists()
    if IS_ROOT:
        st = (tmp_path / "r" / "null").lstat()
        assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3)
        st = (tmp_path / "r" / "loop").lstat()
        assert stat.S_ISBLK(st.st_mode) and st.st_rdev == os.makedev(7, 300)
        assert stat.S_IMODE(st.st_mode) == 0o640


def test_odd_names_keep_raw_byte_order(tmp_path: Path) -> None:
    """Trees sort names by raw bytes: b'\\xff' sorts after an emoji's UTF-8 bytes, but before
    it as str. A wrong order would make the generation unreadable."""
    node = tmp_path / "node"
    node.mkdir()
    for name in (b"\xff", "\U0001F600".encode(), b"a\nb", b"\xc3\xbc"):
        with open(os.path.join(os.fsencode(node), name), "wb") as f:
            f.write(name)
    store = create_store(tmp_path / "backup" / "node1")
    gen, _ = backup(store, node)
    names = [e.name for e in store.read_tree(gen.root.tree)]
    assert names == sorted(names) and len(names) == 4
    restore(store, gen, tmp_path / "r")
    for name in names:
        assert open(os.path.join(os.fsencode(tmp_path / "r"), name), "rb").read() == name


def test_xattrs_and_acls_round_trip(tmp_path: Path) -> None:
    node = make_messy_node(tmp_path / "node")
    store = create_store(tmp_path / "backup" / "node1")
    gen, _ = backup(store, node)
    entry = dict(walk(store, gen.root.tree))["xattrs/labelled"]
    names = [n for n, _ in entry.xattrs]
    assert b"user.bin" in names and b"system.posix_acl_access" in names
    restore(store, gen, tmp_path / "r")
    want, _ = digest(node, skip=(b"socket",))
    got, _ = digest(tmp_path / "r")
    assert got[b"xattrs/labelled"] == want[b"xattrs/labelled"]
    assert got[b"xattrs"] == want[b"xattrs"]


def test_unchanged_xattr_change_is_seen(tmp_path: Path) -> None:
    """Setting an xattr moves only the ctime: the next run stores it, without re-reading data."""
    node = tmp_path / "node"
    node.mkdir()
    (node / "f").write_bytes(b"x" * 5000)
    store = create_store(tmp_path / "backup" / "node1")
    backup(store, node, settle=True)
    os.setxattr(node / "f", b"user.new", b"1")
    gen, _ = backup(store, node)
    assert files(store, gen)["f"].xattrs == ((b"user.new", b"1"),)


def test_path_longer_than_path_max(tmp_path: Path) -> None:
    node = tmp_path / "node"
    node.mkdir()
    fd = os.open(node, os.O_RDONLY | os.O_DIRECTORY)
    parts = long_path(node)
    for name in parts[:-1]:
        os.mkdir(name, dir_fd=fd)
        sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = sub
    os.close(os.open(parts[-1], os.O_WRONLY | os.O_CREAT, 0o600, dir_fd=fd))
    os.close(fd)
    assert len(b"/".join(parts)) > 4096
    env = env_for(tmp_path, node)
    r = cli_backup(env)
    assert r.returncode == EXIT_OK, r.stderr
    r = cli_restore(env, tmp_path / "r")
    assert r.returncode == EXIT_OK, r.stderr
    assert read_at(tmp_path / "r", parts) == b""
    r = run_cli("check", "--config", env)
    assert r.returncode == EXIT_OK, r.stdout + r.stderr


@pytest.fixture
def deep_tmp(tmp_path: Path) -> Iterator[Path]:
    """tmp_path, emptied with rm(1) afterwards: pytest's own cleanup recurses too deep."""
    yield tmp_path
    subprocess.run(["rm", "-rf", str(tmp_path)], check=True)


def test_deep_tree(deep_tmp: Path) -> None:
    """3,000 levels of folders: deeper than Python's default recursion limit allows."""
    tmp_path = deep_tmp
    node = tmp_path / "node"
    node.mkdir()
    fd = os.open(node, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(3000):
        os.mkdir(b"d", dir_fd=fd)
        sub = os.open(b"d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = sub
    os.close(os.open(b"bottom", os.O_WRONLY | os.O_CREAT, 0o600, dir_fd=fd))
    os.close(fd)
    env = env_for(tmp_path, node)
    r = cli_backup(env)
    assert r.returncode == EXIT_OK, r.stderr
    r = cli_restore(env, tmp_path / "r")
    assert r.returncode == EXIT_OK, r.stderr
    assert read_at(tmp_path / "r", [b"d"] * 3000 + [b"bottom"]) == b""
    r = run_cli("check", "--config", env)
    assert r.returncode == EXIT_OK, r.stdout + r.stderr


# -- all of it at once: backup, restore and the mount ------------------------------------------

@pytest.fixture(scope="module")
def messy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path, int]]:
    """A messy node backed up through the CLI while a file is appended to: (node, env file,
    exit code of the backup). The appended file is closed by then."""
    tmp = tmp_path_factory.mktemp("messy")
    node = make_messy_node(tmp / "node")
    env = env_for(tmp, node)
    with Appender(node / "dataspace_1" / "datasource_1" / "segment_live") as app:
        wait_for(lambda: app.count > 10, "appends")
        r = cli_backup(env)
    assert "socket: a socket cannot be backed up" in r.stderr
    yield node, env, r.returncode


def compare(node: Path, other: Path, mounted: bool = False) -> None:
    skip = (b"socket", b"globaldata") if mounted else (b"socket",)
    want, want_links = digest(node, skip=skip, extents=not mounted)
    got, got_links = digest(other, skip=skip, extents=not mounted)
    live = b"dataspace_1/datasource_1/segment_live"
    data = read_at(other, live.split(b"/"))
    assert len(data) > 10 * 4096 and is_record_prefix(data)
    want.pop(live), got.pop(live)
    if mounted:
        # The folder holding globaldata gains a subfolder in the mount.
        got[b""] = want[b""] = ()
    assert got == want
    assert got_links == want_links and len(want_links) == 2


def test_messy_node_backs_up_with_a_generation(messy: tuple[Path, Path, int]) -> None:
    assert messy[2] == EXIT_PARTIAL  # the socket


def test_messy_node_restores_every_kind(messy: tuple[Path, Path, int], tmp_path: Path) -> None:
    node, env, _ = messy
    r = cli_restore(env, tmp_path / "r")
    assert r.returncode == EXIT_OK, r.stdout + r.stderr
    assert "as hard links" in r.stdout
    compare(node, tmp_path / "r")


def test_messy_node_mounts_every_kind(messy: tuple[Path, Path, int], tmp_path: Path) -> None:
    node, env, _ = messy
    with Mount(env, tmp_path / "mnt") as m:
        compare(node, m.path / "node1", mounted=True)
        du = subprocess.run(["du", "-s", "--block-size=1", str(m.path / "node1" / "dataspace_1")],
                            capture_output=True, text=True, check=True)
        du_src = subprocess.run(["du", "-s", "--block-size=1", str(node / "dataspace_1")],
                                capture_output=True, text=True, check=True)
        # The live segment is stored as a prefix; everything else matches, links counted once.
        assert abs(int(du.stdout.split()[0]) - int(du_src.stdout.split()[0])) < 64 * 4096
        getfattr = subprocess.run(["getfattr", "-d", str(m.path / "node1" / "xattrs" / "labelled")],
                                  capture_output=True, text=True)
        assert getfattr.returncode == 0 and "user.bin" in getfattr.stdout
        sub = m.path / "node1" / "dataspace_1"
        assert sub.stat().st_nlink == 2 + 2
        assert (m.path / "node1" / "far-future").stat().st_mtime_ns == Y2300_NS
        if IS_ROOT:
            # nodev: a device node in a backup gives no access to the device.
            with pytest.raises(PermissionError):
                open(m.path / "node1" / "dev-null", "rb")


def test_fifos_where_identity_files_belong_do_not_hang(tmp_path: Path) -> None:
    """The identity files are read by name: a FIFO there must not block the backup."""
    node = tmp_path / "node"
    node.mkdir()
    os.mkfifo(node / "cluster_membership.uuid")
    env = env_for(tmp_path, node)
    r = run_cli("backup", "--config", env, timeout=60)
    assert r.returncode == EXIT_OK and "Traceback" not in r.stderr, r.stderr
    (node / "cluster_membership.uuid").unlink()
    (node / "cluster_membership.uuid").write_text("0f8e2c1a-0000-4000-8000-0000000000cc")
    os.mkfifo(node / "global-data-snapshot.json")
    r = run_cli("backup", "--config", env, timeout=60)
    assert r.returncode == EXIT_OK and "Traceback" not in r.stderr, r.stderr


@pytest.mark.skipif(not IS_ROOT or not shutil.which("unshare"),
                    reason="needs root and unshare(1) for a user namespace")
def test_restore_in_a_container_without_mknod(tmp_path: Path) -> None:
    """Root in a user namespace (a container) cannot make device nodes: each is named in a
    warning (exit 8) and everything else is restored."""
    node = tmp_path / "node"
    node.mkdir()
    (node / "f").write_bytes(b"data")
    os.mkfifo(node / "pipe")
    os.mknod(node / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    env = env_for(tmp_path, node)
    assert cli_backup(env).returncode == EXIT_OK
    r = subprocess.run(["unshare", "--user", "--map-root-user", sys.executable, "-m", "humiofs",
                        "restore", "--config", str(env), "--to", str(tmp_path / "r")],
                       env=clean_env(), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == EXIT_PARTIAL, r.stdout + r.stderr
    assert "null: a device node cannot be created here" in r.stderr
    assert "Traceback" not in r.stderr
    assert (tmp_path / "r" / "f").read_bytes() == b"data"
    assert stat.S_ISFIFO((tmp_path / "r" / "pipe").lstat().st_mode)
    assert not (tmp_path / "r" / "null").exists()


def deep_chain(root: Path, depth: int) -> None:
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(depth):
        os.mkdir(b"d", dir_fd=fd)
        sub = os.open(b"d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = sub
    os.close(os.open(b"bottom", os.O_WRONLY | os.O_CREAT, 0o600, dir_fd=fd))
    os.close(fd)


def with_fd_limit(n: int) -> None:
    """preexec_fn: soft and hard open-file limit n, as `ulimit -n n` in a shell sets them."""
    import resource
    resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))


def test_deeper_than_the_open_file_limit_is_a_warning(tmp_path: Path) -> None:
    """With `ulimit -n 64`, 200 levels of folders cannot all be open at once: backup and
    restore each name the folder where they stopped (exit 8), and keep everything else."""
    node = tmp_path / "node"
    (node / "deep").mkdir(parents=True)
    deep_chain(node / "deep", 200)
    (node / "zz-after").write_bytes(b"after")
    env = env_for(tmp_path, node)
    r = subprocess.run([sys.executable, "-m", "humiofs", "backup", "--config", str(env)],
                       env=clean_env(), cwd=ROOT, capture_output=True, text=True, timeout=120,
                       preexec_fn=lambda: with_fd_limit(64))
    assert r.returncode == EXIT_PARTIAL, r.stdout + r.stderr
    assert "nested deeper than the open-file limit" in r.stderr and "Traceback" not in r.stderr
    assert cli_backup(env).returncode == EXIT_OK        # without the limit: all of it
    r = subprocess.run([sys.executable, "-m", "humiofs", "restore", "--config", str(env),
                        "--to", str(tmp_path / "r")],
                       env=clean_env(), cwd=ROOT, capture_output=True, text=True, timeout=120,
                       preexec_fn=lambda: with_fd_limit(64))
    assert r.returncode == EXIT_PARTIAL, r.stdout + r.stderr
    assert "nested deeper than the open-file limit" in r.stderr and "Traceback" not in r.stderr
    assert (tmp_path / "r" / "zz-after").read_bytes() == b"after"


@pytest.mark.skipif(not IS_ROOT, reason="mounts a tmpfs")
def test_a_file_too_large_for_the_target_is_a_warning(tmp_path: Path) -> None:
    """tmpfs holds a 17 TiB sparse file that ext4 cannot: restore names it (exit 8) and
    restores everything else, xattrs included."""
    node = tmp_path / "node"
    node.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(node)], check=True)
    try:
        with open(node / "huge", "wb") as f:
            f.truncate(17 << 40)
        (node / "zz").write_bytes(b"zz")
        os.setxattr(node / "zz", b"user.k", b"v")
        env = env_for(tmp_path, node)
        assert cli_backup(env).returncode == EXIT_OK
    finally:
        subprocess.run(["umount", str(node)], check=True)
    r = cli_restore(env, tmp_path / "r")
    assert r.returncode == EXIT_PARTIAL, r.stdout + r.stderr
    assert "huge: File too large; not restored" in r.stderr
    assert os.getxattr(tmp_path / "r" / "zz", b"user.k") == b"v"


def test_names_in_warnings_cannot_break_the_line(tmp_path: Path) -> None:
    """A name with a newline, an escape sequence or a byte that is not UTF-8 is shown escaped
    in its one-line warning."""
    node = tmp_path / "node"
    node.mkdir()
    os.mknod(os.path.join(os.fsencode(node), b"sock\n\x1b[31m\xff"), stat.S_IFSOCK | 0o600)
    r = cli_backup(env_for(tmp_path, node))
    assert r.returncode == EXIT_PARTIAL
    line = next(ln for ln in r.stderr.splitlines() if "socket" in ln)
    assert "sock\\n\\x1b[31m\\xff: a socket cannot be backed up" in line
    assert "\x1b" not in r.stderr


def test_watch_sees_a_write_through_another_hard_link(tmp_path: Path) -> None:
    """inotify reports a write to a hard-linked file only in the folder of the name written
    through; the other name's folder must not keep the old data until the next full walk."""
    node = tmp_path / "node"
    (node / "hd1").mkdir(parents=True)
    (node / "hd2").mkdir()
    (node / "hd1" / "f").write_bytes(b"v1\n")
    os.link(node / "hd1" / "f", node / "hd2" / "g")
    env = env_for(tmp_path, node)
    log = tmp_path / "watch.log"
    proc = start_watch(env, log)
    store_path = tmp_path / "backup" / "node1"

    def both(size: int) -> bool:
        assert proc.poll() is None, log.read_text()
        if not (store_path / "generations").is_dir():
            return False
        store = Store.open(store_path, KEY)
        try:
            names = store.list_generations()
            if not names:
                return False
            entries = files(store, store.load_generation(names[-1]))
            f, g = entries.get("hd1/f"), entries.get("hd2/g")
            return f is not None and g is not None and f.size == g.size == size \
                and f.data == g.data
        finally:
            store.close()
    try:
        wait_for(lambda: both(3), "both names in a generation", 60)
        with open(node / "hd2" / "g", "ab") as out:
            out.write(b"v2\n")
        wait_for(lambda: both(6), "the write seen through both names", 60)
    finally:
        stop_watch(proc, log)


def test_file_copied_over_again_and_again_is_never_stored_truncated(tmp_path: Path) -> None:
    """`cp` over a file truncates it, then writes it anew. The backup stores a state the file
    held (a prefix of what was being copied in), or keeps the previous generation's copy
    with a warning; never the empty file that `cp` leaves for an instant."""
    node = tmp_path / "node"
    node.mkdir()
    src = [os.urandom(3 << 20), os.urandom(3 << 20)]
    for i, data in enumerate(src):
        (tmp_path / f"src{i}").write_bytes(data)
    (node / "trunc").write_bytes(src[0])
    env = env_for(tmp_path, node)
    assert cli_backup(env).returncode == EXIT_OK
    stop = threading.Event()

    def copy_over() -> None:
        i = 1
        while not stop.is_set():
            subprocess.run(["cp", str(tmp_path / f"src{i}"), str(node / "trunc")], check=True)
            i = 1 - i
    copier = threading.Thread(target=copy_over, daemon=True)
    copier.start()
    try:
        results = [cli_backup(env) for _ in range(4)]
    finally:
        stop.set()
        copier.join()
    store = Store.open(tmp_path / "backup" / "node1", KEY)
    for name, r in zip(store.list_generations()[1:], results):
        assert r.returncode in (EXIT_OK, EXIT_PARTIAL), r.stderr
        target = tmp_path / f"r-{name}"
        restore(store, store.load_generation(name), target)
        data = (target / "trunc").read_bytes()
        assert data and any(data == whole[:len(data)] for whole in src), r.stdout + r.stderr


def test_cp_pausing_between_truncate_and_write_is_not_stored_empty(tmp_path: Path) -> None:
    """A busy `cp` can pause longer than the 100 ms racy window between emptying the file and
    writing it (seen under load). The writer believes a file it found freshly emptied, whose
    previous copy was not empty, only once the emptying is 1 s old (FORMAT.md 7.3)."""
    node = tmp_path / "node"
    node.mkdir()
    old, new = os.urandom(200_000), os.urandom(300_000)
    (node / "f").write_bytes(old)
    store = create_store(tmp_path / "backup" / "node1")
    backup(store, node, settle=True)
    # The input: a writer that truncates, then writes 300 ms later.
    with open(node / "f", "wb"):
        pass
    writer = threading.Timer(0.3, lambda: (node / "f").write_bytes(new))
    writer.start()
    try:
        gen, _ = backup(store, node)
    finally:
        writer.join()
    stored = tmp_path / "r"
    restore(store, gen, stored)
    assert (stored / "f").read_bytes() in (old, new)


@pytest.mark.skipif(not IS_ROOT, reason="mounts a tmpfs")
def test_xattrs_the_kernel_will_not_list_leave_the_data_stored(tmp_path: Path) -> None:
    """5,000 xattrs are more than listxattr can return (E2BIG): the file is stored without
    them, named in a warning (exit 8), instead of being left out."""
    node = tmp_path / "node"
    node.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(node)], check=True)
    try:
        (node / "many").write_bytes(b"data")
        for i in range(5000):
            os.setxattr(node / "many", b"user.attribute-name-%05d" % i, b"")
        env = env_for(tmp_path, node)
        r = cli_backup(env)
    finally:
        subprocess.run(["umount", str(node)], check=True)
    assert r.returncode == EXIT_PARTIAL, r.stdout + r.stderr
    assert "many: its extended attributes cannot be read" in r.stderr
    assert cli_restore(env, tmp_path / "r").returncode == EXIT_OK
    assert (tmp_path / "r" / "many").read_bytes() == b"data"


def test_a_ctime_in_the_future_does_not_stall_the_backup(tmp_path: Path) -> None:
    """The clock set back after a file changed: its ctime is in the future. The racy wait is
    at most 100 ms (1 s for a freshly emptied file), not until that ctime."""
    import time as _time
    node = tmp_path / "node"
    node.mkdir()
    (node / "f").write_bytes(b"old data")
    store = create_store(tmp_path / "backup" / "node1")
    backup(store, node, settle=True, host_id="1")
    (node / "f").write_bytes(b"")
    (node / "g").write_bytes(b"new")
    real = _time.time_ns
    # The writer's clock an hour behind the file's ctime: as after `date -s` backwards.
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_time, "time_ns", lambda: real() - 3600 * 10**9)
        mp.setattr(_time, "time", lambda: real() / 1e9 - 3600)
        started = _time.monotonic()
        gen, _ = backup(store, node, host_id="1")
        took = _time.monotonic() - started
    assert took < 30, took          # a stall would be an hour; the waits are at most ~1 s
    restored = tmp_path / "r"
    restore(store, gen, restored)
    assert (restored / "g").read_bytes() == b"new"
