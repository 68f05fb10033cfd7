"""The mount's model without FUSE: lookups, attributes, listings, reads against the source bytes,
the seed file, earlier generations, damaged store data and bounded memory."""
from __future__ import annotations

import errno
import hashlib
import os
import random
import shutil
import signal
import socket
import stat
from pathlib import Path

import pytest
import storetools
import trio
from conftest import KEY, make_sample
from mountutil import (
    backup,
    create_store,
    entries,
    listdir,
    read_all,
    resolve,
    tamper_file_data,
    tiny_node,
    wait_for,
)

from humiofs.backup.scan import data_extents
from humiofs.errors import NoSuchStore, WrongKey
from humiofs.mount import attrs, decryptd, inodes, listing, prefetch, reader, tree
from humiofs.store.crypto import CHUNK, STORED_CHUNK
from humiofs.store import crypto
from humiofs.store.format import FileRow, Generation, decode_tree, decode_tree_rows
from humiofs.store.generations import At, parse_at
from humiofs.store.repository import Store

NODE = b"node1"


@pytest.fixture(scope="module")
def backed_up(tmp_path_factory: pytest.TempPathFactory,
              sample_node: Path) -> tuple[Path, Store, Generation]:
    """BACKUP_DIR with one store, node1, holding one generation of the sample node."""
    backup_dir = tmp_path_factory.mktemp("tree") / "backup"
    store = create_store(backup_dir / "node1")
    gen = backup(store, sample_node)
    return backup_dir, store, gen


@pytest.fixture
def model(backed_up: tuple[Path, Store, Generation]) -> tree.Tree:
    m = tree.Tree.from_backup_dir(backed_up[0], KEY)
    yield m
    m.close()


def source_files(root: Path) -> list[str]:
    out = []
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            rel = os.path.relpath(os.path.join(dirpath, name), root)
            if not rel.startswith("jvm-tmp") and not os.path.islink(os.path.join(root, rel)):
                out.append(rel)
    return sorted(out)


def test_root_lists_stores_and_generations(model: tree.Tree,
                                           backed_up: tuple[Path, Store, Generation]) -> None:
    gen = backed_up[2]
    root = listdir(model, tree.ROOT_INODE)
    assert list(root) == [b".generations", NODE]
    assert all(stat.S_ISDIR(a.mode) and a.volatile for n, a in root.items() if n != NODE)
    node = root[NODE]
    assert not node.volatile
    assert node.mode == stat.S_IFDIR | gen.root.mode and node.mtime_ns == gen.root.mtime_ns
    assert list(listdir(model, root[b".generations"].inode)) == [NODE]
    gens = listdir(model, resolve(model, b".generations/node1").inode)
    assert [n.decode() for n in gens] == [folder_time(gen.time_ms)]
    earlier = next(iter(gens.values()))
    assert earlier.inode != node.inode
    assert listdir(model, earlier.inode).keys() == listdir(model, node.inode).keys()


def folder_time(ms: int, with_ms: bool = True) -> str:
    from humiofs.store.generations import folder_time as fmt
    return fmt(ms, with_ms)


async def test_tree_matches_source(model: tree.Tree, sample_node: Path) -> None:
    """Every entry's type, mode, mtime, size, target and st_blocks, and every file's bytes."""
    seen = set()
    for dirpath, dirnames, filenames in os.walk(sample_node):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(sample_node))
            if rel == "jvm-tmp" or rel.startswith("jvm-tmp/"):
                continue
            seen.add(rel)
            a = resolve(model, NODE + b"/" + os.fsencode(rel))
            st = p.lstat()
            assert stat.S_IFMT(a.mode) == stat.S_IFMT(st.st_mode), rel
            assert a.mode & 0o7777 == st.st_mode & 0o7777, rel
            assert a.mtime_ns == st.st_mtime_ns, rel
            if p.is_symlink():
                assert model.readlink(a.inode) == os.fsencode(os.readlink(p))
                assert a.size == len(os.readlink(p))
            elif p.is_file():
                assert a.size == st.st_size, rel
                with open(p, "rb") as f:
                    data = sum(n for _, n in data_extents(f.fileno(), st.st_size))
                assert a.blocks == -(-data // 4096) * 8, rel
                assert hashlib.sha256(await read_all(model, a.inode)).digest() == \
                    hashlib.sha256(p.read_bytes()).digest(), rel
            else:
                # 2 + subfolders, as on the source's ext4
                assert a.nlink == st.st_nlink, rel
    listed = set()
    todo = [(b"", resolve(model, NODE).inode)]
    while todo:
        prefix, inode = todo.pop()
        for name, a in listdir(model, inode).items():
            rel = prefix + name
            if rel != b"globaldata":
                listed.add(os.fsdecode(rel))
                if stat.S_ISDIR(a.mode):
                    todo.append((rel + b"/", a.inode))
    assert listed == seen


async def test_reads_at_odd_offsets(model: tree.Tree, sample_node: Path) -> None:
    """Reads across extents, holes and chunk boundaries give exactly the source's bytes."""
    rng = random.Random(3)
    files = [rel for rel in source_files(sample_node)
             if (sample_node / rel).stat().st_size > 3 * CHUNK]
    assert any(rel.endswith(".gz.tmp") for rel in files)
    for rel in files:
        path = sample_node / rel
        size = path.stat().st_size
        a = resolve(model, NODE + b"/" + os.fsencode(rel))
        fh = model.open(a.inode)
        try:
            with open(path, "rb") as f:
                extents = data_extents(f.fileno(), size)
                points = [0, CHUNK - 1, CHUNK, CHUNK + 1, size - 1, size]
                for off, n in extents:
                    points += [off - 1, off, off + 1, off + n - 1, off + n, off + n + CHUNK]
                points += [rng.randrange(size) for _ in range(20)]
                for start in points:
                    if not 0 <= start <= size:
                        continue
                    for length in (1, 4095, CHUNK + 17, 3 * CHUNK + 5, 1 << 20):
                        got = bytes(await model.read(fh, start, length))
                        assert got == os.pread(f.fileno(), length, start), (rel, start, length)
        finally:
            model.release(fh)


async def test_holes_read_without_the_store(model: tree.Tree, sample_node: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """An all-hole file reads as zeros with the store unreadable."""
    rel = next(r for r in source_files(sample_node)
               if (sample_node / r).stat().st_blocks == 0 and (sample_node / r).stat().st_size)
    a = resolve(model, NODE + b"/" + os.fsencode(rel))

    def broken(*args: object, **kw: object) -> None:
        raise AssertionError("the store was read for a hole")

    monkeypatch.setattr(Store, "read_chunks_into", broken)
    fh = model.open(a.inode)
    assert bytes(await model.read(fh, 12345, 1 << 20)) == bytes(1 << 20)
    model.release(fh)


async def test_seed_file(model: tree.Tree, sample_node: Path,
                   backed_up: tuple[Path, Store, Generation]) -> None:
    gen = backed_up[2]
    assert gen.identity is not None
    uuid = (sample_node / "cluster_membership.uuid").read_bytes()
    folder = listdir(model, resolve(model, NODE + b"/globaldata").inode)
    name = f"cluster_membership-1-{uuid.decode()}.uuid".encode()
    assert list(folder) == [name]
    a = folder[name]
    assert a.size == len(uuid) and a.blocks == 8 and stat.S_ISREG(a.mode)
    assert await read_all(model, a.inode) == uuid
    assert model.lookup(resolve(model, NODE + b"/globaldata").inode, name) == a


@pytest.mark.allow_warnings
def test_no_seed_without_identity(tmp_path: Path) -> None:
    other = tmp_path / "src2"
    other.mkdir()
    (other / "file").write_bytes(b"y")
    backup(create_store(tmp_path / "backup" / "b"), other)  # no uuid: no identity
    m = tree.Tree.from_backup_dir(tmp_path / "backup", KEY)
    assert list(listdir(m, resolve(m, b"b").inode)) == [b"file"]


UUID = "0b5a6c1e-8d3f-4c2a-9e71-2f6d8a9b0c13"
SEED = f"cluster_membership-1-{UUID}.uuid".encode()


async def test_seed_joins_the_nodes_own_globaldata(tmp_path: Path) -> None:
    """The node's own globaldata folder shows the seed file too; if the node has a file of
    that very name, it is shown instead (the real one wins)."""
    src = tiny_node(tmp_path / "src", {"globaldata/a-real-file": b"x",
                                       "globaldata/zz/nested": b"y"})
    store = create_store(tmp_path / "backup" / "a")
    first = backup(store, src)
    (src / "globaldata" / SEED.decode()).write_bytes(b"the node's own\n")
    backup(store, src)
    m = tree.Tree.from_backup_dir(tmp_path / "backup", KEY, at=At.from_ms(first.time_ms))
    folder = resolve(m, b"a/globaldata")
    listed = listdir(m, folder.inode)
    assert list(listed) == [b"a-real-file", SEED, b"zz"]
    assert await read_all(m, listed[SEED].inode) == UUID.encode()
    assert listed[SEED].size == len(UUID) and listed[SEED].blocks == 8
    assert await read_all(m, listed[b"a-real-file"].inode) == b"x"
    assert m.lookup(folder.inode, SEED) == listed[SEED]
    assert folder.nlink == 3
    m.close()
    m = tree.Tree.from_backup_dir(tmp_path / "backup", KEY)
    listed = listdir(m, resolve(m, b"a/globaldata").inode)
    assert list(listed) == [b"a-real-file", SEED, b"zz"]
    assert await read_all(m, listed[SEED].inode) == b"the node's own\n"
    for gen_folder in listdir(m, resolve(m, b".generations/a").inode):
        assert SEED in listdir(m, resolve(m, b".generations/a/" + gen_folder +
                                          b"/globaldata").inode)
    m.close()


@pytest.fixture
def two_generations(tmp_path: Path) -> tuple[Path, Path, Generation, Generation]:
    src = make_sample(tmp_path / "node", size="1M", small_files=60)
    store = create_store(tmp_path / "backup" / "node1")
    first = backup(store, src)
    (src / "added.txt").write_bytes(b"new in the second generation\n")
    (src / "cluster_membership.uuid").write_bytes(b"b1e5f0a2-6c3d-4e7f-8a9b-0c1d2e3f4a5b")
    second = backup(store, src)
    return tmp_path / "backup", src, first, second


@pytest.mark.allow_warnings
async def test_earlier_generations(
        two_generations: tuple[Path, Path, Generation, Generation]) -> None:
    backup_dir, src, first, second = two_generations
    m = tree.Tree.from_backup_dir(backup_dir, KEY)
    assert b"added.txt" in listdir(m, resolve(m, NODE).inode)
    names = list(listdir(m, resolve(m, b".generations/node1").inode))
    assert names == [folder_time(first.time_ms).encode(), folder_time(second.time_ms).encode()]
    old = b".generations/node1/" + names[0]
    assert b"added.txt" not in listdir(m, resolve(m, old).inode)
    assert await read_all(m, resolve(m, old + b"/cluster_membership.uuid").inode) != \
        await read_all(m, resolve(m, b"node1/cluster_membership.uuid").inode)
    seeds = listdir(m, resolve(m, old + b"/globaldata").inode)
    assert first.identity is not None and list(seeds) == [first.identity.seed_name]
    pinned = tree.Tree.from_backup_dir(backup_dir, KEY, at=At.from_ms(first.time_ms + 1))
    assert b"added.txt" not in listdir(pinned, resolve(pinned, NODE).inode)
    with pytest.raises(Exception, match="at or before"):
        tree.Tree.from_backup_dir(backup_dir, KEY, at=At.from_ms(first.time_ms - 1))


def test_generation_folders_have_no_colon_sort_by_time_and_work_with_at(
        two_generations: tuple[Path, Path, Generation, Generation]) -> None:
    backup_dir, _, first, second = two_generations
    m = tree.Tree.from_backup_dir(backup_dir, KEY)
    names = list(listdir(m, resolve(m, b".generations/node1").inode))
    assert len(names) == 2 and names == sorted(names)
    assert all(b":" not in n for n in names)
    for name, gen in zip(names, (first, second)):
        pinned = tree.Tree.from_backup_dir(backup_dir, KEY, at=parse_at(name.decode()))
        assert pinned.shown() == [("node1", gen)]
        pinned.close()
    m.close()


def test_generations_within_one_second_get_folders_of_their_own(tmp_path: Path) -> None:
    store = create_store(tmp_path / "backup" / "node1")
    src = tiny_node(tmp_path / "src", {})
    (a, _), (b, _) = storetools.backups_within_one_second(store, src)
    m = tree.Tree.from_backup_dir(tmp_path / "backup", KEY)
    gens = listdir(m, resolve(m, b".generations/node1").inode)
    assert list(gens) == [folder_time(a.time_ms, True).encode(),
                          folder_time(b.time_ms, True).encode()]
    assert listdir(m, gens[folder_time(a.time_ms, True).encode()].inode).keys() != \
        listdir(m, gens[folder_time(b.time_ms, True).encode()].inode).keys()
    for name, gen in zip(gens, (a, b)):
        pinned = tree.Tree.from_backup_dir(tmp_path / "backup", KEY, at=parse_at(name.decode()))
        assert pinned.shown() == [("node1", gen)]
        pinned.close()
    # The second, as ls and the old folder names wrote it, covers both: the later one.
    second = tree.Tree.from_backup_dir(tmp_path / "backup", KEY,
                                       at=parse_at(folder_time(a.time_ms, False)))
    assert second.shown() == [("node1", b)]
    second.close()
    m.close()
    # A name, once shown, never changes: not when its same-second sibling is pruned either.
    os.unlink(store.path / "generations" / a.name)
    m = tree.Tree.from_backup_dir(tmp_path / "backup", KEY)
    assert list(listdir(m, resolve(m, b".generations/node1").inode)) == [
        folder_time(b.time_ms).encode()]
    m.close()


def test_statfs_counts_what_name_shows(model: tree.Tree, sample_node: Path) -> None:
    """The bytes are the source's file data (holes left out), the inodes its entries plus the
    few synthetic ones."""
    data = entries = 0
    for dirpath, dirnames, filenames in os.walk(sample_node):
        dirnames[:] = [d for d in dirnames if d != "jvm-tmp"]
        entries += len(dirnames) + len(filenames)
        for name in filenames:
            p = Path(dirpath) / name
            if not p.is_symlink():
                with open(p, "rb") as f:
                    data += sum(n for _, n in data_extents(f.fileno(), p.stat().st_size))
    data_bytes, inodes = model.statfs()
    assert data_bytes == data
    assert entries < inodes <= entries + 8


def test_statfs_follows_the_shown_generation(
        two_generations: tuple[Path, Path, Generation, Generation],
        monkeypatch: pytest.MonkeyPatch) -> None:
    backup_dir, _, first, second = two_generations
    latest = tree.Tree.from_backup_dir(backup_dir, KEY)
    pinned = tree.Tree.from_backup_dir(backup_dir, KEY, at=At.from_ms(first.time_ms))
    assert latest.statfs(block=False)[0] == second.stats["data_bytes"]
    assert pinned.statfs(block=False)[0] == first.stats["data_bytes"]
    assert latest.statfs()[1] == pinned.statfs()[1] + 1  # added.txt
    monkeypatch.setattr(tree, "REFRESH_S", 0.0)
    with pytest.raises(tree.WouldBlock):  # a stale list of generations is store I/O
        latest.statfs(block=False)
    assert latest.statfs()[0] == second.stats["data_bytes"]


async def test_new_generation_keeps_unchanged_files_inodes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An unchanged file keeps its number in a new generation, a changed one gets a new one
    (and what the kernel knows by the old number stays valid), folders get new ones."""
    src = tiny_node(tmp_path / "src", {"a": b"one", "c": b"three", "d/e": b"four"})
    store = create_store(tmp_path / "backup" / "node1")
    backup(store, src)
    m = tree.Tree.from_backup_dir(tmp_path / "backup", KEY)
    before = {rel: resolve(m, b"/".join([NODE, rel]).rstrip(b"/"))
              for rel in (b"a", b"c", b"d", b"d/e", b"")}
    (src / "b").write_bytes(b"two")
    (src / "c").write_bytes(b"THREE")
    backup(store, src)
    assert b"b" not in listdir(m, resolve(m, NODE).inode)  # not re-read within REFRESH_S
    monkeypatch.setattr(tree, "REFRESH_S", 0.0)
    assert {b"a", b"b"} <= set(listdir(m, resolve(m, NODE).inode))
    assert resolve(m, b"node1/a") == before[b"a"]
    assert resolve(m, b"node1/d/e") == before[b"d/e"]
    assert resolve(m, b"node1/c").inode != before[b"c"].inode
    assert resolve(m, b"node1/d").inode != before[b"d"].inode
    assert resolve(m, b"node1").inode != before[b""].inode
    assert await read_all(m, before[b"c"].inode) == b"three"  # the kernel's old number
    assert m.getattr(before[b"c"].inode) == before[b"c"]
    assert len(listdir(m, resolve(m, b".generations/node1").inode)) == 2
    # A new mount numbers them alike; .generations/NAME/TIME/ has numbers of its own.
    again = tree.Tree.from_backup_dir(tmp_path / "backup", KEY)
    assert resolve(again, b"node1/a") == before[b"a"]
    assert resolve(again, b"node1/c") == resolve(m, b"node1/c")
    old = b".generations/node1/" + sorted(listdir(m, resolve(m, b".generations/node1").inode))[0]
    assert resolve(m, old + b"/a").inode != before[b"a"].inode
    assert await read_all(m, resolve(m, old + b"/c").inode) == b"three"
    m.close()
    again.close()


@pytest.mark.allow_warnings
async def test_damaged_file_fails_alone(backed_up: tuple[Path, Store, Generation], tmp_path: Path,
                                  sample_node: Path) -> None:
    backup_dir = tmp_path / "backup"
    shutil.copytree(backed_up[0], backup_dir)
    store = Store.open(backup_dir / "node1", KEY)
    victim = next(r for r in source_files(sample_node) if r.endswith(".gz")
                  and (sample_node / r).stat().st_size > 2 * CHUNK)
    tamper_file_data(store, backed_up[2], victim, at=CHUNK + 100)
    m = tree.Tree.from_backup_dir(backup_dir, KEY)
    a = resolve(m, NODE + b"/" + os.fsencode(victim))
    fh = m.open(a.inode)
    assert bytes(await m.read(fh, 0, 4096)) == (sample_node / victim).read_bytes()[:4096]
    with pytest.raises(tree.Damaged) as info:
        await m.read(fh, CHUNK + 10, 100)
    assert victim in str(info.value) and f"offset {CHUNK + 10}" in str(info.value)
    with pytest.raises(tree.Damaged):  # and again: a failed load is not cached
        await m.read(fh, CHUNK, 1)
    for rel in source_files(sample_node):
        if rel != victim:
            b = resolve(m, NODE + b"/" + os.fsencode(rel))
            assert await read_all(m, b.inode) == (sample_node / rel).read_bytes(), rel


@pytest.mark.allow_warnings
async def test_damaged_folder_fails_alone(tmp_path: Path) -> None:
    src = tiny_node(tmp_path / "src", {"bad/f": b"1", "good/g": b"2"})
    store = create_store(tmp_path / "backup" / "node1")
    gen = backup(store, src)

    ref = dict(entries(store, gen))["bad"].subtree
    assert ref is not None
    with open(store.pack_path(ref.pack), "r+b") as f:
        f.seek(ref.offset + 5)
        f.write(b"\0\0\0")
    m = tree.Tree.from_backup_dir(tmp_path / "backup", KEY)
    bad = resolve(m, b"node1/bad")
    with pytest.raises(tree.Damaged, match="node1/bad"):
        m.opendir(bad.inode)
    with pytest.raises(tree.Damaged):
        m.lookup(bad.inode, b"f")
    assert await read_all(m, resolve(m, b"node1/good/g").inode) == b"2"


async def test_caches_are_bounded(backed_up: tuple[Path, Store, Generation],
                                  sample_node: Path) -> None:
    m = tree.Tree([Store.open(backed_up[0] / "node1", KEY)], cache_bytes=1 << 20,
                  listing_budget=50)
    # The adapter's replies are kept with the listings, so they are bounded with them.
    m.replies_of = lambda attrs: [object() for _ in attrs]
    for src in m._sources:
        src.refresh()
    first = resolve(m, b"node1/cluster_membership.uuid")
    for rel in source_files(sample_node):
        a = resolve(m, NODE + b"/" + os.fsencode(rel))
        assert await read_all(m, a.inode) == (sample_node / rel).read_bytes()
        assert m.cache.bytes <= 1 << 20
        cached = m.listings._cache.values()
        assert m.listings._listed <= 50 or len(cached) == 1
        assert all(len(loaded.replies) == len(loaded.rows) for loaded in cached)
    # An inode whose folder listing was dropped still resolves: its tree is read again.
    assert m.getattr(first.inode) == first
    assert await read_all(m, first.inode) == (sample_node / "cluster_membership.uuid").read_bytes()


def test_would_block_until_cached(backed_up: tuple[Path, Store, Generation]) -> None:
    m = tree.Tree.from_backup_dir(backed_up[0], KEY)
    # A node root's nlink counts its subfolders: its listing must be read first.
    with pytest.raises(tree.WouldBlock):
        m.lookup(tree.ROOT_INODE, NODE, block=False)
    node = m.lookup(tree.ROOT_INODE, NODE)
    assert node.nlink > 2
    assert m.lookup(tree.ROOT_INODE, NODE, block=False) == node
    a = m.lookup(node.inode, b"cluster_membership.uuid")
    assert m.lookup(node.inode, b"cluster_membership.uuid", block=False) == a
    assert m.open(a.inode, block=False) > 0


def test_errors_by_kind(model: tree.Tree) -> None:
    node = resolve(model, NODE)
    with pytest.raises(tree.NotFound):
        model.lookup(node.inode, b"no-such-file")
    with pytest.raises(tree.NotFound):
        model.getattr(10 ** 12)
    f = resolve(model, b"node1/cluster_membership.uuid")
    link = resolve(model, b"node1/humiodata.current")
    with pytest.raises(OSError) as info:
        model.readlink(f.inode)
    assert info.value.errno == errno.EINVAL
    with pytest.raises(NotADirectoryError):
        model.opendir(f.inode)
    with pytest.raises(IsADirectoryError):
        model.open(node.inode)
    with pytest.raises(OSError):
        model.open(link.inode)
    assert model.parent(f.inode) == node.inode
    assert model.parent(node.inode) == tree.ROOT_INODE


@pytest.mark.allow_warnings
def test_stores_the_key_does_not_open(backed_up: tuple[Path, Store, Generation],
                                      tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    backup_dir = tmp_path / "backup"
    shutil.copytree(backed_up[0] / "node1", backup_dir / "node1")
    create_store(backup_dir / "other", key="another key entirely")
    m = tree.Tree.from_backup_dir(backup_dir, KEY)
    assert list(listdir(m, tree.ROOT_INODE)) == [b".generations", NODE]
    assert "does not open the backup other" in caplog.text
    # No store opens: the mount starts empty and waits for one this key opens (told once).
    caplog.clear()
    assert list(listdir(tree.Tree.from_backup_dir(backup_dir, "wrong key"),
                        tree.ROOT_INODE)) == [b".generations"]
    assert "the key opens none of the backups" in caplog.text
    with pytest.raises(WrongKey):
        tree.Tree.from_backup_dir(backup_dir, "wrong key", name="node1")
    with pytest.raises(WrongKey):
        tree.Tree.from_backup_dir(backup_dir, KEY, name="other")
    only = tree.Tree.from_backup_dir(backup_dir, KEY, name="node1")
    assert list(listdir(only, tree.ROOT_INODE)) == [b".generations", NODE]
    with pytest.raises(NoSuchStore):
        tree.Tree.from_backup_dir(tmp_path / "empty", KEY, name="node1")


@pytest.mark.allow_warnings
async def test_starts_without_stores_and_shows_new_ones(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A missing or empty BACKUP_DIR mounts (empty); a store created later appears, and one the
    key does not open stays out, told once."""
    backup_dir = tmp_path / "backup"
    m = tree.Tree.from_backup_dir(backup_dir, KEY)
    assert "no backups in" in caplog.text
    assert list(listdir(m, tree.ROOT_INODE)) == [b".generations"]
    monkeypatch.setattr(tree, "REFRESH_S", 0.0)
    store = create_store(backup_dir / "node1")
    create_store(backup_dir / "other", key="another key entirely")
    assert list(listdir(m, tree.ROOT_INODE)) == [b".generations"]   # no generation yet
    assert list(listdir(m, resolve(m, b".generations").inode)) == [NODE]
    backup(store, tiny_node(tmp_path / "src", {"a": b"one"}))
    assert list(listdir(m, tree.ROOT_INODE)) == [b".generations", NODE]
    assert await read_all(m, resolve(m, b"node1/a").inode) == b"one"
    assert len(listdir(m, resolve(m, b".generations/node1").inode)) == 1
    listdir(m, tree.ROOT_INODE)
    assert caplog.text.count("does not open the backup other") == 1
    m.close()



async def test_small_misses_decrypt_on_the_loop_only_from_memory(
        backed_up: tuple[Path, Store, Generation], sample_node: Path) -> None:
    """A miss of up to NOWAIT_CHUNKS chunks is decrypted on the loop when its pack is open and
    in the page cache (no disk wait); anything else is decrypted off the loop."""
    m = tree.Tree.from_backup_dir(backed_up[0], KEY)
    small = [r for r in source_files(sample_node) if 0 < (sample_node / r).stat().st_size < 4096]
    first, second = (resolve(m, NODE + b"/" + os.fsencode(r)) for r in small[:2])
    fh = m.open(first.inode)
    assert bytes(await m.read(fh, 0, 4096)) == (sample_node / small[0]).read_bytes()
    assert m.reader.offloaded == 1  # the pack was not open yet
    fh2 = m.open(second.inode)
    assert bytes(await m.read(fh2, 0, 4096)) == (sample_node / small[1]).read_bytes()
    assert m.reader.offloaded == 1
    big = next(r for r in source_files(sample_node) if r.endswith(".gz")
               and (sample_node / r).stat().st_size > 16 * CHUNK)
    fh3 = m.open(resolve(m, NODE + b"/" + os.fsencode(big)).inode)
    await m.read(fh3, 15 * CHUNK, 1)  # not sequential: no read-ahead
    before = m.reader.offloaded
    n = reader.NOWAIT_CHUNKS + 1
    got = await m.read(fh3, 8 * CHUNK, n * CHUNK)
    assert bytes(got) == (sample_node / big).read_bytes()[8 * CHUNK:(8 + n) * CHUNK]
    assert m.reader.offloaded == before + 1


async def test_sequential_reads_are_decrypted_ahead(backed_up: tuple[Path, Store, Generation],
                                                    sample_node: Path) -> None:
    """A sequential reader's next chunks are decrypted into the cache ahead of it, so that its
    next reads are answered from memory; a random reader's are not."""
    m = tree.Tree.from_backup_dir(backed_up[0], KEY)
    big = max(source_files(sample_node), key=lambda r: (sample_node / r).stat().st_blocks)
    data = (sample_node / big).read_bytes()
    fh = m.open(resolve(m, NODE + b"/" + os.fsencode(big)).inode)
    f = m.reader._handles[fh].file
    assert f.ref is not None and len(data) > 40 * CHUNK
    assert bytes(await m.read(fh, 20 * CHUNK, 4096)) == data[20 * CHUNK:20 * CHUNK + 4096]
    assert m.cache.find((f.ref.pack, f.ref.oid, 21)) is None  # one random read: no read-ahead
    assert bytes(await m.read(fh, 0, 131072)) == data[:131072]
    assert bytes(await m.read(fh, 131072, 131072)) == data[131072:262144]
    for i in range(4, 20):
        found = m.cache.find((f.ref.pack, f.ref.oid, i))
        assert found is not None, i
        if found[1] is not None:
            await found[1].done.wait()
    before = m.reader.offloaded
    assert bytes(await m.read(fh, 262144, 1 << 20)) == data[262144:262144 + (1 << 20)]
    assert m.reader.offloaded - before <= 2  # the read-ahead's own next window only


async def test_worker_process_reads_exact_bytes(backed_up: tuple[Path, Store, Generation],
                                                sample_node: Path) -> None:
    """With the decryption worker, 16 concurrent readers at random offsets, through a cache
    too small to hold their reads at once, get exactly the source's bytes."""
    m = tree.Tree([Store.open(backed_up[0] / "node1", KEY)], cache_bytes=24 * CHUNK)
    m.start_worker()
    try:
        for src in m._sources:
            src.refresh()
        files = [r for r in source_files(sample_node)
                 if (sample_node / r).stat().st_size > 4 * CHUNK]
        rng = random.Random(5)

        async def reader_task(seed: int) -> None:
            r = random.Random(seed)
            rel = r.choice(files)
            data = (sample_node / rel).read_bytes()
            fh = m.open(resolve(m, NODE + b"/" + os.fsencode(rel)).inode)
            try:
                for _ in range(25):
                    off = r.randrange(len(data))
                    n = r.choice((1, 4096, CHUNK + 3, 5 * CHUNK))
                    assert bytes(await m.read(fh, off, n)) == data[off:off + n], (rel, off, n)
            finally:
                m.release(fh)

        async with trio.open_nursery() as nursery:
            for _ in range(16):
                nursery.start_soon(reader_task, rng.randrange(1 << 30))
        assert m.reader.worker is not None and m.reader.worker.alive
        assert m.reader.offloaded > 0
    finally:
        m.close()


@pytest.mark.allow_warnings
async def test_worker_death_falls_back_to_threads(backed_up: tuple[Path, Store, Generation],
                                                  sample_node: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    m = tree.Tree.from_backup_dir(backed_up[0], KEY)
    m.start_worker()
    try:
        files = sorted((r for r in source_files(sample_node)
                        if (sample_node / r).stat().st_size > 8 * CHUNK),
                       key=lambda r: (sample_node / r).stat().st_size)
        a = resolve(m, NODE + b"/" + os.fsencode(files[0]))
        assert await read_all(m, a.inode) == (sample_node / files[0]).read_bytes()
        assert m.reader.worker is not None
        os.kill(m.reader.worker.pid, signal.SIGKILL)
        for rel in files:
            b = resolve(m, NODE + b"/" + os.fsencode(rel))
            assert await read_all(m, b.inode, step=1 << 20) == (sample_node / rel).read_bytes()
        assert not m.reader.worker.alive
        assert "decryption worker has exited" in caplog.text
    finally:
        m.close()


def test_a_garbled_worker_result_retires_the_worker() -> None:
    """A result too short to parse means the worker is not to be trusted: results() says it
    is gone (its jobs then move to threads) instead of raising in the mount's collector."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.setblocking(False)
    with ours, theirs:
        worker = decryptd.Worker(ours, 0, [])
        theirs.send(b"\x01\x00")
        assert worker.results() is None
        assert not worker.alive


@pytest.mark.allow_warnings
async def test_worker_reports_damage_and_goes_on(backed_up: tuple[Path, Store, Generation],
                                                 tmp_path: Path, sample_node: Path) -> None:
    backup_dir = tmp_path / "backup"
    shutil.copytree(backed_up[0], backup_dir)
    store = Store.open(backup_dir / "node1", KEY)
    big = [r for r in source_files(sample_node) if r.endswith(".gz")
           and (sample_node / r).stat().st_size > 16 * CHUNK]
    victim = big[0]
    tamper_file_data(store, backed_up[2], victim, at=12 * STORED_CHUNK + 100)  # in chunk 12
    m = tree.Tree.from_backup_dir(backup_dir, KEY)
    m.start_worker()
    try:
        fh = m.open(resolve(m, NODE + b"/" + os.fsencode(victim)).inode)
        data = (sample_node / victim).read_bytes()
        assert bytes(await m.read(fh, 0, 8 * CHUNK)) == data[:8 * CHUNK]
        with pytest.raises(tree.Damaged, match=victim):
            await m.read(fh, 10 * CHUNK, 8 * CHUNK)
        with pytest.raises(tree.Damaged, match=victim):  # and again: nothing of it was kept
            await m.read(fh, 12 * CHUNK, 10)
        assert bytes(await m.read(fh, 13 * CHUNK, 8 * CHUNK)) == data[13 * CHUNK:21 * CHUNK]
        assert m.reader.worker is not None and m.reader.worker.alive
        for rel in big[1:]:
            b = resolve(m, NODE + b"/" + os.fsencode(rel))
            assert await read_all(m, b.inode) == (sample_node / rel).read_bytes()
    finally:
        m.close()


def test_prefetch_loads_subfolders_ahead_and_stays_bounded() -> None:
    """The subfolders of the folder opened last are loaded in the background, while fewer
    than `limit` loaded entries wait unopened."""
    loaded: list[int] = []

    def load(inode: int) -> int:
        loaded.append(inode)
        return 5

    p = prefetch.Prefetcher(load, limit=12)
    try:
        p.opened(1, list(range(10, 20)))
        wait_for(lambda: len(loaded) == 3, "three folders loaded ahead")
        p.opened(4, [])                 # a folder that was not prefetched: nothing changes
        assert loaded == [10, 11, 12]
        p.opened(10, [])                # one prefetched folder opened: room for one more
        wait_for(lambda: len(loaded) == 4, "a fourth folder")
        p.opened(11, [30, 31])          # a new folder's subfolders come first
        wait_for(lambda: loaded[-1] == 30, "the new folder's subfolders")
        assert len(loaded) == 5         # 12, 13 and 30 wait: 15 entries, at the limit
    finally:
        p.close()


async def test_colliding_hashes_still_give_every_entry_its_own_number(
        backed_up: tuple[Path, Store, Generation], sample_node: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """With every file fingerprint and every folder path key made equal, numbers move on to
    the next free one: no two entries share a number, and each still leads to its own file."""
    monkeypatch.setattr(inodes, "fingerprint", lambda e, with_name=True: 12345)
    monkeypatch.setattr(inodes, "row_fingerprint", lambda r: 12345)
    monkeypatch.setattr(inodes, "dir_key", lambda view, path: 7)
    m = tree.Tree.from_backup_dir(backed_up[0], KEY)
    try:
        numbers: dict[int, bytes] = {}
        todo = [(b"", resolve(m, NODE).inode)]
        while todo:
            prefix, inode = todo.pop()
            for name, a in listdir(m, inode).items():
                rel = prefix + name
                assert a.inode not in numbers, (rel, numbers.get(a.inode))
                numbers[a.inode] = rel
                if stat.S_ISDIR(a.mode):
                    todo.append((rel + b"/", a.inode))
        assert len(numbers) > 300
        for inode, rel in numbers.items():
            path = sample_node / os.fsdecode(rel)
            if rel.startswith(b"globaldata") or path.is_symlink() or not path.is_file():
                continue
            assert await read_all(m, inode) == path.read_bytes(), rel
    finally:
        m.close()


def test_rows_number_files_as_entries_do(backed_up: tuple[Path, Store, Generation]) -> None:
    """The mount reads listings as format.FileRow where it can (listing.py): every file keeps
    the number its Entry gives it by inodes.py's rule, so numbers stay what they were."""
    _, store, gen = backed_up
    key = inodes.dir_key(b"view", b"some/folder")
    todo, rows_seen = [gen.root.tree], 0
    while todo:
        plain = store.read_blob(todo.pop(), crypto.KIND_TREE)
        entries, rows = decode_tree(plain), decode_tree_rows(plain)
        # inodes.py's rule, from the Entries: the fingerprint's slot, or the next free one.
        taken: set[int] = set()
        want = []
        for e in entries:
            slot = inodes.fingerprint(e) & inodes.SLOT_MASK
            while slot in taken:
                slot = (slot + 1) & inodes.SLOT_MASK
            taken.add(slot)
            want.append(inodes.file_inode(key, slot))
        loaded = listing.Loaded(rows, key)
        assert [slot for _, _, slot in loaded.pending] == \
            [want[i] & inodes.SLOT_MASK for i, _, _ in loaded.pending]
        loaded.place([want[i] for i, _, _ in loaded.pending])
        assert loaded.inodes == want
        assert loaded.attrs == [attrs.entry_attr(n, e) for n, e in zip(want, entries, strict=True)]
        for r in rows:
            if isinstance(r, FileRow):
                rows_seen += 1
                assert inodes.row_fingerprint(r) == inodes.fingerprint(r.entry())
        todo += [e.subtree for e in entries if e.subtree is not None]
    assert rows_seen > 100
