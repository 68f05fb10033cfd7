"""Real mounts in a subprocess: what operators do with the mount, byte for byte and hole for hole.

Copies that keep holes (each tested below): rsync -aS, tar -S, cp --sparse=always, and plain
cp / cp -a with coreutils 9.1 (the mount's st_blocks show a file is sparse, and cp then finds its
holes by reading zeros). Newer coreutils (9.9+) cp --sparse=auto relies on SEEK_HOLE, which
pyfuse3 cannot answer; use --sparse=always there.
"""
from __future__ import annotations

import errno
import hashlib
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import KEY, ROOT, make_sample, run_cli, write_env
from mountutil import (
    Mount,
    backup,
    create_store,
    is_mounted,
    mount_line,
    mounted_digest,
    pid_gone,
    readdir,
    source_digest,
    tamper_file_data,
    tiny_node,
    wait_for,
)

from humiofs.backup.scan import data_extents
from humiofs.store.generations import format_time
from humiofs.store.repository import Store

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/fuse") or not shutil.which("fusermount3"),
                                reason="needs FUSE (/dev/fuse and fusermount3)")


def backup_cli(env: Path) -> None:
    done = run_cli("backup", "--config", env, "--no-progress")
    assert done.returncode == 0, done.stderr


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, sample_node: Path) -> tuple[Path, Path]:
    """A backup of the sample node made with the CLI; returns (env file, BACKUP_DIR)."""
    root = tmp_path_factory.mktemp("mount")
    (root / "backup").mkdir()
    env = write_env(root / "node.env", root / "backup", directory=sample_node)
    backup_cli(env)
    return env, root / "backup"


@pytest.fixture(scope="module")
def mnt(setup: tuple[Path, Path]) -> Iterator[Path]:
    """The backup mounted for the whole module, from a two-line env file (BACKUP_DIR + key)."""
    env = write_env(setup[0].parent / "mount.env", setup[1], name=None)
    with Mount(env, setup[0].parent / "mnt") as m:
        yield m.path


WIDE = 5000
UUID = "0b5a6c1e-8d3f-4c2a-9e71-2f6d8a9b0c13"  # tiny_node's


@pytest.fixture(scope="module")
def wide(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A mounted backup of a small node with a folder of WIDE files and a nested folder."""
    root = tmp_path_factory.mktemp("wide")
    src = tiny_node(root / "src", {"a/b/c.txt": b"nested\n"})
    (src / "many").mkdir()
    for i in range(WIDE):
        (src / "many" / f"f{i:05d}").write_bytes(b"x")
    backup(create_store(root / "backup" / "node1"), src)
    env = write_env(root / "wide.env", root / "backup", name=None)
    with Mount(env, root / "mnt") as m:
        yield m.path


def sparse_files(node: Path) -> list[Path]:
    return sorted(node.glob("dataspace_*/datasource_*/*.gz.tmp"))


def test_kernel_mount_is_ro_humiofs(mnt: Path) -> None:
    fsname, _, fstype, opts = mount_line(mnt)[:4]
    assert fsname == "humiofs" and fstype == "fuse.humiofs"
    assert "ro" in opts.split(",") and "default_permissions" in opts.split(",")
    assert {"nodev", "nosuid"} <= set(opts.split(","))
    assert "allow_other" not in opts.split(",")
    assert sorted(os.listdir(mnt)) == [".generations", "node1"]


def test_walkers_that_trust_nlink_find_everything(mnt: Path) -> None:
    """perl's File::Find skips the rest of a folder once it has seen st_nlink - 2 subfolders:
    a wrong 2 hides whole subtrees. Every folder reports 2 + its subfolders."""
    walk = subprocess.run(
        ["perl", "-MFile::Find", "-e",
         "$File::Find::dont_use_nlink = 0; find(sub { print \"$File::Find::name\\n\" }, @ARGV)",
         str(mnt / "node1")], capture_output=True, text=True, check=True)
    everything = subprocess.run(["find", str(mnt / "node1")], capture_output=True, text=True,
                                check=True)
    assert sorted(walk.stdout.splitlines()) == sorted(everything.stdout.splitlines())
    for d in (mnt / "node1", *(mnt / "node1").glob("dataspace_*")):
        subdirs = sum(1 for p in d.iterdir() if p.is_dir() and not p.is_symlink())
        assert d.stat().st_nlink == 2 + subdirs, d


def test_xattr_calls_answer_like_a_filesystem_with_xattrs(mnt: Path, tmp_path: Path) -> None:
    """An empty list and ENODATA, not ENOTSUP: getfattr and tar --xattrs stay quiet."""
    seg = next((mnt / "node1").glob("dataspace_*/datasource_*/*"))
    assert os.listxattr(seg) == []
    with pytest.raises(OSError) as err:
        os.getxattr(seg, "user.nothing")
    assert err.value.errno == errno.ENODATA
    done = subprocess.run(["getfattr", "-d", "-R", str(mnt / "node1")], capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    tar = subprocess.run(["tar", "--xattrs", "-cf", str(tmp_path / "x.tar"), "-C",
                          str(mnt / "node1"), "."], capture_output=True, text=True)
    assert tar.returncode == 0 and tar.stderr == "", tar.stderr


def test_every_file_matches_the_source(mnt: Path, sample_node: Path) -> None:
    assert mounted_digest(mnt / "node1", extents=False) == source_digest(sample_node, False)


def test_du_matches_the_source(mnt: Path, sample_node: Path) -> None:
    for path in sparse_files(sample_node):
        with open(path, "rb") as f:
            data = sum(n for _, n in data_extents(f.fileno(), path.stat().st_size))
        mounted = mnt / "node1" / path.relative_to(sample_node)
        assert mounted.stat().st_blocks == -(-data // 4096) * 8
    du = [int(subprocess.run(["du", "-s", "--block-size=1", *args], capture_output=True,
                             text=True, check=True).stdout.split()[0])
          for args in (["--exclude=jvm-tmp", str(sample_node)], [str(mnt / "node1")])]
    assert abs(du[0] - du[1]) <= 64 * 1024, du


def test_seed_file_restores_the_uuid_with_cp(mnt: Path, sample_node: Path,
                                             tmp_path: Path) -> None:
    uuid = (sample_node / "cluster_membership.uuid").read_text()
    seed = mnt / "node1" / "globaldata" / f"cluster_membership-1-{uuid}.uuid"
    assert os.listdir(seed.parent) == [seed.name]
    subprocess.run(["cp", str(seed), str(tmp_path / "cluster_membership.uuid")], check=True)
    assert (tmp_path / "cluster_membership.uuid").read_text() == uuid


COPIES = {
    "rsync -aS": lambda src, dst: [["rsync", "-aS", f"{src}/", f"{dst}/"]],
    # --format=posix keeps mtimes to the nanosecond (the default format has seconds only).
    "tar -S": lambda src, dst: [["sh", "-c", f"tar --format=posix -C '{src}' -cSf '{dst}.tar' ."
                                 f" && mkdir '{dst}' && tar -C '{dst}' -xSpf '{dst}.tar'"]],
    "cp -a --sparse=always": lambda src, dst: [["cp", "-a", "--sparse=always", src, dst]],
    "cp -a": lambda src, dst: [["cp", "-a", src, dst]],
}


@pytest.mark.parametrize("how", list(COPIES))
def test_copies_keep_holes(how: str, mnt: Path, sample_node: Path, tmp_path: Path) -> None:
    """The copy is the source, byte for byte, with the same holes (tree_digest has extents)."""
    dst = tmp_path / "copy"
    for cmd in COPIES[how](str(mnt / "node1"), str(dst)):
        subprocess.run(cmd, check=True, capture_output=True)
    assert mounted_digest(dst) == source_digest(sample_node)


def test_plain_cp_of_one_file_keeps_holes(mnt: Path, sample_node: Path, tmp_path: Path) -> None:
    assert "9.1" in subprocess.run(["cp", "--version"], capture_output=True,
                                   text=True).stdout.splitlines()[0]
    for path in sparse_files(sample_node):
        dst = tmp_path / path.name
        subprocess.run(["cp", str(mnt / "node1" / path.relative_to(sample_node)), str(dst)],
                       check=True)
        with open(path, "rb") as a, open(dst, "rb") as b:
            size = path.stat().st_size
            assert data_extents(a.fileno(), size) == data_extents(b.fileno(), size)
        assert dst.read_bytes() == path.read_bytes()


def test_everything_that_writes_is_erofs(mnt: Path) -> None:
    node = mnt / "node1"
    existing = node / "cluster_membership.uuid"
    attempts = [
        lambda: open(existing, "r+b"),
        lambda: open(existing, "ab"),
        lambda: open(node / "new-file", "wb"),
        lambda: open(mnt / "new-file", "wb"),
        lambda: os.mkdir(node / "new-dir"),
        lambda: os.mkdir(mnt / "node2"),
        lambda: os.rename(existing, node / "renamed"),
        lambda: os.chmod(existing, 0o777),
        lambda: os.utime(existing),
        lambda: os.unlink(existing),
        lambda: os.rmdir(node / "globaldata"),
        lambda: os.symlink("x", node / "new-link"),
        lambda: os.truncate(existing, 0),
    ]
    for attempt in attempts:
        with pytest.raises(OSError) as info:
            attempt()
        assert info.value.errno == errno.EROFS
    assert subprocess.run(["touch", str(existing)], capture_output=True).returncode != 0


def test_concurrent_readers_get_exact_bytes(mnt: Path, sample_node: Path) -> None:
    files = [p for p in sample_node.rglob("*") if p.is_file() and not p.is_symlink()
             and p.stat().st_size > 256 * 1024 and "jvm-tmp" not in p.parts]
    failures: list[str] = []

    def reader(seed: int) -> None:
        rng = random.Random(seed)
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            src = rng.choice(files)
            size = src.stat().st_size
            off, n = rng.randrange(size), rng.choice((1, 4096, 70000, 300000))
            with open(src, "rb") as a, open(mnt / "node1" / src.relative_to(sample_node),
                                            "rb") as b:
                if os.pread(a.fileno(), n, off) != os.pread(b.fileno(), n, off):
                    failures.append(f"{src} at {off}+{n}")

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads)
    assert not failures


def test_refuses_unusable_mountpoints(setup: tuple[Path, Path], mnt: Path,
                                      tmp_path: Path) -> None:
    env = setup[0]
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    for where, why in ((full, "not empty"), (tmp_path / "missing", "does not exist"),
                       (mnt, "busy"), (full / "x", "not a folder")):
        done = run_cli("mount", "--config", env, where)
        assert done.returncode == 6, done.stderr
        assert why in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert sorted(os.listdir(full)) == ["x"] and not is_mounted(full)


def test_wrong_key_refuses_to_mount_the_store_named(setup: tuple[Path, Path],
                                                    tmp_path: Path) -> None:
    """With --name the store is there and the key wrong: exit 3. (Without --name the mount
    starts and waits for a store the key opens: test_mount_backup_dir.py.)"""
    env = write_env(tmp_path / "wrong.env", setup[1], key="not the key")
    (tmp_path / "m").mkdir()
    for extra in ((), ("--foreground",)):
        done = run_cli("mount", "--config", env, "--name", "node1", tmp_path / "m", *extra,
                       timeout=60)
        assert done.returncode == 3, done.stderr
        assert "does not open" in done.stderr
        assert not is_mounted(tmp_path / "m")


def test_background_mount_and_umount(setup: tuple[Path, Path], tmp_path: Path,
                                     sample_node: Path) -> None:
    where = tmp_path / "bg"
    where.mkdir()
    done = run_cli("mount", "--config", setup[0], where, timeout=60)
    assert done.returncode == 0, done.stderr
    try:
        assert os.path.ismount(where)
        pid = int(done.stdout.split("(pid ")[1].split(")")[0])
        assert not pid_gone(pid)
        assert (where / "node1" / "cluster_membership.uuid").read_bytes() == \
            (sample_node / "cluster_membership.uuid").read_bytes()
        gone = run_cli("umount", where)
        assert gone.returncode == 0, gone.stderr
        assert not is_mounted(where)
        wait_for(lambda: pid_gone(pid), "the mount process to exit")
    finally:
        if is_mounted(where):
            subprocess.run(["fusermount3", "-u", "-z", str(where)])
    again = run_cli("umount", where)
    assert again.returncode == 6 and "not mounted" in again.stderr


@pytest.mark.allow_warnings
def test_tampered_pack_fails_that_file_only(setup: tuple[Path, Path], sample_node: Path,
                                            tmp_path: Path) -> None:
    backup_dir = tmp_path / "backup"
    shutil.copytree(setup[1], backup_dir)
    store = Store.open(backup_dir / "node1", KEY)
    gen = store.load_generation(store.list_generations()[-1])
    victim = sorted(str(p.relative_to(sample_node)) for p in sample_node.glob("dataspace_*/*/*.gz")
                    if p.stat().st_size > 1 << 20)[0]
    tamper_file_data(store, gen, victim, at=700_000)
    env = write_env(tmp_path / "t.env", backup_dir)
    with Mount(env, tmp_path / "m") as m:
        with open(m.path / "node1" / victim, "rb") as f:
            assert f.read(65536) == (sample_node / victim).read_bytes()[:65536]
            with pytest.raises(OSError) as info:
                f.read()
            assert info.value.errno == errno.EIO
        for rel, want in source_digest(sample_node).items():
            if want[0] == "f" and rel != victim:
                data = (m.path / "node1" / rel).read_bytes()
                assert hashlib.sha256(data).hexdigest() == want[4], rel
        assert m.proc is not None and m.proc.poll() is None
    assert victim in m.stderr() and "ERROR" in m.stderr()


def test_new_generation_appears(tmp_path: Path) -> None:
    node = make_sample(tmp_path / "node", size="1M", small_files=60)
    (tmp_path / "backup").mkdir()
    env = write_env(tmp_path / "n.env", tmp_path / "backup", directory=node)
    backup_cli(env)
    with Mount(env, tmp_path / "m") as m:
        assert not (m.path / "node1" / "added.txt").exists()
        (node / "added.txt").write_bytes(b"second generation\n")
        time.sleep(max(0.0, 1.05 - time.time() % 1))  # a new second: a new folder name
        backup_cli(env)
        wait_for(lambda: (m.path / "node1" / "added.txt").exists(), "the new generation")
        assert (m.path / "node1" / "added.txt").read_bytes() == b"second generation\n"
        gens = sorted(os.listdir(m.path / ".generations" / "node1"))
        assert len(gens) == 2
        assert not (m.path / ".generations" / "node1" / gens[0] / "added.txt").exists()
        assert (m.path / ".generations" / "node1" / gens[1] / "added.txt").exists()


@pytest.mark.parametrize("how", ["rsync", "scp"])
def test_generation_folders_copy_as_named(how: str, mnt: Path, sample_node: Path,
                                          tmp_path: Path) -> None:
    """rsync and scp read a name with ':' as host:path; a generation folder, named as ls -1
    shows it, copies as named."""
    gens = mnt / ".generations" / "node1"
    (name,) = os.listdir(gens)
    assert ":" not in name
    cmd = {"rsync": ["rsync", "-aS", f"{name}/", str(tmp_path / "copy")],
           "scp": ["scp", "-r", "-p", name, str(tmp_path / "copy")]}[how]
    done = subprocess.run(cmd, cwd=gens, capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    assert mounted_digest(tmp_path / "copy", extents=False) == \
        source_digest(sample_node, extents=False)


def test_mount_at_a_generation_folder_name(tmp_path: Path) -> None:
    node = make_sample(tmp_path / "node", size="1M", small_files=20)
    (tmp_path / "backup").mkdir()
    env = write_env(tmp_path / "n.env", tmp_path / "backup", directory=node)
    backup_cli(env)
    (node / "added.txt").write_bytes(b"second generation\n")
    time.sleep(max(0.0, 1.05 - time.time() % 1))  # a new second: a new folder name
    backup_cli(env)
    with Mount(env, tmp_path / "m") as m:
        first, second = sorted(os.listdir(m.path / ".generations" / "node1"))
    names = sorted(os.listdir(tmp_path / "backup" / "node1" / "generations"))
    for at, shown in ((first, names[0]), (second, names[1]), (names[0], names[0])):
        where = tmp_path / "at"
        where.mkdir(exist_ok=True)
        done = run_cli("mount", "--config", env, where, "--at", at, timeout=60)
        assert done.returncode == 0, done.stderr
        try:
            assert f"node1/ shows generation {format_time(int(shown[:13]))} ({shown}) " \
                f"(--at {at})" in done.stdout
            assert (where / "node1" / "added.txt").exists() == (shown == names[1])
        finally:
            assert run_cli("umount", where).returncode == 0
    done = run_cli("mount", "--config", env, tmp_path / "at", "--at", "2026-02-30T10:00")
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert not is_mounted(tmp_path / "at")


def readme_restore_line(mount_node: Path, target: Path) -> list[str]:
    """The README's "bring back missing segments" command, for this mount and target."""
    (line,) = [line for line in (ROOT / "README.md").read_text().splitlines()
               if line.startswith("rsync ") and "bring back missing segments" in line]
    args = shlex.split(line.split("#")[0])
    assert args[-2:] == ["/mnt/backup/node1/", "/data/humio-data/"], args
    return args[:-2] + [f"{mount_node}/", f"{target}/"]


@pytest.mark.parametrize("own_globaldata", [False, True], ids=["no globaldata", "globaldata"])
def test_readme_restore_line_copies_only_what_the_node_misses(own_globaldata: bool,
                                                              tmp_path: Path) -> None:
    """The README's restore line brings back missing files (also in the node's own
    globaldata/), leaves existing ones alone, and never copies the seed file or a globaldata
    folder the node does not have; so does restore --missing-only."""
    extra = {"globaldata/snapshot.json": b"{}\n"} if own_globaldata else {}
    node = tiny_node(tmp_path / "node", {"dataspace_a/datasource_b/segment_1": b"1" * 5000,
                                         "dataspace_a/datasource_b/segment_2": b"2" * 5000,
                                         **extra})
    (tmp_path / "backup").mkdir()
    env = write_env(tmp_path / "n.env", tmp_path / "backup", directory=node,
                    BOOTSTRAP_HOST_ID="1")
    backup_cli(env)
    want = source_digest(node)
    targets = []
    for how in ("rsync", "restore"):
        target = tmp_path / how
        shutil.copytree(node, target, symlinks=True)
        (target / "dataspace_a/datasource_b/segment_1").unlink()
        if own_globaldata:
            (target / "globaldata/snapshot.json").unlink()
        targets.append(target)
    with Mount(env, tmp_path / "m") as m:
        seed = m.path / "node1" / "globaldata" / f"cluster_membership-1-{UUID}.uuid"
        assert seed.read_text() == UUID
        done = subprocess.run(readme_restore_line(m.path / "node1", targets[0]),
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
    done = run_cli("restore", "-c", env, "--to", targets[1], "--missing-only")
    assert done.returncode == 0, done.stderr
    for target in targets:
        # Folder mtimes aside: restore --missing-only leaves existing folders alone.
        got = source_digest(target)
        assert got.keys() == want.keys(), target
        assert {k: v for k, v in got.items() if v[0] != "d"} == \
            {k: v for k, v in want.items() if v[0] != "d"}, target
        assert not any(p.name.startswith("cluster_membership-") for p in target.rglob("*"))


def test_unmount_while_reading_does_not_hang(setup: tuple[Path, Path], sample_node: Path,
                                             tmp_path: Path) -> None:
    files = [p for p in sample_node.glob("dataspace_*/*/*.gz")]
    stop = threading.Event()
    with Mount(setup[0], tmp_path / "m") as m:
        def reader(seed: int) -> None:
            rng = random.Random(seed)
            while not stop.is_set():
                try:
                    with open(m.path / "node1" / rng.choice(files).relative_to(sample_node),
                              "rb") as f:
                        f.seek(rng.randrange(1 << 16))
                        f.read(1 << 17)
                except OSError:
                    pass  # after the unmount: ENOTCONN, ENOENT or EIO, never a hang

        threads = [threading.Thread(target=reader, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        time.sleep(0.3)  # let the readers get going (not a synchronisation)
        assert m.proc is not None
        m.proc.send_signal(signal.SIGTERM)
        m.proc.wait(timeout=20)
        stop.set()
        for t in threads:
            t.join(20)
        assert not any(t.is_alive() for t in threads)
        assert m.proc.returncode == 0, m.stderr()
        assert not is_mounted(m.path)


def test_help_is_enough_on_its_own() -> None:
    for cmd in ("mount", "umount"):
        done = run_cli(cmd, "--help")
        assert done.returncode == 0
    text = run_cli("mount", "--help").stdout
    for word in ("MOUNTPOINT", ".generations", "--at", "--name", "rsync -aS", "globaldata"):
        assert word in text


def test_name_limits_the_root(setup: tuple[Path, Path], tmp_path: Path) -> None:
    env = write_env(tmp_path / "n.env", setup[1], name=None)
    with Mount(env, tmp_path / "m", "--name", "node1") as m:
        assert sorted(os.listdir(m.path)) == [".generations", "node1"]
    done = run_cli("mount", "--config", env, "--name", "nosuch", tmp_path / "m")
    assert done.returncode == 2, done.stderr


DT_DIR = 4  # d_type of a folder in readdir(3)


def ls_a(folder: Path) -> list[str]:
    """`ls -aU`: every name in readdir order."""
    done = subprocess.run(["ls", "-aU", str(folder)], capture_output=True, text=True, check=True,
                          env={**os.environ, "LC_ALL": "C"})
    return done.stdout.splitlines()


def test_every_folder_lists_dot_and_dotdot(wide: Path) -> None:
    node = wide / "node1"
    gens = wide / ".generations" / "node1"
    (gen,) = os.listdir(gens)
    parents = {wide: wide, node: wide, node / "a" / "b": node / "a",
               node / "globaldata": node, wide / ".generations": wide,
               gens: wide / ".generations", gens / gen: gens, gens / gen / "a": gens / gen}
    for folder, parent in parents.items():
        assert ls_a(folder)[:2] == [".", ".."], folder
        got = readdir(folder)
        assert [name for name, _, _ in got[:2]] == [b".", b".."], folder
        assert sorted(os.fsdecode(n) for n, _, _ in got[2:]) == sorted(os.listdir(folder)), folder
        assert got[0][1] == os.stat(folder).st_ino, folder
        assert got[1][1] == os.stat(parent).st_ino, folder
        assert got[0][2] == got[1][2] == DT_DIR, folder
    assert readdir(wide)[1][1] == os.stat(wide).st_ino == 1  # the root's .. is the root

# Reads a folder with readdir, noting telldir before each entry, then seeks back to each
# position given and reads on to the end from there.
SEEKDIR = r"""
opendir(my $d, $ARGV[0]) or die "opendir: $!";
my (@names, @pos);
while (1) {
    push @pos, telldir($d);
    defined(my $n = readdir($d)) or last;
    push @names, $n;
}
print "all\t", join("/", @names), "\n";
for my $i (@ARGV[1 .. $#ARGV]) {
    seekdir($d, $pos[$i]);
    my @rest;
    while (defined(my $n = readdir($d))) { push @rest, $n; }
    print "$i\t", join("/", @rest), "\n";
}
"""


def test_a_large_folder_lists_every_entry_once(wide: Path) -> None:
    folder = wide / "node1" / "many"
    want = [".", ".."] + [f"f{i:05d}" for i in range(WIDE)]
    count = subprocess.run(f"ls -a '{folder}' | wc -l", shell=True, capture_output=True,
                           text=True, check=True).stdout
    assert int(count) == WIDE + 2
    assert ls_a(folder) == want
    got = readdir(folder)
    assert [name.decode() for name, _, _ in got] == want
    inodes = [ino for _, ino, _ in got[2:]]
    assert len(set(inodes)) == WIDE
    for i in (0, 1234, WIDE - 1):
        assert os.lstat(folder / want[i + 2]).st_ino == inodes[i]
    seeks = [0, 1, 2, 3, 1000, 2501, WIDE, WIDE + 1, WIDE + 2]
    out = subprocess.run(["perl", "-e", SEEKDIR, str(folder), *map(str, seeks)],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    lines = dict(line.split("\t") for line in out)
    assert lines["all"].split("/") == want
    for i in seeks:
        rest = lines[str(i)]
        assert (rest.split("/") if rest else []) == want[i:], i


def test_df_shows_the_backup_size_and_nothing_free(mnt: Path, setup: tuple[Path, Path]) -> None:
    store = Store.open(setup[1] / "node1", KEY)
    stats = store.load_generation(store.list_generations()[-1]).stats
    store.close()
    done = subprocess.run(["df", "--block-size=4096",
                           "--output=size,used,avail,itotal,iused,iavail", str(mnt)],
                          capture_output=True, text=True, check=True)
    size, used, avail, itotal, iused, iavail = map(int, done.stdout.splitlines()[1].split())
    assert size == used == -(-stats["data_bytes"] // 4096) > 0
    inodes = stats["files"] + stats["dirs"] + stats["symlinks"]
    assert inodes < itotal == iused <= inodes + 8
    assert avail == iavail == 0
    vfs = os.statvfs(mnt)
    assert vfs.f_frsize * vfs.f_blocks == size * 4096
    assert vfs.f_bfree == vfs.f_bavail == vfs.f_ffree == vfs.f_favail == 0


# -- a stalled decryption worker ----------------------------------------------------------------

def worker_pid(server: int) -> int:
    """The pid of the mount's decryption worker: the server's only child."""
    with open(f"/proc/{server}/task/{server}/children") as f:
        children = [int(p) for p in f.read().split()]
    assert len(children) == 1, children
    return children[0]


@pytest.fixture(scope="module")
def big_backup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """A backup of a node with one 8 MiB file: (env file, the file, its sha256)."""
    root = tmp_path_factory.mktemp("stall")
    data = os.urandom(8 << 20)
    src = tiny_node(root / "src", {"segment.gz": data})
    backup(create_store(root / "backup" / "node1"), src)
    return (write_env(root / "m.env", root / "backup", name=None), src / "segment.gz",
            hashlib.sha256(data).hexdigest())


def hash_through(path: Path, server: subprocess.Popen[bytes],
                 timeout: float = 30.0) -> str:
    """sha256sum of a file on the mount, in a subprocess. If it does not finish in time, the
    server is killed first: a reader waiting for a request the server has taken cannot die
    before the connection ends."""
    reader = subprocess.Popen(["sha256sum", str(path)], stdout=subprocess.PIPE, text=True)
    try:
        out, _ = reader.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        server.kill()
        reader.kill()
        reader.wait()
        raise AssertionError(f"reading {path} through the mount hung") from None
    assert reader.returncode == 0
    return out.split()[0]


@pytest.mark.allow_warnings
def test_a_stopped_worker_does_not_hang_reads(big_backup: tuple[Path, Path, str],
                                              tmp_path: Path) -> None:
    env, _, want = big_backup
    worker = 0
    try:
        with Mount(env, tmp_path / "m", "--log", str(tmp_path / "mount.log")) as m:
            assert m.proc is not None
            worker = worker_pid(m.proc.pid)
            os.kill(worker, signal.SIGSTOP)
            assert hash_through(m.path / "node1" / "segment.gz", m.proc) == want
            wait_for(lambda: pid_gone(worker), "the stalled worker to be killed")
            # Later reads, in threads, are right too.
            assert hash_through(m.path / "node1" / "segment.gz", m.proc) == want
        log_text = (tmp_path / "mount.log").read_text()
        assert "has answered no job" in log_text and "decrypting in threads" in log_text
    finally:
        if worker and not pid_gone(worker):
            os.kill(worker, signal.SIGKILL)


def test_sigterm_does_not_wait_for_a_stopped_worker(big_backup: tuple[Path, Path, str],
                                                    tmp_path: Path) -> None:
    """SIGTERM while a read waits for a stopped worker detaches the mount at once: it does
    not wait for the worker, nor for the deadline after which reads give up on it (3 s); the
    read then finishes in threads and the process exits once the file is closed."""
    env, _, want = big_backup
    worker = 0
    try:
        with Mount(env, tmp_path / "m") as m:
            assert m.proc is not None
            worker = worker_pid(m.proc.pid)
            os.kill(worker, signal.SIGSTOP)
            reader = subprocess.Popen(["sha256sum", str(m.path / "node1" / "segment.gz")],
                                      stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                      text=True)
            try:
                def waiting_in_fuse() -> bool:
                    """The reader sleeps in the kernel (for the mount's answer)."""
                    with open(f"/proc/{reader.pid}/wchan") as f:
                        wchan = f.read()
                    with open(f"/proc/{reader.pid}/stat") as f:
                        state = f.read().rsplit(")", 1)[1].split()[0]
                    return state in ("S", "D") and wchan not in ("", "0")
                wait_for(waiting_in_fuse, "the read to wait for the mount")
                stop = time.monotonic()
                m.proc.send_signal(signal.SIGTERM)
                wait_for(lambda: not is_mounted(m.path), "the mount to be detached")
                took = time.monotonic() - stop
                out, _ = reader.communicate(timeout=30)
                try:
                    m.proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    m.proc.kill()
                    raise AssertionError("the server did not exit on SIGTERM") from None
            finally:
                if reader.poll() is None:
                    m.proc.kill()       # else the reader could never end (see hash_through)
                    reader.kill()
                reader.wait()
            assert reader.returncode == 0 and out.split()[0] == want
            assert m.proc.returncode == 0, m.stderr()
            assert took < 2.0, took
            wait_for(lambda: pid_gone(worker), "the worker to end with the server")
    finally:
        if worker and not pid_gone(worker):
            os.kill(worker, signal.SIGKILL)


# -- a damaged newest generation: one answer to "which is the latest" ---------------------------

@pytest.mark.allow_warnings
def test_ls_restore_and_mount_agree_on_the_latest_when_the_newest_is_damaged(
        tmp_path: Path) -> None:
    src = tiny_node(tmp_path / "src", {"a.txt": b"one\n"})
    store = create_store(tmp_path / "backup" / "node1")
    older = backup(store, src)
    (src / "a.txt").write_bytes(b"two\n")
    newest = backup(store, src)
    store.close()
    gen_file = tmp_path / "backup" / "node1" / "generations" / newest.name
    data = bytearray(gen_file.read_bytes())
    data[-5] ^= 0x40
    gen_file.write_bytes(bytes(data))
    env = write_env(tmp_path / "n.env", tmp_path / "backup")

    r = run_cli("ls", "-c", env)
    assert r.returncode == 0, r.stderr
    lines = {line.split()[1]: line for line in r.stdout.splitlines()[1:]}
    assert "DAMAGED" in lines[newest.name] and lines[older.name].endswith("(latest)")

    r = run_cli("restore", "-c", env, "--to", tmp_path / "r")
    assert r.returncode == 8, r.stdout + r.stderr
    assert (tmp_path / "r" / "a.txt").read_bytes() == b"one\n"
    assert older.name in r.stdout and newest.name in r.stderr

    log = tmp_path / "mount.log"
    with Mount(env, tmp_path / "m", "--log", str(log)) as m:
        assert (m.path / "node1" / "a.txt").read_bytes() == b"one\n"
    text = log.read_text()
    assert f"shows {format_time(older.time_ms)} ({older.name}), the latest intact" in text
    assert newest.name in text and "damaged" in text

    # Asked for by name, the damaged generation is an error for the mount as for restore.
    r = run_cli("restore", "-c", env, "--to", tmp_path / "r2", "--at", newest.name)
    assert r.returncode == 5, r.stderr
    (tmp_path / "m2").mkdir()
    r = run_cli("mount", "-c", env, tmp_path / "m2", "--at", newest.name, timeout=60)
    assert r.returncode == 5, r.stdout + r.stderr
    last = r.stderr.splitlines()[-1]
    assert last.startswith("humiofs: error: ") and newest.name in last
    assert not os.path.ismount(tmp_path / "m2")



def test_mount_module_leaves_pyfuse3_and_trio_to_the_mount() -> None:
    # The mount command imports them while the key derivation runs (mount_cli._Opening);
    # imported with humiofs.mount.mount they would be back on the path before it starts.
    code = ("import sys, humiofs.cli, humiofs.cli.mount, humiofs.mount.mount; "
            "print(sorted({'pyfuse3', 'trio', 'humiofs.mount.fs', 'humiofs.mount.tree'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout
    assert out.strip() == "[]"


@pytest.mark.allow_warnings
def test_sigterm_while_a_file_is_open_lets_the_reader_finish(big_backup: tuple[Path, Path, str],
                                                             tmp_path: Path) -> None:
    """systemctl stop while a copy runs: the mount is detached at once (nobody new finds it),
    the open file reads to its end, and the process exits once it is closed."""
    env, _, want = big_backup
    with Mount(env, tmp_path / "m") as m:
        assert m.proc is not None
        with open(m.path / "node1" / "segment.gz", "rb") as f:
            digest = hashlib.sha256(f.read(1 << 20))
            m.proc.send_signal(signal.SIGTERM)
            wait_for(lambda: not is_mounted(m.path), "the mount to be detached")
            assert not (m.path / "node1").exists()
            assert m.proc.poll() is None
            while piece := f.read(1 << 20):
                digest.update(piece)
        assert digest.hexdigest() == want
        m.proc.wait(timeout=20)
        assert m.proc.returncode == 0, m.stderr()
        assert "is busy (files are open on it): detached it" in m.stderr()


def test_sigterm_unmounts_cleanly_when_nothing_is_open(setup: tuple[Path, Path],
                                                       tmp_path: Path) -> None:
    with Mount(setup[0], tmp_path / "m") as m:
        assert m.proc is not None
        assert (m.path / "node1" / "cluster_membership.uuid").exists()
        m.proc.send_signal(signal.SIGTERM)
        m.proc.wait(timeout=20)
        assert m.proc.returncode == 0, m.stderr()
        assert not is_mounted(m.path)
        assert "busy" not in m.stderr() and "WARNING" not in m.stderr()
