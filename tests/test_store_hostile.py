"""A hostile store: symlinks, FIFOs and files of the wrong type planted inside it, removed
folders and misleading metadata. Every command refuses or reports it with one line; none
follows a planted symlink, blocks on a FIFO, or deletes data (FORMAT.md 11)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from conftest import make_sample, run_cli, write_env
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
