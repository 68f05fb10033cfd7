"""Restore: --missing-only, --overwrite, non-empty targets, symlinks planted in the target,
names in the store that try to escape it, and a tampered store (flipped, truncated, deleted and
swapped files): always detected (exit 5), never wrong data, nothing written outside the target."""
from __future__ import annotations

import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import KEY, ROOT, clean_env, make_sample, run_cli, tree_digest, write_env
from storetools import backup, create_store, files, flip, restore, source_digest, walk

from humiofs.errors import IntegrityError, TargetError
from humiofs.store import crypto
from humiofs.store.format import DIR, FILE, Entry, Generation, Ref, RootAttrs
from humiofs.store.repository import Store, new_generation_name

MiB = 1 << 20


@pytest.fixture(scope="module")
def made(sample_node: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Store, Generation]:
    store = create_store(tmp_path_factory.mktemp("restore-store") / "node1")
    gen, _ = backup(store, sample_node)
    return store, gen


def file_entries(digest: dict[str, tuple[object, ...]]) -> dict[str, tuple[object, ...]]:
    return {k: v for k, v in digest.items() if v[0] != "d"}


def segments(root: Path) -> list[Path]:
    return sorted(root.glob("dataspace_*/datasource_*/segment_*.gz"))


@pytest.fixture()
def full(made: tuple[Store, Generation], tmp_path: Path) -> Path:
    store, gen = made
    target = tmp_path / "target"
    restore(store, gen, target)
    return target


def test_missing_only_restores_exactly_the_missing(made: tuple[Store, Generation],
                                                   sample_node: Path, full: Path) -> None:
    store, gen = made
    segs = segments(full)
    gone, modified = segs[:2], segs[2]
    for p in gone:
        p.unlink()
    with open(modified, "ab") as f:
        f.write(b"local change")
    modified_digest = tree_digest(full)[str(modified.relative_to(full))]
    stats = restore(store, gen, full, missing_only=True)
    assert stats.files == 2 and stats.symlinks == 0 and stats.skipped == 0
    want = file_entries(source_digest(sample_node))
    want[str(modified.relative_to(full))] = modified_digest
    assert file_entries(tree_digest(full)) == want


def test_missing_only_leaves_existing_folders_alone(made: tuple[Store, Generation],
                                                    full: Path) -> None:
    """--missing-only adds what is missing; it does not reset the mode or mtime of folders
    (or of the target itself) that were already there."""
    store, gen = made
    seg = segments(full)[0]
    folder = seg.parent
    seg.unlink()
    for d in (folder, full):
        os.chmod(d, 0o750)
        os.utime(d, ns=(1_000_000_000, 1_000_000_000))
    restore(store, gen, full, missing_only=True)
    assert seg.exists()
    # The folder's mtime moved with the file added to it; its mode must not. The target
    # itself gained nothing, so neither its mode nor its mtime may change.
    assert folder.stat().st_mode & 0o7777 == 0o750
    assert (full.stat().st_mode & 0o7777, full.stat().st_mtime_ns) == (0o750, 1_000_000_000)


def test_missing_only_into_empty_target(made: tuple[Store, Generation], sample_node: Path,
                                        tmp_path: Path) -> None:
    store, gen = made
    restore(store, gen, tmp_path / "t", missing_only=True)
    assert tree_digest(tmp_path / "t") == source_digest(sample_node)


def test_non_empty_target_refused(made: tuple[Store, Generation], full: Path) -> None:
    store, gen = made
    segs = segments(full)
    segs[0].unlink()
    with open(segs[1], "ab") as f:
        f.write(b"x")
    before = tree_digest(full)
    with pytest.raises(TargetError, match="not empty"):
        restore(store, gen, full)
    assert tree_digest(full) == before


def test_overwrite_replaces(made: tuple[Store, Generation], sample_node: Path,
                            full: Path) -> None:
    store, gen = made
    segs = segments(full)
    segs[0].write_bytes(b"replaced")
    os.chmod(segs[1], 0o666)
    segs[2].unlink()
    (full / "extra-local-file").write_bytes(b"kept")
    restore(store, gen, full, overwrite=True)
    got = tree_digest(full)
    assert got.pop("extra-local-file")[0] == "f"
    assert file_entries(got) == file_entries(source_digest(sample_node))


# -- symlinks planted in the target ---------------------------------------------------------

def plant(full: Path, tmp_path: Path) -> tuple[Path, Path]:
    """Replaces a datasource folder of the target by a symlink to a folder outside it."""
    victim = segments(full)[0].parent
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.rmtree(victim)
    victim.symlink_to(outside)
    return victim, outside


@pytest.mark.allow_warnings
def test_planted_symlink_missing_only(made: tuple[Store, Generation], full: Path,
                                      tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store, gen = made
    victim, outside = plant(full, tmp_path)
    stats = restore(store, gen, full, missing_only=True)
    assert list(outside.iterdir()) == []
    assert victim.is_symlink()
    assert stats.skipped == 1 and victim.name in caplog.text


def test_planted_symlink_overwrite(made: tuple[Store, Generation], sample_node: Path,
                                   full: Path, tmp_path: Path) -> None:
    store, gen = made
    victim, outside = plant(full, tmp_path)
    restore(store, gen, full, overwrite=True)
    assert list(outside.iterdir()) == []
    assert not victim.is_symlink()
    assert file_entries(tree_digest(full)) == file_entries(source_digest(sample_node))


@pytest.mark.parametrize("mode", ["missing_only", "overwrite"])
def test_planted_file_symlink(made: tuple[Store, Generation], full: Path, tmp_path: Path,
                              mode: str) -> None:
    store, gen = made
    victim = segments(full)[0]
    want = victim.read_bytes()
    precious = tmp_path / "precious"
    precious.write_bytes(b"precious")
    victim.unlink()
    victim.symlink_to(precious)
    restore(store, gen, full, **{mode: True})
    assert precious.read_bytes() == b"precious"
    if mode == "overwrite":
        assert not victim.is_symlink() and victim.read_bytes() == want
    else:
        assert victim.is_symlink()


# -- names in the store that try to escape the target ------------------------------------------

def raw_entry(name: bytes, etype: int, body: bytes, size: int = 0) -> bytes:
    return (struct.pack(">H", len(name)) + name
            + struct.pack(">BIIIqqQQ", etype, 0o644, 0, 0, 10**18, 10**18, 1, size) + body)


def raw_file(name: bytes, ref: Ref) -> bytes:
    return raw_entry(name, FILE, b"\x01" + ref.encode() + struct.pack(">IQQ", 1, 0, ref.plain_len),
                     size=ref.plain_len)


def raw_dir(name: bytes, ref: Ref) -> bytes:
    return raw_entry(name, DIR, ref.encode())


def raw_tree(*entries: bytes) -> bytes:
    return b"HT\x01" + struct.pack(">I", len(entries)) + b"".join(entries)


def evil_store(path: Path, bad: bytes, nested: bool) -> Store:
    """A store whose only generation has the entry `bad`, encoded by hand and sealed with the
    store's own keys: everything authenticates, only the name is malicious."""
    store = create_store(path)
    pack = store.new_pack()
    data = pack.add(crypto.KIND_DATA, b"escaped!")
    leaf = pack.add(crypto.KIND_TREE, raw_tree(raw_file(b"escaped", data)))
    evil = raw_dir(bad, leaf) if bad in (b"..", b".") else raw_file(bad, data)
    inner = pack.add(crypto.KIND_TREE, raw_tree(raw_file(b"aaa-fine", data), evil))
    root = pack.add(crypto.KIND_TREE, raw_tree(raw_dir(b"d", inner))) if nested else inner
    pack.finish()
    name = new_generation_name(1764000000000)
    store.commit_generation(Generation(name, 1764000000000, store.name, "h", "/data",
                                       RootAttrs(0o755, 0, 0, 0, root), None, {}))
    return store


BAD_NAMES = [b"..", b".", b"../escaped", b"/tmp/escaped-abs", b"d/../../escaped", b"a\0b"]


def outside_listing(tmp_path: Path) -> set[str]:
    return {str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")
            if "target" not in p.relative_to(tmp_path).parts[:1]}


@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("bad", BAD_NAMES)
def test_restore_refuses_escaping_names(tmp_path: Path, bad: bytes, nested: bool) -> None:
    evil_store(tmp_path / "backups" / "node1", bad, nested)
    env = write_env(tmp_path / "node.env", tmp_path / "backups")
    before = outside_listing(tmp_path)
    r = run_cli("restore", "-c", env, "--to", tmp_path / "target" / "inner")
    assert r.returncode == 5, r.stderr
    assert "unsafe name" in r.stderr and r.stderr.count("\n") == 1
    assert outside_listing(tmp_path) == before
    assert not Path("/tmp/escaped-abs").exists()
    # The list of folders it made stays for a restore after it (--missing-only).
    written = [p for p in (tmp_path / "target").rglob("*") if p.is_file()
               and p.name != ".humiofs-restore-folders"]
    assert written == []


def test_escaping_name_in_process(tmp_path: Path) -> None:
    store = evil_store(tmp_path / "backups" / "node1", b"..", nested=True)
    gen = store.load_generation(store.list_generations()[-1])
    with pytest.raises(IntegrityError):
        restore(store, gen, tmp_path / "target")
    assert not (tmp_path / "escaped").exists()


# -- a tampered store ------------------------------------------------------------------------------

@dataclass
class Pristine:
    node: Path
    store: Path
    entries: dict[str, Entry]
    gens: list[str]

    @property
    def big(self) -> Ref:
        ref = self.entries["big.bin"].data
        assert ref is not None
        return ref


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Pristine:
    """A small node with one 3 MiB file (a pack of its own), backed up twice (two generations)."""
    base = tmp_path_factory.mktemp("tamper")
    node = make_sample(base / "node", size="1M", small_files=200, seed=21)
    (node / "big.bin").write_bytes(os.urandom(3 * MiB))
    store = create_store(base / "store" / "node1")
    gen1, _ = backup(store, node)
    gen2, _ = backup(store, node)
    return Pristine(node, store.path, files(store, gen2), [gen1.name, gen2.name])


@pytest.fixture()
def copy(pristine: Pristine, tmp_path: Path) -> tuple[Path, Path]:
    """A fresh copy of the pristine store, and an env file for it."""
    dst = tmp_path / "backups" / "node1"
    shutil.copytree(pristine.store, dst)
    return dst, write_env(tmp_path / "node.env", tmp_path / "backups")


def pack_path(store_path: Path, pack: bytes) -> Path:
    return store_path / "packs" / pack.hex()[:2] / pack.hex()


def restore_fails(env: Path, target: Path, *names: str) -> str:
    """Runs a CLI restore that must fail with exit 5 and a one-line message naming `names`;
    checks that every file the target holds is exact and no temporary file is left."""
    r = run_cli("restore", "-c", env, "--to", target)
    assert r.returncode == 5, (r.returncode, r.stdout, r.stderr)
    assert r.stderr.startswith("humiofs: error: ") and r.stderr.count("\n") == 1, r.stderr
    for name in names:
        assert name in r.stderr, r.stderr
    return r.stderr


def no_wrong_data(target: Path, node: Path) -> None:
    want = source_digest(node)
    for rel, v in tree_digest(target).items():
        if rel == ".humiofs-restore-folders":
            continue    # the folders a stopped restore made, for the next one to finish
        assert not Path(rel).name.startswith(".humiofs-restore"), rel
        if v[0] == "f":
            assert want[rel][4] == v[4], rel


def test_pristine_copy_restores(copy: tuple[Path, Path], pristine: Pristine,
                                tmp_path: Path) -> None:
    r = run_cli("restore", "-c", copy[1], "--to", tmp_path / "t")
    assert r.returncode == 0, r.stderr
    assert tree_digest(tmp_path / "t") == source_digest(pristine.node)


def test_flipped_byte_in_data_pack(copy: tuple[Path, Path], pristine: Pristine,
                                   tmp_path: Path) -> None:
    store_path, env = copy
    big = pristine.big
    flip(pack_path(store_path, big.pack), big.offset + 2 * MiB + 77)
    target = tmp_path / "t"
    restore_fails(env, target, "big.bin")
    assert not (target / "big.bin").exists()
    no_wrong_data(target, pristine.node)

    # Every other file still reads back exactly; only big.bin fails.
    store = Store.open(store_path, KEY)
    node = pristine.node
    for rel, e in pristine.entries.items():
        if e.data is None:
            continue
        if rel == "big.bin":
            with pytest.raises(IntegrityError):
                b"".join(store.iter_blob(e.data, crypto.KIND_DATA))
            continue
        raw = (node / rel).read_bytes()
        want = b"".join(raw[o:o + n] for o, n in e.extents)
        assert b"".join(store.iter_blob(e.data, crypto.KIND_DATA)) == want, rel


def test_flipped_byte_in_shared_pack_names_the_file(copy: tuple[Path, Path],
                                                    pristine: Pristine,
                                                    tmp_path: Path) -> None:
    store_path, env = copy
    rel, ref = sorted((r, e.data) for r, e in pristine.entries.items()
                      if e.data is not None and 0 < e.data.plain_len < 4096)[-1]
    flip(pack_path(store_path, ref.pack), ref.offset + ref.stored_len - 1)
    restore_fails(env, tmp_path / "t", rel)
    assert not (tmp_path / "t" / rel).exists()
    no_wrong_data(tmp_path / "t", pristine.node)


def test_zeroed_chunk_is_no_hole(copy: tuple[Path, Path], pristine: Pristine,
                                 tmp_path: Path) -> None:
    store_path, env = copy
    ref = pristine.big
    with open(pack_path(store_path, ref.pack), "r+b") as f:
        f.seek(ref.offset + (crypto.CHUNK + crypto.TAG))
        f.write(bytes(crypto.CHUNK + crypto.TAG))
    restore_fails(env, tmp_path / "t", "big.bin")
    no_wrong_data(tmp_path / "t", pristine.node)


def test_truncated_pack(copy: tuple[Path, Path], pristine: Pristine,
                        tmp_path: Path) -> None:
    store_path, env = copy
    ref = pristine.big
    p = pack_path(store_path, ref.pack)
    os.truncate(p, p.stat().st_size - 1)
    restore_fails(env, tmp_path / "t", "big.bin", "truncated")
    assert not (tmp_path / "t" / "big.bin").exists()
    no_wrong_data(tmp_path / "t", pristine.node)


def test_deleted_pack(copy: tuple[Path, Path], pristine: Pristine,
                      tmp_path: Path) -> None:
    store_path, env = copy
    ref = pristine.big
    pack_path(store_path, ref.pack).unlink()
    restore_fails(env, tmp_path / "t", "big.bin", "missing")
    no_wrong_data(tmp_path / "t", pristine.node)


def test_swapped_packs(copy: tuple[Path, Path], pristine: Pristine,
                       tmp_path: Path) -> None:
    store_path, env = copy
    a = pack_path(store_path, pristine.big.pack)
    others = sorted(p for p in (store_path / "packs").glob("*/*") if p != a)
    b = others[0]
    tmp = a.with_name("swap")
    a.rename(tmp)
    b.rename(a)
    tmp.rename(b)
    restore_fails(env, tmp_path / "t")
    no_wrong_data(tmp_path / "t", pristine.node)


def test_flipped_byte_in_root_tree(copy: tuple[Path, Path], pristine: Pristine,
                                   tmp_path: Path) -> None:
    store_path, env = copy
    root = Store.open(store_path, KEY).load_generation(pristine.gens[-1]).root.tree
    flip(pack_path(store_path, root.pack), root.offset + 3)
    restore_fails(env, tmp_path / "t", "top folder")
    assert list((tmp_path / "t").iterdir()) == []


def test_flipped_byte_in_sub_tree(copy: tuple[Path, Path], pristine: Pristine,
                                  tmp_path: Path) -> None:
    store_path, env = copy
    store = Store.open(store_path, KEY)
    gen = store.load_generation(pristine.gens[-1])
    rel, e = next((r, e) for r, e in walk(store, gen.root.tree)
                  if e.type == DIR and r.count("/") == 1)
    assert e.subtree is not None
    flip(pack_path(store_path, e.subtree.pack), e.subtree.offset + e.subtree.stored_len - 1)
    restore_fails(env, tmp_path / "t", f"folder {rel}")
    no_wrong_data(tmp_path / "t", pristine.node)


def restores_the_older_one(env: Path, target: Path, pristine: Pristine) -> str:
    """A restore whose newest generation is damaged restores the one before (what the mount
    and ls call the latest, too), names the damaged one, and exits 8; returns its stderr."""
    r = run_cli("restore", "-c", env, "--to", target)
    assert r.returncode == 8, (r.returncode, r.stdout, r.stderr)
    assert pristine.gens[0] in r.stdout and pristine.gens[-1] in r.stderr, r.stdout + r.stderr
    assert tree_digest(target) == source_digest(pristine.node)
    return r.stderr


@pytest.mark.parametrize("where", ["header", "oid", "middle", "last"])
def test_flipped_byte_in_generation(copy: tuple[Path, Path], pristine: Pristine,
                                    tmp_path: Path, where: str) -> None:
    store_path, env = copy
    name = pristine.gens[-1]
    p = store_path / "generations" / name
    offset = {"header": 6, "oid": 10, "middle": p.stat().st_size // 2,
              "last": p.stat().st_size - 1}[where]
    flip(p, offset)
    restores_the_older_one(env, tmp_path / "t", pristine)
    # Asked for by name, the damaged one is an error.
    r = run_cli("restore", "-c", env, "--to", tmp_path / "t2", "--at", name)
    assert r.returncode == 5 and name in r.stderr
    assert not (tmp_path / "t2").exists() or list((tmp_path / "t2").iterdir()) == []


def test_swapped_generations(copy: tuple[Path, Path], pristine: Pristine,
                             tmp_path: Path) -> None:
    store_path, env = copy
    g1, g2 = (store_path / "generations" / n for n in pristine.gens)
    tmp = g1.with_name("swap")
    g1.rename(tmp)
    g2.rename(g1)
    tmp.rename(g2)
    restore_fails(env, tmp_path / "t", g2.name)
    at = f"@{int(g1.name[:13]) / 1000}"
    r = run_cli("restore", "-c", env, "--to", tmp_path / "t2", "--at", at)
    assert r.returncode == 5 and g1.name in r.stderr


def test_truncated_generation(copy: tuple[Path, Path], pristine: Pristine,
                              tmp_path: Path) -> None:
    store_path, env = copy
    p = store_path / "generations" / pristine.gens[-1]
    os.truncate(p, p.stat().st_size - 16)
    restores_the_older_one(env, tmp_path / "t", pristine)


# -- a bad day: restore --keep-going -----------------------------------------------------------

def keep_going(env: Path, target: Path, *extra: str) -> str:
    """Runs `restore --keep-going`, which must end with exit 5; returns its stderr."""
    r = run_cli("restore", "-c", env, "--to", target, "--keep-going", *extra)
    assert r.returncode == 5, (r.returncode, r.stdout, r.stderr)
    assert "everything else was restored" in r.stderr, r.stderr
    return r.stderr


def test_keep_going_restores_every_good_file(copy: tuple[Path, Path], pristine: Pristine,
                                             tmp_path: Path) -> None:
    store_path, env = copy
    big = pristine.big
    flip(pack_path(store_path, big.pack), big.offset + 2 * MiB + 77)
    target = tmp_path / "t"
    err = keep_going(env, target)
    assert "cannot restore big.bin" in err and "1 damaged file(s)" in err
    want = source_digest(pristine.node)
    del want["big.bin"]
    assert tree_digest(target) == want
    # Without --keep-going the first damaged file ends it, and the message says what to use.
    assert "restore --keep-going" in restore_fails(env, tmp_path / "t2", "big.bin")


def test_missing_only_keep_going_brings_back_what_comes_after(copy: tuple[Path, Path],
                                                              pristine: Pristine,
                                                              tmp_path: Path) -> None:
    """--missing-only used to stop at the first damaged file, so every missing file after it
    (in the order restore walks) stayed missing."""
    store_path, env = copy
    target = tmp_path / "t"
    assert run_cli("restore", "-c", env, "--to", target).returncode == 0
    later = sorted(p for p in target.rglob("*") if p.is_file() and str(p.relative_to(target))
                   > "big.bin")[-5:]
    for p in [target / "big.bin", *later]:
        p.unlink()
    big = pristine.big
    flip(pack_path(store_path, big.pack), big.offset + 100)
    r = run_cli("restore", "-c", env, "--to", target, "--missing-only")
    assert r.returncode == 5 and not any(p.exists() for p in later)
    keep_going(env, target, "--missing-only")
    assert all(p.exists() for p in later) and not (target / "big.bin").exists()
    want = file_entries(source_digest(pristine.node))
    del want["big.bin"]
    assert file_entries(tree_digest(target)) == want


def test_keep_going_names_a_damaged_folder(copy: tuple[Path, Path], pristine: Pristine,
                                           tmp_path: Path) -> None:
    store_path, env = copy
    store = Store.open(store_path, KEY)
    gen = store.load_generation(pristine.gens[-1])
    rel, e = next((r, e) for r, e in walk(store, gen.root.tree)
                  if e.type == DIR and r.count("/") == 1)
    store.close()
    assert e.subtree is not None
    flip(pack_path(store_path, e.subtree.pack), e.subtree.offset + e.subtree.stored_len - 1)
    target = tmp_path / "t"
    err = keep_going(env, target)
    assert f"{rel}/ (the whole folder)" in err
    want = {k: v for k, v in source_digest(pristine.node).items()
            if k != rel and not k.startswith(rel + "/")}
    got = tree_digest(target)
    assert got.pop(rel)[0] == "d" and got == want


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_missing_only_removes_what_a_killed_restore_left(tmp_path: Path, sig: int) -> None:
    node = tmp_path / "node"
    node.mkdir()
    (node / "a-small").write_bytes(b"small")
    (node / "cluster_membership.uuid").write_text("0b5a6c1e-8d3f-4c2a-9e71-2f6d8a9b0c13")
    (node / "d").mkdir()
    (node / "d" / "huge.bin").write_bytes(os.urandom(96 * MiB))
    (node / "d").chmod(0o750)     # the killed restore leaves it at 0700
    store = create_store(tmp_path / "backups" / "node1")
    backup(store, node, host_id="1")
    store.close()
    env = write_env(tmp_path / "node.env", tmp_path / "backups")
    target = tmp_path / "t"
    proc = subprocess.Popen([sys.executable, "-m", "humiofs", "restore", "-c", str(env),
                             "--to", str(target), "--no-progress"], env=clean_env(), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60

    def writing_huge() -> bool:
        """The 96 MiB file is being written under its temporary name."""
        try:
            return any(p.name.startswith(".humiofs-restore-") and p.stat().st_size > MiB
                       for p in (target / "d").iterdir())
        except FileNotFoundError:
            return False
    try:
        while not writing_huge():
            assert proc.poll() is None, "restore ended before it could be killed"
            assert time.monotonic() < deadline, "no temporary file appeared"
            time.sleep(0.001)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    if sig == signal.SIGTERM:
        assert proc.returncode == 130
        assert b"restore --missing-only" in err and b"generation is intact" not in err
    if sig == signal.SIGKILL:
        assert any(n.startswith(".humiofs-restore-") for n in os.listdir(target / "d"))
    assert (target / "d").stat().st_mode & 0o777 == 0o700
    r = run_cli("restore", "-c", env, "--to", target, "--missing-only")
    assert r.returncode == 0, r.stderr
    assert tree_digest(target) == source_digest(node)


def test_restore_after_a_stopped_one_gives_its_folders_their_attributes(
        copy: tuple[Path, Path], pristine: Pristine, tmp_path: Path) -> None:
    """A restore stopped by a damaged file leaves the folders it made at mode 0700 with
    today's mtime; `restore --missing-only --keep-going` then gives them (and the target) their
    stored mode, owner and times, and leaves no list of them behind."""
    store_path, env = copy
    last = max(rel for rel, e in pristine.entries.items() if "/" in rel and e.data is not None
               and e.data.stored_len > 100)
    ref = pristine.entries[last].data
    assert ref is not None
    flip(pack_path(store_path, ref.pack), ref.offset + 100)
    target = tmp_path / "t"
    restore_fails(env, target)
    assert any((p.stat().st_mode & 0o777) == 0o700 for p in target.rglob("*") if p.is_dir())
    err = keep_going(env, target, "--missing-only")
    want = source_digest(pristine.node)
    want = {rel: v for rel, v in want.items() if v[0] != "f" or rel not in err}
    assert tree_digest(target) == want
    assert not (target / ".humiofs-restore-folders").exists()
    assert (target.stat().st_mode & 0o777) == (pristine.node.stat().st_mode & 0o777)


def test_missing_only_gives_an_empty_target_its_attributes_after_a_stopped_restore(
        copy: tuple[Path, Path], pristine: Pristine, tmp_path: Path) -> None:
    """The target existed, empty, when the first restore began: that restore's, so the
    --missing-only run after it gives it its stored mode too, like every folder it made."""
    store_path, env = copy
    last = max(rel for rel, e in pristine.entries.items() if "/" in rel and e.data is not None
               and e.data.stored_len > 100)
    ref = pristine.entries[last].data
    assert ref is not None
    flip(pack_path(store_path, ref.pack), ref.offset + 100)
    target = tmp_path / "t"
    target.mkdir(mode=0o700)
    assert pristine.node.stat().st_mode & 0o777 != 0o700
    restore_fails(env, target)
    keep_going(env, target, "--missing-only")
    assert (target.stat().st_mode & 0o777) == (pristine.node.stat().st_mode & 0o777)


def test_an_immutable_target_is_one_line(made: tuple[Store, Generation], tmp_path: Path) -> None:
    target = tmp_path / "t"
    target.mkdir()
    if subprocess.run(["chattr", "+i", str(target)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not supported here")
    try:
        env = write_env(tmp_path / "env", made[0].path.parent)
        r = run_cli("restore", "-c", env, "--to", target)
    finally:
        subprocess.run(["chattr", "-i", str(target)], check=True)
    assert r.returncode == 6, r.stdout + r.stderr
    assert r.stderr.count("\n") == 1 and "cannot write into the restore target" in r.stderr
