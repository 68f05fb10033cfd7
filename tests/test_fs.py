"""The FUSE adapter without a mount: Operations methods awaited directly under pytest-trio."""
from __future__ import annotations

import errno
import logging
import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyfuse3
import pytest
from conftest import KEY
from mountutil import backup, create_store, tamper_file_data, tiny_node

from humiofs.mount import fs, tree
from humiofs.store.format import Generation
from humiofs.store.repository import Store

CTX: Any = object()  # the handlers never look at the request context
BIG = 3 * 65536 + 123


@pytest.fixture(scope="module")
def backed_up(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Store, Generation]:
    root = tmp_path_factory.mktemp("fs")
    src = tiny_node(root / "src", {
        "big.bin": os.urandom(BIG),
        "dir/inner.txt": b"inner\n",
        "names/ü plain.txt": b"utf-8 name",
    })
    os.symlink("dir/inner.txt", src / "link")
    bad_name = os.fsencode(src / "names") + b"/raw-\xfe\xff"
    with open(bad_name, "wb") as f:
        f.write(b"raw bytes name")
    store = create_store(root / "backup" / "node1")
    gen = backup(store, src)
    return root / "backup", src, store, gen


@pytest.fixture
def ops(backed_up: tuple[Path, Path, Store, Generation]) -> Iterator[fs.Operations]:
    model = tree.Tree.from_backup_dir(backed_up[0], KEY)
    yield fs.Operations(model)
    model.close()


@pytest.fixture
def replies(monkeypatch: pytest.MonkeyPatch) -> list[tuple[bytes, pyfuse3.EntryAttributes, int]]:
    """Stands in for pyfuse3.readdir_reply, which needs a kernel request: records the entries
    and takes at most 3 per readdir call (per token: pass a new object() to each call), as a
    small kernel buffer would."""
    got: list[tuple[bytes, pyfuse3.EntryAttributes, int]] = []
    taken: dict[object, int] = {}

    def reply(token: Any, name: bytes, attr: pyfuse3.EntryAttributes, next_id: int) -> bool:
        if taken.setdefault(token, 0) == 3:
            return False
        taken[token] += 1
        got.append((name, attr, next_id))
        return True

    monkeypatch.setattr(pyfuse3, "readdir_reply", reply)
    return got


async def lookup(ops: fs.Operations, path: bytes) -> pyfuse3.EntryAttributes:
    inode = pyfuse3.ROOT_INODE
    attr = await ops.getattr(inode, CTX)
    for name in path.split(b"/"):
        attr = await ops.lookup(attr.st_ino, name, CTX)
    return attr


async def listdir(ops: fs.Operations, inode: int,
                  replies: list[tuple[bytes, pyfuse3.EntryAttributes, int]]) -> list[bytes]:
    replies.clear()
    fh = await ops.opendir(inode, CTX)
    start = 0
    while True:
        before = len(replies)
        await ops.readdir(fh, start, object())  # type: ignore[arg-type]
        if len(replies) == before:
            break
        start = replies[-1][2]
    await ops.releasedir(fh)
    return [name for name, _, _ in replies]


async def read_file(ops: fs.Operations, inode: int, step: int = 131072) -> bytes:
    info = await ops.open(inode, os.O_RDONLY, CTX)
    out = bytearray()
    while piece := await ops.read(info.fh, len(out), step):
        out += piece
    await ops.release(info.fh)
    return bytes(out)


async def test_lookup_getattr_and_timeouts(ops: fs.Operations,
                                           backed_up: tuple[Path, Path, Store, Generation]) -> None:
    src = backed_up[1]
    node = await lookup(ops, b"node1")
    assert stat.S_ISDIR(node.st_mode)
    assert node.entry_timeout == fs.VOLATILE_TIMEOUT  # NAME/ follows new backups
    assert node.attr_timeout == fs.STABLE_TIMEOUT  # but this inode never changes
    big = await ops.lookup(node.st_ino, b"big.bin", CTX)
    st = (src / "big.bin").stat()
    assert big.st_size == BIG and big.st_mtime_ns == st.st_mtime_ns
    assert big.st_mode == st.st_mode and big.st_blocks == -(-BIG // 4096) * 8
    assert big.entry_timeout == big.attr_timeout == fs.STABLE_TIMEOUT
    assert (await ops.getattr(big.st_ino, CTX)).st_size == BIG
    assert (await ops.lookup(node.st_ino, b".", CTX)).st_ino == node.st_ino
    assert (await ops.lookup(node.st_ino, b"..", CTX)).st_ino == pyfuse3.ROOT_INODE
    root = await ops.getattr(pyfuse3.ROOT_INODE, CTX)
    assert root.attr_timeout == fs.VOLATILE_TIMEOUT


async def test_not_found(ops: fs.Operations) -> None:
    node = await lookup(ops, b"node1")
    for inode, name in ((node.st_ino, b"missing"), (pyfuse3.ROOT_INODE, b"node2")):
        with pytest.raises(pyfuse3.FUSEError) as info:
            await ops.lookup(inode, name, CTX)
        assert info.value.errno == errno.ENOENT
    with pytest.raises(pyfuse3.FUSEError) as info:
        await ops.getattr(10 ** 12, CTX)  # type: ignore[arg-type]
    assert info.value.errno == errno.ENOENT


async def test_readdir_resumes_and_names_are_bytes(
        ops: fs.Operations, replies: list[tuple[bytes, pyfuse3.EntryAttributes, int]]) -> None:
    root = await listdir(ops, pyfuse3.ROOT_INODE, replies)
    assert root == [b".", b"..", b".generations", b"node1"]
    node = await lookup(ops, b"node1")
    names = await listdir(ops, node.st_ino, replies)
    assert names == sorted(names) and len(set(names)) == len(names)
    assert names == [b".", b"..", b"big.bin", b"cluster_membership.uuid", b"dir", b"globaldata",
                     b"link", b"names"]
    attrs = {name: attr for name, attr, _ in replies}
    assert stat.S_ISLNK(attrs[b"link"].st_mode)
    folder = await lookup(ops, b"node1/names")
    raw = await listdir(ops, folder.st_ino, replies)
    assert raw[:2] == [b".", b".."]
    assert b"raw-\xfe\xff" in raw and all(isinstance(n, bytes) for n in raw)
    f = await ops.lookup(folder.st_ino, b"raw-\xfe\xff", CTX)
    assert await read_file(ops, f.st_ino) == b"raw bytes name"


async def test_dot_and_dotdot_lead_every_listing(
        ops: fs.Operations, replies: list[tuple[bytes, pyfuse3.EntryAttributes, int]]) -> None:
    """`.` is the folder and `..` its parent (the root's is the root), both folders; and a
    listing read on from any entry's cookie, as seekdir does, gives exactly the entries after
    that one."""
    (gen,) = [n for n in await listdir(ops, (await lookup(ops, b".generations/node1")).st_ino,
                                       replies) if n not in (b".", b"..")]
    paths = [b"", b"node1", b"node1/dir", b"node1/globaldata", b".generations",
             b".generations/node1", b".generations/node1/" + gen]
    for path in paths:
        this = await lookup(ops, path) if path else await ops.getattr(pyfuse3.ROOT_INODE, CTX)
        up = await lookup(ops, path.rpartition(b"/")[0]) if b"/" in path else \
            await ops.getattr(pyfuse3.ROOT_INODE, CTX)
        names = await listdir(ops, this.st_ino, replies)
        assert names[:2] == [b".", b".."], path
        (_, dot, _), (_, dotdot, _) = replies[:2]
        assert (dot.st_ino, dotdot.st_ino) == (this.st_ino, up.st_ino), path
        assert stat.S_ISDIR(dot.st_mode) and stat.S_ISDIR(dotdot.st_mode), path
        cookies = [0] + [next_id for _, _, next_id in replies]
        fh = await ops.opendir(this.st_ino, CTX)
        for i, cookie in enumerate(cookies):
            replies.clear()
            await ops.readdir(fh, cookie, object())  # type: ignore[arg-type]
            assert [n for n, _, _ in replies] == names[i:i + 3], (path, i)
        await ops.releasedir(fh)
    root = await ops.getattr(pyfuse3.ROOT_INODE, CTX)
    assert root.st_ino == pyfuse3.ROOT_INODE


async def test_read_and_readlink(ops: fs.Operations,
                                 backed_up: tuple[Path, Path, Store, Generation]) -> None:
    src = backed_up[1]
    big = await lookup(ops, b"node1/big.bin")
    assert await read_file(ops, big.st_ino) == (src / "big.bin").read_bytes()
    assert await read_file(ops, big.st_ino, step=65537) == (src / "big.bin").read_bytes()
    info = await ops.open(big.st_ino, os.O_RDONLY, CTX)
    assert info.keep_cache
    assert bytes(await ops.read(info.fh, BIG - 10, 4096)) == (src / "big.bin").read_bytes()[-10:]
    assert await ops.read(info.fh, BIG + 5, 4096) == b""
    await ops.release(info.fh)
    link = await lookup(ops, b"node1/link")
    assert await ops.readlink(link.st_ino, CTX) == b"dir/inner.txt"
    with pytest.raises(pyfuse3.FUSEError) as e:
        await ops.readlink(big.st_ino, CTX)
    assert e.value.errno == errno.EINVAL
    node = await lookup(ops, b"node1")
    with pytest.raises(pyfuse3.FUSEError) as e:
        await ops.open(node.st_ino, os.O_RDONLY, CTX)
    assert e.value.errno == errno.EISDIR
    with pytest.raises(pyfuse3.FUSEError) as e:
        await ops.opendir(big.st_ino, CTX)
    assert e.value.errno == errno.ENOTDIR
    with pytest.raises(pyfuse3.FUSEError) as e:
        await ops.read(999999, 0, 10)  # type: ignore[arg-type]
    assert e.value.errno == errno.EBADF


async def test_everything_that_writes_is_erofs(ops: fs.Operations) -> None:
    node = await lookup(ops, b"node1")
    big = await ops.lookup(node.st_ino, b"big.bin", CTX)
    n, b, root = node.st_ino, big.st_ino, pyfuse3.ROOT_INODE
    calls = [
        ops.setattr(b, big, pyfuse3.SetattrFields(), None, CTX),
        ops.mknod(n, b"x", 0o644, 0, CTX), ops.mkdir(n, b"x", 0o755, CTX),
        ops.mkdir(root, b"x", 0o755, CTX), ops.unlink(n, b"big.bin", CTX),
        ops.rmdir(n, b"dir", CTX), ops.symlink(n, b"x", b"y", CTX),
        ops.rename(n, b"big.bin", n, b"x", 0, CTX), ops.link(b, n, b"x", CTX),
        ops.create(n, b"x", 0o644, os.O_WRONLY, CTX), ops.write(1, 0, b"x"),
        ops.setxattr(b, b"user.x", b"1", CTX), ops.removexattr(b, b"user.x", CTX),
    ]
    for flags in (os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC, os.O_WRONLY | os.O_APPEND):
        calls.append(ops.open(b, flags, CTX))
    for call in calls:
        with pytest.raises(pyfuse3.FUSEError) as info:
            await call  # type: ignore[misc]
        assert info.value.errno == errno.EROFS


@pytest.mark.allow_warnings
async def test_damaged_data_is_eio_and_logged(backed_up: tuple[Path, Path, Store, Generation],
                                              tmp_path: Path,
                                              caplog: pytest.LogCaptureFixture) -> None:
    backup_dir = tmp_path / "backup"
    shutil.copytree(backed_up[0], backup_dir)
    tamper_file_data(Store.open(backup_dir / "node1", KEY), backed_up[3], "big.bin",
                     at=2 * 65536 + 50)
    model = tree.Tree.from_backup_dir(backup_dir, KEY)
    ops = fs.Operations(model)
    big = await lookup(ops, b"node1/big.bin")
    info = await ops.open(big.st_ino, os.O_RDONLY, CTX)
    assert bytes(await ops.read(info.fh, 0, 4096)) == (backed_up[1] / "big.bin").read_bytes()[:4096]
    with pytest.raises(pyfuse3.FUSEError) as e:
        await ops.read(info.fh, 2 * 65536, 4096)
    assert e.value.errno == errno.EIO
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert errors and "node1/big.bin" in errors[-1].getMessage()
    assert f"offset {2 * 65536}" in errors[-1].getMessage()
    inner = await lookup(ops, b"node1/dir/inner.txt")
    assert await read_file(ops, inner.st_ino) == b"inner\n"


@pytest.mark.allow_warnings
async def test_a_bug_in_the_model_is_eio_not_a_dead_mount(
        ops: fs.Operations, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    def broken(*args: object, **kw: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(ops.tree, "getattr", broken)
    with pytest.raises(pyfuse3.FUSEError) as e:
        await ops.getattr(pyfuse3.ROOT_INODE, CTX)
    assert e.value.errno == errno.EIO
    assert "internal error in getattr" in caplog.text


async def test_statfs_and_forget(ops: fs.Operations,
                                 backed_up: tuple[Path, Path, Store, Generation]) -> None:
    stats = backed_up[3].stats
    s = await ops.statfs(CTX)
    assert s.f_namemax == 255 and s.f_frsize == 4096
    assert s.f_blocks == -(-stats["data_bytes"] // 4096) > 0
    assert stats["files"] + stats["dirs"] + stats["symlinks"] < s.f_files
    assert s.f_bfree == s.f_bavail == s.f_ffree == s.f_favail == 0
    big = await lookup(ops, b"node1/big.bin")
    await ops.forget([(big.st_ino, 1)])
    assert (await ops.getattr(big.st_ino, CTX)).st_size == BIG


async def test_replies_are_cached_bounded_and_equal_to_fresh_ones(
        ops: fs.Operations, replies: list[tuple[bytes, pyfuse3.EntryAttributes, int]],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """readdir hands out the replies built with the listing (off the request loop): the same
    as getattr's, field by field; getattr's own cache stays bounded."""
    monkeypatch.setattr(fs, "ATTR_CACHE", 3)
    names = await listdir(ops, (await lookup(ops, b"node1")).st_ino, replies)
    assert len(names) > 5
    fields = ("st_ino", "generation", "entry_timeout", "attr_timeout", "st_mode", "st_nlink",
              "st_uid", "st_gid", "st_rdev", "st_size", "st_blksize", "st_blocks",
              "st_atime_ns", "st_ctime_ns", "st_mtime_ns")
    first = {name: [getattr(a, f) for f in fields] for name, a, _ in replies}
    fresh = fs.Operations(ops.tree)
    for name, a, _ in replies:
        if name not in (b".", b".."):
            again = await fresh.getattr(a.st_ino, CTX)
            assert [getattr(again, f) for f in fields] == first[name], name
            assert 0 < len(fresh._replies) <= 3
    assert first[b"big.bin"][fields.index("entry_timeout")] == fs.STABLE_TIMEOUT