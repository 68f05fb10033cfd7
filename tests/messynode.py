"""A node with everything a live node's filesystem can hold (issue: every entry is saved, or
explained), a file appended to while a backup runs, and a digest that compares all of it:
types, modes, owners, exact times, contents, holes, xattrs and ACLs, device numbers, and which
names are one inode. Walks by folder fd, so paths longer than PATH_MAX are compared too."""
from __future__ import annotations

import hashlib
import os
import stat
import struct
import threading
from pathlib import Path

from humiofs.backup.scan import data_extents

Y2300_NS = 10_413_792_000 * 10**9 + 123_456_789    # 2300-01-01T00:00:00.123456789Z
Y1901_NS = -2_147_385_600 * 10**9 + 500_000_000    # 1901-12-15T00:00:00.5Z (ext4 keeps it)
LONG_NAME = b"d" * 200
LONG_DEPTH = 25                                    # 25 x 201 bytes: past PATH_MAX (4096)
ODD_NAMES = [b"new\nline", b"\xff\xfe-not-utf8", b"\xff", "emoji-\U0001F600".encode(),
             b" space ", b"-rf", b"*", b"tab\there"]
IS_ROOT = os.geteuid() == 0

# POSIX ACL xattrs in the kernel's binary form (what setfacl writes): version 2, then
# (tag, perm, id) sorted by tag. Tags: user_obj 1, user 2, group_obj 4, mask 0x10, other 0x20.
_NO_ID = 0xFFFFFFFF


def acl(*entries: tuple[int, int, int]) -> bytes:
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)


ACCESS_ACL = acl((1, 6, _NO_ID), (2, 4, 65534), (4, 4, _NO_ID), (0x10, 4, _NO_ID),
                 (0x20, 4, _NO_ID))
DEFAULT_ACL = acl((1, 7, _NO_ID), (2, 5, 65534), (4, 5, _NO_ID), (0x10, 5, _NO_ID),
                  (0x20, 5, _NO_ID))
SELINUX = b"system_u:object_r:var_t:s0\0"


def record(j: int) -> bytes:
    """Record j of the appended file: 4 KiB that say which record they are."""
    return (b"%08d" % j) * 512


def long_path(root: Path) -> list[bytes]:
    """The components of the deepest file of the messy node, relative to root."""
    return [LONG_NAME] * LONG_DEPTH + [b"deep-file"]


def make_messy_node(root: Path) -> Path:
    """A node with hard links, a FIFO, a socket, devices (as root), xattrs, ACLs, SELinux
    labels, odd names, a path longer than PATH_MAX, and times from 1901 to 2300."""
    ds = root / "dataspace_1" / "datasource_1"
    ds2 = root / "dataspace_1" / "datasource_2"
    ds.mkdir(parents=True)
    ds2.mkdir(parents=True)
    (root / "cluster_membership.uuid").write_text("0f8e2c1a-0000-4000-8000-0000000000aa")
    (root / "humiodata.current").symlink_to("dataspace_1/datasource_1/segment_live")
    seg = ds / "segment_hl"
    seg.write_bytes(os.urandom(1_000_000))
    os.link(seg, ds / "segment_hl.second")
    os.link(seg, ds2 / "segment_hl.third")
    sparse = ds / "segment_sparse"
    with open(sparse, "wb") as f:
        f.seek(3 << 20)
        f.write(b"tail")
    os.setxattr(sparse, b"user.humio.kind", b"sparse")
    os.mkfifo(root / "pipe", 0o640)
    os.link(root / "pipe", ds / "pipe.link")
    os.mknod(root / "socket", stat.S_IFSOCK | 0o600)
    if IS_ROOT:
        os.mknod(root / "dev-null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
        os.mknod(root / "dev-loop", stat.S_IFBLK | 0o660, os.makedev(7, 200))
        os.chown(root / "dev-loop", 0, 6)
    # Extended attributes, ACLs and labels.
    x = root / "xattrs"
    x.mkdir()
    f = x / "labelled"
    f.write_bytes(b"labelled\n")
    os.setxattr(f, b"user.bin", bytes(range(256)))
    os.setxattr(f, b"user.empty", b"")
    os.setxattr(f, b"system.posix_acl_access", ACCESS_ACL)
    os.setxattr(x, b"user.folder", b"yes")
    os.setxattr(x, b"system.posix_acl_default", DEFAULT_ACL)
    if IS_ROOT:
        os.setxattr(f, b"trusted.humio", b"t")
        os.setxattr(f, b"security.selinux", SELINUX)
        os.setxattr(root / "humiodata.current", b"security.selinux", SELINUX,
                    follow_symlinks=False)
    # Odd names, in one folder so that their order by raw bytes is tested too.
    odd = root / "odd"
    odd.mkdir()
    for name in ODD_NAMES:
        with open(os.path.join(os.fsencode(odd), name), "wb") as out:
            out.write(name)
    # A path longer than PATH_MAX: only reachable relative to a folder fd.
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for name in long_path(root)[:-1]:
            os.mkdir(name, dir_fd=fd)
            sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = sub
        out_fd = os.open(b"deep-file", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        os.write(out_fd, b"deep\n")
        os.close(out_fd)
    finally:
        os.close(fd)
    # Times the old format could not hold (past 2262), and before 1970.
    far = root / "far-future"
    far.write_bytes(b"2300\n")
    os.utime(far, ns=(Y2300_NS, Y2300_NS))
    old = root / "old-1901"
    old.write_bytes(b"1901\n")
    os.utime(old, ns=(Y1901_NS, Y1901_NS))
    os.utime(x, ns=(Y2300_NS, Y2300_NS))
    return root


class Appender:
    """Appends record(j) to a file every `every_s` seconds on a thread, as a node appends to
    the segment it is writing, until stopped."""

    def __init__(self, path: Path, every_s: float = 0.005, start: int = 0) -> None:
        self.path = path
        self.every_s = every_s
        self.count = start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with open(self.path, "ab", buffering=0) as f:
            while not self._stop.is_set():
                f.write(record(self.count))
                self.count += 1
                self._stop.wait(self.every_s)

    def __enter__(self) -> Appender:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def is_record_prefix(data: bytes) -> bool:
    """True if `data` is a prefix of record(0) + record(1) + ... (a consistent prefix)."""
    n = -(-len(data) // 4096)
    return data == b"".join(record(j) for j in range(n))[:len(data)]


Digest = dict[bytes, tuple[object, ...]]


def digest(root: Path, skip: tuple[bytes, ...] = (), xattrs: bool = True,
           extents: bool = True) -> tuple[Digest, set[frozenset[bytes]]]:
    """(per relative path: everything restore and the mount must give back; the sets of
    paths that are names of one inode). Top-level names in `skip` are left out."""
    out: Digest = {}
    inodes: dict[int, list[bytes]] = {}
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    _walk(fd, b"", out, inodes, skip, xattrs, extents)
    links = {frozenset(names) for names in inodes.values() if len(names) > 1}
    return out, links


def _walk(dfd: int, rel: bytes, out: Digest, inodes: dict[int, list[bytes]],
          skip: tuple[bytes, ...], with_xattrs: bool, extents: bool) -> None:
    try:
        for name in sorted(os.fsencode(n) for n in os.listdir(dfd)):
            path = rel + b"/" + name if rel else name
            if not rel and name in skip:
                continue
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            kind = stat.S_IFMT(st.st_mode)
            xs: tuple[tuple[bytes, bytes], ...] = ()
            if with_xattrs:
                at = b"/proc/self/fd/%d/%s" % (dfd, name)
                xs = tuple(sorted((os.fsencode(n), os.getxattr(at, n, follow_symlinks=False))
                                  for n in os.listxattr(at, follow_symlinks=False)))
            common = (kind, st.st_mode & 0o7777, st.st_uid, st.st_gid, st.st_mtime_ns, xs)
            if kind == stat.S_IFDIR:
                out[path] = common + (st.st_nlink,)
                sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dfd)
                _walk(sub, path, out, inodes, skip, with_xattrs, extents)
                continue
            if kind != stat.S_IFLNK:
                inodes.setdefault(st.st_ino, []).append(path)
            if kind == stat.S_IFREG:
                f = os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=dfd)
                try:
                    h = hashlib.sha256()
                    while block := os.read(f, 1 << 20):
                        h.update(block)
                    ext = tuple(data_extents(f, st.st_size)) if extents else ()
                finally:
                    os.close(f)
                out[path] = common + (st.st_nlink, st.st_size, h.hexdigest(), ext)
            elif kind == stat.S_IFLNK:
                out[path] = common + (os.readlink(name, dir_fd=dfd),)
            else:
                out[path] = common + (st.st_nlink, st.st_rdev)
    finally:
        os.close(dfd)
