"""`humiofs check`: a healthy store reports nothing; every kind of damage is found and named
with the node files and generations it affects; exit codes."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import storetools
from conftest import KEY, make_sample, run_cli, write_env
from storetools import FAST_KDF, flip

from humiofs.check import Checker, Report, parse_subset
from humiofs.errors import EXIT_DAMAGED, EXIT_OK, EXIT_WRONG_KEY
from humiofs.store import crypto
from humiofs.store.format import DIR, FILE, Generation, Ref
from humiofs.store.repository import Store


def backup(store: Store, source: Path) -> Generation:
    return storetools.backup(store, source, settle=True)[0]






def walk(store: Store, ref: Ref, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for e in store.read_tree(ref):
        rel = prefix + os.fsdecode(e.name)
        out[rel] = e
        if e.type == DIR:
            assert e.subtree is not None
            out.update(walk(store, e.subtree, rel + "/"))
    return out


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store with two generations of a small node; tests damage copies of it."""
    base = tmp_path_factory.mktemp("check")
    node = make_sample(base / "node", size="3M", small_files=40, seed=5)
    (base / "backup").mkdir()
    store = Store.create(base / "backup" / "node1", KEY, FAST_KDF)
    backup(store, node)
    (node / "globaldata-extra.json").write_text("{}")
    backup(store, node)
    store.close()
    return base / "backup" / "node1"


@pytest.fixture
def damaged(pristine: Path, tmp_path: Path) -> Store:
    """A fresh copy of the pristine store, to damage."""
    dest = tmp_path / "backup" / "node1"
    shutil.copytree(pristine, dest)
    return Store.open(dest, KEY)


def check(store: Store, **kw: object) -> Report:
    try:
        return Checker(store, KEY, **kw).run()  # type: ignore[arg-type]
    finally:
        store.close()


def latest(store: Store) -> Generation:
    return store.load_generation(store.list_generations()[-1])


def big_file(store: Store) -> tuple[str, Ref]:
    """The path and data ref of the largest file (a segment, in a pack of its own)."""
    entries = walk(store, latest(store).root.tree)
    rel, e = max(((r, e) for r, e in entries.items() if e.type == FILE and e.data),  # type: ignore
                 key=lambda item: item[1].data.plain_len)  # type: ignore[attr-defined]
    return rel, e.data  # type: ignore[attr-defined]


def only_problem(report: Report, kind: str) -> tuple[str, set[str], set[str]]:
    assert len(report.problems) == 1, report.problems
    (k, _), p = next(iter(report.problems.items()))
    assert k == kind, (k, p.message)
    return p.message, p.paths, p.generations


def test_healthy_store_reports_nothing(pristine: Path, tmp_path: Path) -> None:
    env = write_env(tmp_path / "env", pristine.parent)
    r = run_cli("check", "--config", env, "--read-data")
    assert r.returncode == EXIT_OK, r.stdout + r.stderr
    assert "problem" not in r.stdout and r.stderr == ""
    assert "healthy" in r.stdout


def test_flipped_byte_in_data_pack(damaged: Store) -> None:
    rel, ref = big_file(damaged)
    flip(damaged.pack_path(ref.pack), ref.offset + 1000)
    msg, paths, gens = only_problem(check(Store.open(damaged.path, KEY), read_data=True), "auth")
    assert ref.pack.hex() in msg
    assert "it holds file data: move the pack file out of the store" in msg
    assert "folder listings" not in msg
    assert paths == {rel}
    assert gens == set(damaged.list_generations())


def test_flipped_byte_in_last_chunk_found_without_read_data(damaged: Store) -> None:
    rel, ref = big_file(damaged)
    flip(damaged.pack_path(ref.pack), ref.offset + ref.stored_len - 3)
    _, paths, _ = only_problem(check(damaged), "auth")
    assert paths == {rel}


def test_flipped_byte_in_tree_pack(damaged: Store) -> None:
    gen = latest(damaged)
    entries = walk(damaged, gen.root.tree)
    rel, sub = next((r, e) for r, e in entries.items() if r.startswith("dataspace_"))
    ref = sub.subtree  # type: ignore[attr-defined]
    flip(damaged.pack_path(ref.pack), ref.offset + 20)
    msg, paths, gens = only_problem(check(damaged), "auth")
    assert paths == {f"{rel}/ (the whole folder)"}
    assert gens == set(damaged.list_generations())
    # Moving a pack of folder listings out would lose every folder it lists: leave it.
    assert "it holds folder listings: leave it in the store and run a backup" in msg
    assert "move the pack file out" not in msg


def test_empty_pack_is_left_to_the_next_backup(damaged: Store) -> None:
    rel, ref = big_file(damaged)
    os.truncate(damaged.pack_path(ref.pack), 0)
    msg, paths, _ = only_problem(check(damaged), "header")
    assert "cut short (0 bytes" in msg and "leave it where it is" in msg
    assert "move" not in msg and paths == {rel}


def test_flipped_byte_in_generation(damaged: Store) -> None:
    name = damaged.list_generations()[0]
    flip(damaged.path / "generations" / name, 40)
    msg, _, gens = only_problem(check(damaged), "generation")
    assert gens == {name} and name in msg


def test_truncated_pack(damaged: Store) -> None:
    rel, ref = big_file(damaged)
    path = damaged.pack_path(ref.pack)
    os.truncate(path, path.stat().st_size - 100)
    msg, paths, _ = only_problem(check(damaged), "truncated")
    assert paths == {rel} and "truncated" in msg


def test_deleted_pack(damaged: Store) -> None:
    rel, ref = big_file(damaged)
    os.unlink(damaged.pack_path(ref.pack))
    msg, paths, gens = only_problem(check(damaged), "missing")
    assert paths == {rel} and "missing" in msg and len(gens) == 2


def test_swapped_packs(damaged: Store) -> None:
    entries = walk(damaged, latest(damaged).root.tree)
    big = sorted(((r, e.data) for r, e in entries.items()  # type: ignore[attr-defined]
                  if e.type == FILE and e.data and e.data.plain_len >= 1 << 20),  # type: ignore
                 key=lambda x: x[0])
    (rel_a, a), (rel_b, b) = big[0], big[1]
    pa, pb = damaged.pack_path(a.pack), damaged.pack_path(b.pack)
    tmp = pa.with_name("swap")
    os.rename(pa, tmp)
    os.rename(pb, pa)
    os.rename(tmp, pb)
    report = check(damaged)
    affected = set().union(*(p.paths for p in report.problems.values()))
    assert {rel_a, rel_b} <= affected
    assert all(k[0] in ("auth", "truncated") for k in report.problems)


def test_stray_files_are_warnings_not_damage(damaged: Store) -> None:
    (damaged.path / "notes.txt").write_text("x")
    (damaged.path / "packs" / "00" / "README").write_text("x")
    (damaged.path / "generations" / "latest").write_text("x")
    (damaged.path / "packs" / "zz").mkdir()
    report = check(damaged)
    assert report.healthy, report.problems
    found = {w.split()[0] for w in report.warnings}
    assert found == {"notes.txt", "packs/00/README", "generations/latest", "packs/zz"}


def test_cli_stray_file_is_a_warning_exit_0(damaged: Store, tmp_path: Path) -> None:
    """A file the store does not use (an editor's backup, a note) is no damage: check says
    where it is and that nothing depends on it, and exits 0."""
    (damaged.path / "generations" / "notes.txt").write_text("x")
    env = write_env(tmp_path / "env", damaged.path.parent)
    r = run_cli("check", "--config", env)
    assert r.returncode == EXIT_OK, r.stdout + r.stderr
    assert "warning: generations/notes.txt is not part of a humiofs store" in r.stdout
    assert "DAMAGED" not in r.stdout and "healthy, 1 warning(s)" in r.stdout


def test_a_required_folder_of_the_wrong_type_is_damage(damaged: Store) -> None:
    shutil.rmtree(damaged.path / "tmp")
    (damaged.path / "tmp").write_text("x")
    msg, _, _ = only_problem(check(damaged), "layout")
    # The writer needs tmp/: the message must not say that nothing depends on it.
    assert "tmp has the wrong type (a folder is expected)" == msg


def test_pack_in_wrong_folder(damaged: Store) -> None:
    rel, ref = big_file(damaged)
    h = ref.pack.hex()
    wrong = "00" if not h.startswith("00") else "01"
    os.rename(damaged.pack_path(ref.pack), damaged.path / "packs" / wrong / h)
    report = check(damaged)
    assert any(w.startswith(f"packs/{wrong}/{h} is a pack in the wrong folder")
               for w in report.warnings)
    assert report.problems[("missing", h)].paths == {rel}


def test_damaged_key_file(damaged: Store) -> None:
    (damaged.path / "keys" / ("ab" * 16)).write_text('{"version": 1}')
    _, paths, _ = only_problem(check(damaged), "key")
    assert not paths


def test_unreferenced_pack_is_a_note_not_damage(damaged: Store) -> None:
    pack = damaged.new_pack()
    pack.add(crypto.KIND_DATA, b"leftover of an interrupted run")
    pack.finish()
    report = check(damaged)
    assert report.healthy
    assert any("1 unreferenced pack" in n for n in report.notes)


def test_read_data_subset_covers_all(damaged: Store) -> None:
    rel, ref = big_file(damaged)
    flip(damaged.pack_path(ref.pack), ref.offset + 5000)
    hits = []
    for n in (1, 2, 3):
        report = check(Store.open(damaged.path, KEY), subset=parse_subset(f"{n}/3"))
        if report.problems:
            hits.append(n)
            assert report.problems[("auth", ref.pack.hex())].paths == {rel}
    assert hits == [int.from_bytes(ref.pack, "big") % 3 + 1]
    assert check(Store.open(damaged.path, KEY), subset=parse_subset("100%")).problems


def test_parse_subset_rejects_nonsense() -> None:
    for bad in ("0/3", "4/3", "x", "0%", "101%"):
        with pytest.raises(ValueError):
            parse_subset(bad)


def test_cli_damaged_exit_code_and_report(damaged: Store, tmp_path: Path) -> None:
    rel, ref = big_file(damaged)
    os.unlink(damaged.pack_path(ref.pack))
    env = write_env(tmp_path / "env", damaged.path.parent)
    r = run_cli("check", "--config", env)
    assert r.returncode == EXIT_DAMAGED, r.stdout + r.stderr
    assert f"pack {ref.pack.hex()} is missing" in r.stdout
    assert f"    {rel}" in r.stdout
    assert "including the latest" in r.stdout and "DAMAGED" in r.stdout


def test_cli_wrong_key(pristine: Path, tmp_path: Path) -> None:
    env = write_env(tmp_path / "env", pristine.parent, key="not the key at all")
    r = run_cli("check", "--config", env)
    assert r.returncode == EXIT_WRONG_KEY, r.stdout + r.stderr


def test_help_is_self_contained() -> None:
    r = run_cli("check", "--help")
    assert r.returncode == 0
    for word in ("--read-data-subset", "What to do after a bad check", "5 damaged"):
        assert word in r.stdout


# -- damaged store metadata is not a wrong key --------------------------------------------------

def check_cli(store: Store, tmp_path: Path, key: str = KEY) -> tuple[int, str]:
    env = write_env(tmp_path / "env", store.path.parent, key=key)
    r = run_cli("check", "--config", env)
    return r.returncode, r.stdout + r.stderr


def test_no_key_file_is_damage_not_a_wrong_key(damaged: Store, tmp_path: Path) -> None:
    for f in (damaged.path / "keys").iterdir():
        f.unlink()
    rc, out = check_cli(damaged, tmp_path)
    assert rc == EXIT_DAMAGED, out
    assert "has no key file" in out and "this is not a wrong key" in out
    assert "delete" not in out and "Check the key first" not in out


def test_changed_store_id_in_config_says_how_to_repair_it(damaged: Store, tmp_path: Path) -> None:
    config = damaged.path / "config"
    doc = json.loads(config.read_text())
    right = doc["store_id"]
    doc["store_id"] = ("1" if right[0] != "1" else "2") + right[1:]   # one digit changed
    config.write_text(json.dumps(doc))
    rc, out = check_cli(damaged, tmp_path)
    assert rc == EXIT_DAMAGED, out
    assert f"{config} is damaged" in out and f"back to {right}" in out
    assert "key files are right" in out and "delete" not in out
    # Following the advice repairs it.
    doc["store_id"] = right
    config.write_text(json.dumps(doc))
    rc, out = check_cli(damaged, tmp_path)
    assert rc == EXIT_OK, out


def test_damaged_only_key_file_is_damage(damaged: Store, tmp_path: Path) -> None:
    (key_file,) = (damaged.path / "keys").iterdir()
    key_file.write_text(key_file.read_text()[:40])
    rc, out = check_cli(damaged, tmp_path)
    assert rc == EXIT_DAMAGED, out
    assert "every key file of the store" in out and "is damaged" in out and "delete" not in out


def test_missing_config_is_damage_and_backup_does_not_start_over(damaged: Store,
                                                                   tmp_path: Path) -> None:
    config = damaged.path / "config"
    text = config.read_text()
    config.unlink()
    rc, out = check_cli(damaged, tmp_path)
    assert rc == EXIT_DAMAGED, out
    assert f"{config} is missing" in out
    assert json.loads(text)["store_id"] in out        # the line to write back is given
    node = tmp_path / "node"
    node.mkdir()
    env = write_env(tmp_path / "backup.env", damaged.path.parent, directory=node)
    r = run_cli("backup", "--config", env)
    assert r.returncode == EXIT_DAMAGED, r.stdout + r.stderr
    assert not config.exists() and len(damaged.list_generations()) == 2


def test_wrong_key_never_advises_deleting_the_store(damaged: Store, tmp_path: Path) -> None:
    rc, out = check_cli(damaged, tmp_path, key="not the key at all")
    assert rc == EXIT_WRONG_KEY, out
    assert "Check the key first" in out and "delete" not in out and "keep this store" in out


def test_moving_a_damaged_pack_aside_lets_the_next_backup_heal(tmp_path: Path) -> None:
    """What check --help says to do about a pack that fails authentication: move it out of
    the store and run a backup, which then reads its files again."""
    node = make_sample(tmp_path / "node", size="2M", small_files=20, seed=7)
    (tmp_path / "backups").mkdir()
    env = write_env(tmp_path / "node.env", tmp_path / "backups", directory=node)
    assert run_cli("backup", "-c", env).returncode == 0
    store = Store.open(tmp_path / "backups" / "node1", KEY)
    rel, ref = big_file(store)
    store.close()
    flip(store.pack_path(ref.pack), ref.offset + ref.stored_len - 3)
    r = run_cli("check", "-c", env)
    assert r.returncode == 5 and "fails authentication" in r.stdout and rel in r.stdout
    os.rename(store.pack_path(ref.pack), tmp_path / "quarantined-pack")
    r = run_cli("backup", "-c", env)
    assert r.returncode == 8 and rel in r.stderr, r.stdout + r.stderr
    r = run_cli("check", "-c", env)
    assert r.returncode == 5 and "is missing" in r.stdout
    assert "including the latest" not in r.stdout, r.stdout
    r = run_cli("restore", "-c", env, "--to", tmp_path / "r")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "r" / rel).read_bytes() == (node / rel).read_bytes()


def test_help_describes_every_finding() -> None:
    r = run_cli("check", "--help")
    for finding in ("is missing, or is truncated", "fails authentication", "cannot be read",
                    "was rolled back", "key file keys/", "warning:", "note:", "--keep-going"):
        assert finding in r.stdout, finding
