"""Real mounts while BACKUP_DIR changes under them or is not what it should be: a store moved
away, deleted or put back, stores of other keys, and a BACKUP_DIR that is no readable folder."""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from conftest import run_cli, write_env
from mountutil import Mount, backup, create_store, is_mounted, tiny_node, wait_for

pytestmark = [pytest.mark.skipif(not os.path.exists("/dev/fuse")
                                 or not shutil.which("fusermount3"),
                                 reason="needs FUSE (/dev/fuse and fusermount3)"),
              pytest.mark.allow_warnings]


def two_stores(root: Path, names: tuple[str, ...] = ("c", "d"), key: str | None = None) -> Path:
    """BACKUP_DIR with one backed-up store per name, each of a node holding a file `which`."""
    backups = root / "backups"
    for name in names:
        store = create_store(backups / name, **({"key": key} if key else {}))
        backup(store, tiny_node(root / f"node-{name}", {"which": name.encode()}))
        store.close()
    return backups


def entries(path: Path) -> list[str]:
    return sorted(n for n in os.listdir(path) if n != ".generations")


def test_a_store_moved_away_leaves_only_itself_and_comes_back(tmp_path: Path) -> None:
    backups = two_stores(tmp_path)
    env = write_env(tmp_path / "m.env", backups, name=None)
    with Mount(env, tmp_path / "mnt") as m:
        assert entries(m.path) == ["c", "d"]
        os.rename(backups / "c", tmp_path / "c-elsewhere")
        wait_for(lambda: entries(m.path) == ["d"], "c to leave the root")
        assert (m.path / "d" / "which").read_bytes() == b"d"
        wait_for(lambda: entries(m.path / ".generations") == ["d"], "c to leave .generations")
        assert len(entries(m.path / ".generations" / "d")) == 1
        # The kernel keeps a root entry up to VOLATILE_TIMEOUT (1 s); then c is ENOENT.
        wait_for(lambda: not (m.path / "c").exists(), "c to be ENOENT")
        os.rename(tmp_path / "c-elsewhere", backups / "c")
        wait_for(lambda: entries(m.path) == ["c", "d"], "c to come back")
        assert (m.path / "c" / "which").read_bytes() == b"c"
        assert entries(m.path / ".generations") == ["c", "d"]
        log = m.stderr()
    assert log.count("backup c went away") == 1, log
    assert "mkdir" not in log and "Traceback" not in log, log


def test_a_store_deleted_leaves_only_itself(tmp_path: Path) -> None:
    backups = two_stores(tmp_path)
    env = write_env(tmp_path / "m.env", backups, name=None)
    with Mount(env, tmp_path / "mnt") as m:
        assert (m.path / "d" / "which").read_bytes() == b"d"
        held = m.path / ".generations" / "d"
        assert len(entries(held)) == 1
        shutil.rmtree(backups / "d")
        wait_for(lambda: entries(m.path) == ["c"], "d to leave the root")
        assert entries(m.path / ".generations") == ["c"]
        assert (m.path / "c" / "which").read_bytes() == b"c"
        log = m.stderr()
    assert log.count("backup d went away") == 1, log
    assert "mkdir" not in log and "Traceback" not in log, log


def test_only_stores_of_other_keys_mount_empty_then_show_this_keys(tmp_path: Path) -> None:
    backups = two_stores(tmp_path, ("a", "b"), key="somebody else's key")
    env = write_env(tmp_path / "m.env", backups, name=None)
    with Mount(env, tmp_path / "mnt") as m:
        assert entries(m.path) == []
        store = create_store(backups / "mine")
        backup(store, tiny_node(tmp_path / "node-mine", {"which": b"mine"}))
        store.close()
        wait_for(lambda: "mine" in entries(m.path), "this key's store to appear")
        assert (m.path / "mine" / "which").read_bytes() == b"mine"
        assert entries(m.path) == ["mine"]
        log = m.stderr()
    for name in ("a", "b"):
        assert log.count(f"does not open the backup {name};") == 1, log


def test_name_of_a_store_of_another_key_still_refuses(tmp_path: Path) -> None:
    backups = two_stores(tmp_path, ("a",), key="somebody else's key")
    env = write_env(tmp_path / "m.env", backups, name=None)
    (tmp_path / "m").mkdir()
    done = run_cli("mount", "--config", env, "--name", "a", tmp_path / "m", timeout=60)
    assert done.returncode == 3, done.stderr
    assert not is_mounted(tmp_path / "m")


@pytest.mark.parametrize("kind", ["file", "loop", "unreadable"])
def test_backup_dir_no_readable_folder_is_exit_2(kind: str, tmp_path: Path) -> None:
    if kind == "unreadable":    # nobody must reach it: pytest's own folders are root's only
        tmp_path = Path(tempfile.mkdtemp(prefix="humiofs-nobody-"))
        os.chmod(tmp_path, 0o755)
    backups = tmp_path / "backups"
    if kind == "file":
        backups.write_text("not a folder\n")
    elif kind == "loop":
        os.symlink(backups, backups)
    else:
        two_stores(tmp_path, ("a",))
        os.chmod(backups, 0)
    env = write_env(tmp_path / "m.env", backups, name=None)
    (tmp_path / "m").mkdir()
    os.chmod(tmp_path, 0o755)
    os.chmod(env, 0o644)
    for name in ((), ("--name", "a")):
        cmd: list[str | Path] = ["mount", "--config", env, tmp_path / "m", *name]
        done = (run_as_nobody(cmd) if kind == "unreadable" else run_cli(*cmd, timeout=60))
        assert done.returncode == 2, done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and "BACKUP_DIR" in lines[0] and "damaged" not in lines[0], lines
    assert not is_mounted(tmp_path / "m")
    if kind == "unreadable":
        os.chmod(backups, 0o700)
        shutil.rmtree(tmp_path)


def run_as_nobody(args: list[str | Path]) -> subprocess.CompletedProcess[str]:
    """run_cli as the user nobody (root reads anything): the tree must be open to it."""
    import sys

    from conftest import ROOT, clean_env
    env = clean_env()
    return subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
                           sys.executable, "-m", "humiofs", *map(str, args)], env=env,
                          text=True, capture_output=True, timeout=60, cwd=ROOT)


@pytest.mark.parametrize("what", ["config", "folder"])
def test_a_store_this_user_may_not_read_is_left_out(what: str) -> None:
    """As the user nobody (FUSE mounts need root here, so the mount's opening of BACKUP_DIR
    runs without the kernel mount: tree.Tree.from_backup_dir, as `mount` calls it)."""
    import sys

    from conftest import KEY, ROOT, clean_env
    root = Path(tempfile.mkdtemp(prefix="humiofs-nobody-"))
    try:
        os.chmod(root, 0o755)
        backups = two_stores(root, ("a", "b"))
        subprocess.run(["chown", "-R", "nobody:nogroup", str(root)], check=True)
        if what == "config":
            os.chown(backups / "a" / "config", 0, 0)
        else:
            os.chown(backups / "a", 0, 0)
        env = clean_env()
        env["BACKUP_STATE_DIR"] = str(root / "state")
        code = ("import sys; from pathlib import Path; from humiofs.mount.tree import Tree; "
                "t = Tree.from_backup_dir(Path(sys.argv[1]), sys.argv[2]); "
                "print(*[n for n, g in t.shown() if g]); t.close()")
        done = subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
                               sys.executable, "-c", code, str(backups), KEY], env=env,
                              text=True, capture_output=True, timeout=60, cwd=ROOT)
        assert done.returncode == 0, done.stderr
        assert done.stdout.split() == ["b"]
        assert "backup a is left out of the mount" in done.stderr
        assert "Permission denied" in done.stderr and "Traceback" not in done.stderr
    finally:
        shutil.rmtree(root)
