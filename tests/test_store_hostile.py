"""A hostile store: symlinks, FIFOs and files of the wrong type planted inside it, removed
folders and misleading metadata. Every command refuses or reports it with one line; none
follows a planted symlink, blocks on a FIFO, or deletes data (FORMAT.md 11)."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

import storetools
from conftest import clean_env, make_sample, run_cli, write_env
from storetools import wait_not_racy

pytestmark = pytest.mark.allow_warnings


@pytest.fixture
def stored(tmp_path: Path) -> tuple[Path, Path]:
    """A node backed up once through the CLI: (env file, store)."""
    node = make_sample(tmp_path / "node", size="256K", small_files=10, seed=41)
    wait_not_racy(node)
    (tmp_path / "backups").mkdir()
    env = write_env(tmp_path / "node.env", tmp_path / "backups", directory=node)
    r = run_cli("backup", "-c", env)
    assert r.returncode == 0, r.stderr
    return env, tmp_path / "backups" / "node1"


def _one_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("dangling", [False, True])
def test_backup_never_writes_through_a_symlink_at_lock(stored: tuple[Path, Path], tmp_path: Path,
                                                      dangling: bool) -> None:
    env, store = stored
    victim = tmp_path / "victim"
    if not dangling:
        victim.write_text("precious\n")
    (store / "lock").unlink()
    (store / "lock").symlink_to(victim)
    for cmd in (("backup", "-c", env), ("prune", "-c", env, "--grace", "0")):
        r = run_cli(*cmd)
        assert r.returncode == 5, r.stdout + r.stderr
        assert "is a symlink, not part of a humiofs store: move it out" in _one_line(r.stderr)
    if dangling:
        assert not os.path.lexists(victim)
    else:
        assert victim.read_text() == "precious\n"


@pytest.mark.parametrize("name", ["packs", "generations", "tmp", "keys", "prune", "damaged",
                                  "prune.lock", "packs/00"])
def test_writer_and_prune_refuse_a_symlinked_store_folder(stored: tuple[Path, Path],
                                                         tmp_path: Path, name: str) -> None:
    env, store = stored
    elsewhere = tmp_path / "elsewhere"
    if (store / name).exists():
        shutil.move(store / name, elsewhere)
    elif not name.endswith("lock"):
        elsewhere.mkdir()
    before = sorted(p.name for p in tmp_path.iterdir())
    (store / name).symlink_to(elsewhere)
    for cmd in (("backup", "-c", env), ("prune", "-c", env, "--grace", "0")):
        r = run_cli(*cmd)
        assert r.returncode == 5, r.stdout + r.stderr
        assert (f"{store / name} is a symlink, not part of a humiofs store: move it out"
                in _one_line(r.stderr))
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    r = run_cli("check", "-c", env)
    assert r.returncode != 0 or "move it out" in r.stdout, r.stdout


def test_a_symlinked_backup_dir_and_store_are_the_operator_s_choice(stored: tuple[Path, Path],
                                                                   tmp_path: Path) -> None:
    env, store = stored
    other = tmp_path / "other-disk"
    other.mkdir()
    shutil.move(store, other / "node1")
    store.symlink_to(other / "node1")
    r = run_cli("backup", "-c", env)
    assert r.returncode == 0, r.stderr
    assert len(os.listdir(other / "node1" / "generations")) == 2


def test_a_symlinked_config_or_key_file_is_refused(stored: tuple[Path, Path],
                                                   tmp_path: Path) -> None:
    env, store = stored
    key = next((store / "keys").iterdir())
    shutil.move(key, tmp_path / "key")
    key.symlink_to(tmp_path / "key")
    r = run_cli("backup", "-c", env)
    assert r.returncode == 5, r.stdout + r.stderr
    assert "symlink" in r.stderr
    key.unlink()
    shutil.move(tmp_path / "key", key)
    shutil.move(store / "config", tmp_path / "config")
    (store / "config").symlink_to(tmp_path / "config")
    r = run_cli("ls", "-c", env)
    assert r.returncode == 5, r.stdout + r.stderr
    assert "config is a symlink, not part of a humiofs store" in _one_line(r.stderr)


def _packs(store: Path) -> set[str]:
    return {p.name for p in (store / "packs").glob("*/*")}


def _fresh_host(tmp_path: Path) -> dict[str, str]:
    """The environment of another host (or mount path): no record of the store's newest
    generation."""
    env = clean_env()
    env["BACKUP_STATE_DIR"] = str(tmp_path / "fresh-state")
    return env


def test_foreign_keys_and_a_damaged_config_never_lead_to_deleted_packs(tmp_path: Path) -> None:
    """keys/ from another store (same key) and a damaged config: the config advice does not
    offer the foreign store id; a config written with it anyway gets backup's message from
    check, and prune (with --set-aside-damaged too) refuses and deletes nothing."""
    node = tmp_path / "node"
    node.mkdir()
    (node / "segment").write_bytes(os.urandom(5000))
    (tmp_path / "b").mkdir()
    a = storetools.create_store(tmp_path / "b" / "a")
    b = storetools.create_store(tmp_path / "b" / "other")
    storetools.backup(a, node)
    gens, packs = sorted(os.listdir(a.path / "generations")), _packs(a.path)
    shutil.rmtree(a.path / "keys")
    shutil.copytree(b.path / "keys", a.path / "keys")
    (a.path / "config").write_text("{damaged")
    env = write_env(tmp_path / "env", a.path.parent, name="a", directory=node)
    r = run_cli("check", "-c", env)
    assert r.returncode == 5, r.stdout + r.stderr
    assert b.store_id.hex() not in r.stdout + r.stderr
    assert "write this line" not in r.stderr

    (a.path / "config").write_text(json.dumps({"format": "humiofs-store", "version": 1,
                                               "store_id": b.store_id.hex(), "created_ms": 0}))
    r = run_cli("check", "-c", env)
    assert r.returncode == 5, r.stdout + r.stderr
    assert "No generation of the store opens with the master key" in r.stdout
    assert "--set-aside-damaged` moves" not in r.stdout
    for extra in ((), ("--set-aside-damaged",)):
        r = run_cli("prune", "-c", env, "--grace", "0", *extra)
        assert r.returncode == 5, r.stdout + r.stderr
        assert "No generation of the store opens" in _one_line(r.stderr)
        assert sorted(os.listdir(a.path / "generations")) == gens and _packs(a.path) == packs
    assert not (a.path / "damaged").exists()


def test_an_emptied_generations_folder_is_not_healthy_and_prune_keeps_the_packs(
        stored: tuple[Path, Path], tmp_path: Path) -> None:
    env, store = stored
    packs = _packs(store)
    gdir = store / "generations"
    shutil.move(gdir, tmp_path / "gens-copy")
    r = run_cli("check", "-c", env, env=_fresh_host(tmp_path))
    assert r.returncode == 5, r.stdout + r.stderr
    assert "Put the folder back from a copy of the store, or make an empty one" in r.stdout
    gdir.mkdir(mode=0o700)          # as the advice allows, on a host with no record
    r = run_cli("check", "-c", env, env=_fresh_host(tmp_path))
    assert r.returncode == 5, r.stdout + r.stderr
    assert "but no generation: its generations are missing" in r.stdout
    assert "healthy" not in r.stdout
    r = run_cli("prune", "-c", env, "--grace", "0", env=_fresh_host(tmp_path))
    assert r.returncode == 5, r.stdout + r.stderr
    assert "that no generation and no interrupted backup's journal lists" in _one_line(r.stderr)
    assert _packs(store) == packs
    # The interrupted first backup is no damage: the next backup removes its packs.
    shutil.rmtree(gdir)
    shutil.move(tmp_path / "gens-copy", gdir)
    r = run_cli("check", "-c", env, env=_fresh_host(tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("planted", ["empty", "intact"])
def test_a_name_in_damaged_ends_a_rollback_only_if_that_file_is_damaged(
        stored: tuple[Path, Path], tmp_path: Path, planted: str) -> None:
    env, store = stored
    assert run_cli("backup", "-c", env).returncode == 0
    gdir = store / "generations"
    newest = sorted(os.listdir(gdir))[-1]
    (store / "damaged").mkdir(mode=0o700)
    if planted == "intact":
        shutil.move(gdir / newest, store / "damaged" / newest)
    else:
        (gdir / newest).unlink()
        (store / "damaged" / newest).write_bytes(b"")
    packs = _packs(store)
    r = run_cli("check", "-c", env)
    assert r.returncode == 5, r.stdout + r.stderr
    assert "was rolled back" in r.stdout
    if planted == "intact":
        assert "reads back: it is an intact generation" in r.stdout and "mv " in r.stdout
    r = run_cli("prune", "-c", env, "--grace", "0")
    assert r.returncode == 5, r.stdout + r.stderr
    assert _packs(store) == packs


def test_a_fifo_under_a_generation_s_name_is_a_damaged_generation(stored: tuple[Path, Path],
                                                                   tmp_path: Path) -> None:
    """Nothing blocks on it (each command has a timeout far below the test's), and every
    command takes it for a damaged generation."""
    env, store = stored
    name = f"{int(sorted(os.listdir(store / 'generations'))[-1][:13]) + 1:013d}-{'0' * 16}"
    os.mkfifo(store / "generations" / name, 0o600)
    for cmd, rc in ((("ls", "-c", env), 0), (("check", "-c", env), 5),
                    (("restore", "-c", env, "--to", tmp_path / "r"), 8),
                    (("prune", "-c", env, "--grace", "0"), 5),
                    (("backup", "-c", env), 0)):
        r = run_cli(*cmd, timeout=60)
        assert r.returncode == rc, (cmd, r.stdout, r.stderr)
        assert "Traceback" not in r.stderr
    r = run_cli("check", "-c", env, timeout=60)
    assert f"generation {name}" in r.stdout and "FIFO" in r.stdout


def test_packs_replaced_by_a_file_is_one_line(stored: tuple[Path, Path]) -> None:
    env, store = stored
    (store / "tmp" / "0011223344556677.journal").write_text("pack " + "ab" * 16 + "\n")
    shutil.rmtree(store / "packs")
    (store / "packs").write_text("not a folder")
    r = run_cli("backup", "-c", env)
    assert r.returncode == 5, r.stdout + r.stderr
    assert "packs is not a folder" in _one_line(r.stderr)


def test_a_fifo_as_lock_is_refused_and_reported(stored: tuple[Path, Path]) -> None:
    env, store = stored
    (store / "lock").unlink(missing_ok=True)
    os.mkfifo(store / "lock", 0o600)
    r = run_cli("backup", "-c", env, timeout=60)
    assert r.returncode == 5, r.stdout + r.stderr
    assert "lock is not a regular file" in _one_line(r.stderr)
    r = run_cli("check", "-c", env, timeout=60)
    assert r.returncode == 5, r.stdout + r.stderr
    assert "lock has the wrong type" in r.stdout


def test_lock_text_cannot_act_on_the_terminal(stored: tuple[Path, Path]) -> None:
    """C1 controls (U+009B is CSI), NEL, line separators and bidi overrides in a lock file
    that is not humiofs's JSON are escaped in the message of the writer that finds it held."""
    import fcntl
    env, store = stored
    raw = "pid 1\u009b31m red\u0085next\u2028line\u202egnp.exe\x1b[2J".encode()
    (store / "lock").write_bytes(raw)
    fd = os.open(store / "lock", os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        r = run_cli("backup", "-c", env)
    finally:
        os.close(fd)
    assert r.returncode == 4, r.stdout + r.stderr
    line = _one_line(r.stderr)
    for bad in ("\u009b", "\u0085", "\u2028", "\u202e", "\x1b"):
        assert bad not in line
    assert "\\u009b31m" in line and "\\u202e" in line


def test_restore_at_a_damaged_generation_says_what_to_do(stored: tuple[Path, Path],
                                                          tmp_path: Path) -> None:
    env, store = stored
    name = sorted(os.listdir(store / "generations"))[-1]
    data = bytearray((store / "generations" / name).read_bytes())
    data[40] ^= 1
    (store / "generations" / name).write_bytes(bytes(data))
    r = run_cli("restore", "-c", env, "--at", name, "--to", tmp_path / "r")
    assert r.returncode == 5, r.stdout + r.stderr
    line = _one_line(r.stderr)
    assert f"generation {name}" in line and "Pick another with --at" in line


def test_check_during_a_rollback_does_not_promise_prune(stored: tuple[Path, Path]) -> None:
    env, store = stored
    node = Path(next(ln.split("=", 1)[1] for ln in env.read_text().splitlines()
                     if ln.startswith("DIRECTORY=")))
    (node / "new-segment").write_bytes(os.urandom(50_000))
    assert run_cli("backup", "-c", env).returncode == 0
    (store / "generations" / sorted(os.listdir(store / "generations"))[-1]).unlink()
    r = run_cli("check", "-c", env)
    assert r.returncode == 5, r.stdout + r.stderr
    assert "was rolled back" in r.stdout and "unreferenced pack(s)" in r.stdout
    assert "prune removes them" not in r.stdout
    assert "prune cannot remove them yet" in r.stdout


def test_prune_on_a_damaged_generation_says_once_what_it_did(tmp_path: Path) -> None:
    """Retention drops a generation, and a damaged one keeps every pack: stdout says what was
    removed, stderr is one line (no ERROR: line before it)."""
    node = tmp_path / "node"
    node.mkdir()
    (tmp_path / "backups").mkdir()
    env = write_env(tmp_path / "node.env", tmp_path / "backups", directory=node,
                    DELETE_BACKUP_AFTER_MILLIS="0")
    for i in range(3):
        (node / f"seg{i}").write_bytes(os.urandom(1000))
        if i:
            (node / f"seg{i - 1}").unlink()
        wait_not_racy(node)
        assert run_cli("backup", "-c", env).returncode == 0
    store = tmp_path / "backups" / "node1"
    newest = sorted(os.listdir(store / "generations"))[-1]
    data = bytearray((store / "generations" / newest).read_bytes())
    data[40] ^= 1
    (store / "generations" / newest).write_bytes(bytes(data))
    r = run_cli("prune", "-c", env, "--grace", "0")
    assert r.returncode == 5, r.stdout + r.stderr
    assert "--set-aside-damaged" in _one_line(r.stderr)
    assert "ERROR" not in r.stderr
    import re
    m = re.search(r"keep (\d+) of (\d+) generations", r.stdout)
    assert m, r.stdout
    kept, total = int(m.group(1)), int(m.group(2))
    if kept < total:
        assert f"(removed {total - kept} by retention: " in r.stdout


def test_a_folder_in_tmp_is_removed_by_the_next_backup(stored: tuple[Path, Path],
                                                       tmp_path: Path) -> None:
    """tmp/ holds only a running writer's files: a folder there (nested, holding symlinks to
    a file and a folder outside the store) is removed with a warning, nothing it points to."""
    env, store = stored
    outside = tmp_path / "outside"
    (outside / "sub").mkdir(parents=True)
    (outside / "precious").write_text("keep me")
    (outside / "sub" / "also").write_text("keep me too")
    planted = store / "tmp" / "dd"
    (planted / "deeper").mkdir(parents=True)
    (planted / "deeper" / "file").write_bytes(b"x" * 1000)
    (planted / "to-file").symlink_to(outside / "precious")
    (planted / "deeper" / "to-folder").symlink_to(outside / "sub")
    (store / "tmp" / "to-outside").symlink_to(outside)
    r = run_cli("check", "-c", env)
    assert r.returncode == 0 and "the next backup removes them" in r.stdout, r.stdout + r.stderr
    r = run_cli("backup", "-c", env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"removed the folder {planted} and what it held" in r.stderr
    assert os.listdir(store / "tmp") == []
    assert (outside / "precious").read_text() == "keep me"
    assert (outside / "sub" / "also").read_text() == "keep me too"
    r = run_cli("check", "-c", env)
    assert r.returncode == 0 and "tmp/" not in r.stdout, r.stdout + r.stderr


def test_a_removed_empty_packs_folder_is_made_again(stored: tuple[Path, Path]) -> None:
    """`find packs -type d -empty -delete`, then a backup with new data: the folders its packs
    go in are made again (0700, with a warning); check still names the others missing."""
    env, store = stored
    node = Path(next(ln.split("=", 1)[1] for ln in env.read_text().splitlines()
                     if ln.startswith("DIRECTORY=")))
    for folder in (store / "packs").iterdir():
        if not any(folder.iterdir()):
            folder.rmdir()
    before = set(os.listdir(store / "packs"))
    assert len(before) < 16
    made: set[str] = set()
    for i in range(5):      # a new pack goes into a removed folder 15 times in 16 or more
        (node / f"new-{i}").write_bytes(os.urandom(100_000))
        r = run_cli("backup", "-c", env)
        assert r.returncode == 0, r.stdout + r.stderr
        made = set(os.listdir(store / "packs")) - before
        if made:
            break
    assert made, "no pack went into a removed folder"
    for name in made:
        assert os.stat(store / "packs" / name).st_mode & 0o777 == 0o700
        assert f"{store / 'packs' / name} was missing; made it again" in r.stderr
    r = run_cli("check", "-c", env)
    assert r.returncode == 5 and "is missing from the store (the writer needs it)" in r.stdout
    assert "fails authentication" not in r.stdout and "pack " not in r.stdout, r.stdout
    restored = store.parent.parent / "restored"
    r = run_cli("restore", "-c", env, "--to", restored)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (restored / f"new-{i}").read_bytes() == (node / f"new-{i}").read_bytes()


def test_ls_lists_every_store_past_a_damaged_one(stored: tuple[Path, Path],
                                                  tmp_path: Path) -> None:
    """BACKUP_DIR with `alias`, `bad` (its config a folder) and `good`: all three are listed,
    `bad` with its error (in --json its `error`), and ls exits 5 with one error line."""
    env, store = stored
    backups = store.parent
    shutil.copytree(store, backups / "alias")
    shutil.copytree(store, backups / "good")
    store.rename(backups / "bad")
    (backups / "bad" / "config").unlink()
    (backups / "bad" / "config").mkdir()
    all_env = write_env(tmp_path / "all.env", backups, name=None)
    r = run_cli("ls", "-c", all_env)
    assert r.returncode == 5, r.stdout + r.stderr
    heads = [ln.split(":")[0] for ln in r.stdout.splitlines() if not ln.startswith(" ")]
    assert heads == ["alias", "bad", "good"], r.stdout
    assert "bad: cannot be listed: " in r.stdout and "config is a folder" in r.stdout
    assert "config is a folder" in _one_line(r.stderr)
    r = run_cli("ls", "-c", all_env, "--json")
    assert r.returncode == 5, r.stdout + r.stderr
    objs = [json.loads(ln) for ln in r.stdout.splitlines()]
    assert [(o["store"], o["opened"], o["error"] is None, len(o["generations"]))
            for o in objs] == [("alias", True, True, 1), ("bad", False, False, 0),
                               ("good", True, True, 1)]
    assert "config is a folder" in objs[1]["error"]
    (backups / "worse" / "keys").mkdir(parents=True)     # a store that lost its config
    r = run_cli("ls", "-c", all_env)
    assert r.returncode == 5, r.stdout + r.stderr
    assert "2 of 4 stores could not be listed (bad, worse)" in _one_line(r.stderr)
    assert "good: 1 generation(s)" in r.stdout
