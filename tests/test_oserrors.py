"""What the OS can refuse, as a user meets it: one line, a documented exit code, no traceback.
A store on a read-only filesystem (a read-only bind mount) refuses writers with exit 7 and
still checks, lists and restores."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import KEY, clean_env, run_cli
from mountutil import DEADLINE_S, backup, create_store, tiny_node
from storetools import wait_not_racy


def _cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    env = clean_env()
    env["BACKUP_KEY"] = KEY
    return run_cli(*args, env=env)


def _one_line(proc: subprocess.CompletedProcess[str], code: int, says: str) -> None:
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("humiofs: error: ") and says in lines[0], \
        proc.stderr


@pytest.fixture(scope="module")
def ro_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """BACKUP_DIR holding store node1, seen through a read-only bind mount (returned)."""
    tmp = tmp_path_factory.mktemp("ro")
    store = create_store(tmp / "backup" / "node1")
    backup(store, tiny_node(tmp / "node", {"segments/a": b"hello"}))
    ro = tmp / "ro"
    ro.mkdir()
    subprocess.run(["mount", "--bind", str(tmp / "backup"), str(ro)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(ro)], check=True)
        yield ro
    finally:
        # Lazily if need be: a mount server that has not exited yet may hold a pack open.
        if subprocess.run(["umount", str(ro)]).returncode != 0:
            subprocess.run(["umount", "-l", str(ro)], check=True)


@pytest.mark.parametrize("command", [["backup"], ["prune"],
                                     ["key", "change", "--new-key-file", "NEW"]])
def test_writers_on_a_read_only_store_exit_7(ro_store: Path, command: list[str]) -> None:
    node = ro_store.parent / "node"
    (ro_store.parent / "new.key").write_text("another key of some length\n")
    command = [str(ro_store.parent / "new.key") if a == "NEW" else a for a in command]
    proc = _cli(*command, "--backup-dir", ro_store, "--name", "node1",
                *(["--directory", node] if command == ["backup"] else []))
    _one_line(proc, 7, "the backup disk is read-only")


def test_a_new_store_on_a_read_only_disk_exits_7(ro_store: Path) -> None:
    proc = _cli("backup", "--backup-dir", ro_store, "--name", "other",
                "--directory", ro_store.parent / "node")
    _one_line(proc, 7, "the backup disk is read-only")


def test_check_ls_restore_work_on_a_read_only_store(ro_store: Path, tmp_path: Path) -> None:
    # No prune.lock in the store (it has never been checked or pruned): check may not make it.
    assert not (ro_store / "node1" / "prune.lock").exists()
    proc = _cli("check", "--read-data", "--backup-dir", ro_store, "--name", "node1")
    assert proc.returncode == 0 and "healthy" in proc.stdout, proc.stderr
    assert _cli("ls", "--backup-dir", ro_store).returncode == 0
    proc = _cli("restore", "--backup-dir", ro_store, "--name", "node1", "--to", tmp_path / "r")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "r" / "segments" / "a").read_bytes() == b"hello"


def test_check_on_a_read_only_store_with_a_prune_lock(tmp_path: Path) -> None:
    store = create_store(tmp_path / "backup" / "node1")
    backup(store, tiny_node(tmp_path / "node", {"a": b"x"}))
    (tmp_path / "backup" / "node1" / "prune.lock").touch(mode=0o600)
    ro = tmp_path / "ro"
    ro.mkdir()
    subprocess.run(["mount", "--bind", "-o", "ro", str(tmp_path / "backup"), str(ro)],
                   check=True)
    try:
        proc = _cli("check", "--backup-dir", ro, "--name", "node1")
        assert proc.returncode == 0, proc.stderr
    finally:
        subprocess.run(["umount", str(ro)], check=True)


@pytest.fixture(scope="module")
def paths(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store, a node, a file, a folder and a symlink loop to point settings at."""
    tmp_path = tmp_path_factory.mktemp("paths")
    store = create_store(tmp_path / "backup" / "node1")
    backup(store, tiny_node(tmp_path / "node", {"a": b"x"}))
    (tmp_path / "file").write_text("x")
    (tmp_path / "folder").mkdir()
    (tmp_path / "loop1").symlink_to("loop2")
    (tmp_path / "loop2").symlink_to("loop1")
    return tmp_path


CASES = [
    # (arguments, exit code, words in the line); paths are relative to the test folder
    (["backup", "--backup-dir", "file"], 2, "BACKUP_DIR"),
    (["backup", "--backup-dir", "loop1"], 2, "BACKUP_DIR"),
    (["backup", "--directory", "file"], 2, "DIRECTORY"),
    (["backup", "--directory", "loop1"], 2, "DIRECTORY"),
    (["backup", "--config", "folder"], 2, "env file"),
    (["backup", "--config", "loop1"], 2, "Too many levels of symbolic links"),
    (["backup", "--config", "file/x"], 2, "Not a directory"),
    (["backup", "--key-file", "folder"], 2, "key file"),
    (["backup", "--key-file", "loop1"], 2, "Too many levels of symbolic links"),
    (["restore", "--to", "file"], 6, "not a folder"),
    (["restore", "--to", "loop1"], 6, "restore target"),
    (["restore", "--to", "file/x"], 6, "Not a directory"),
    (["mount", "--log", "folder", "mnt"], 2, "log file"),
    (["check", "--backup-dir", "file"], 2, "no humiofs store"),
    (["check", "--backup-dir", "loop1"], 2, "no humiofs store"),
    (["restore", "--backup-dir", "file", "--to", "r"], 2, "no humiofs store"),
    (["ls", "--backup-dir", "file"], 2, "no humiofs store"),
    (["ls", "--backup-dir", "loop1"], 2, "no humiofs store"),
    (["backup", "--backup-dir", "folder", "--name", "n" * 300], 2, "BACKUP_NAME"),
    (["backup", "--backup-dir", "folder/" + "d" * 300], 2, "File name too long"),
    (["ls", "--backup-dir", "folder/" + "d" * 300], 2, "File name too long"),
    (["check", "--backup-dir", "folder/" + "d" * 300], 2, "File name too long"),
]


@pytest.mark.parametrize("args,code,says", CASES)
def test_bad_paths_give_one_line(paths: Path, args: list[str], code: int, says: str) -> None:
    base = ["--backup-dir", paths / "backup"] + (
        ["--name", "node1"] if args[0] != "mount" else [])
    if args[0] == "backup" and "--directory" not in args:
        base += ["--directory", paths / "node"]
    (paths / "mnt").mkdir(exist_ok=True)
    proc = subprocess.run([sys.executable, "-m", "humiofs", args[0], *map(str, base),
                           *args[1:]], env={**clean_env(), "BACKUP_KEY": KEY},
                          capture_output=True, text=True, timeout=120, cwd=paths)
    _one_line(proc, code, says)


@pytest.fixture(scope="module")
def locked_out(request: pytest.FixtureRequest) -> Path:
    """BACKUP_DIR (mode 755) with store `open` (config readable) and store `shut` (config
    mode 000), and `closed`, a BACKUP_DIR of mode 700: what user nobody meets."""
    # Not under pytest's folders: nobody cannot pass through them.
    tmp = Path(tempfile.mkdtemp(prefix="humiofs-locked-"))
    request.addfinalizer(lambda: shutil.rmtree(tmp, ignore_errors=True))
    os.chmod(tmp, 0o755)
    for name in ("open", "shut"):
        store = create_store(tmp / "backup" / name)
        backup(store, tiny_node(tmp / f"node-{name}", {"a": b"x"}))
        for folder, dirs, files in os.walk(tmp / "backup" / name):
            os.chmod(folder, 0o755)
            for f in files:
                os.chmod(os.path.join(folder, f), 0o644)
    os.chmod(tmp / "backup", 0o755)
    os.chmod(tmp / "backup" / "shut" / "config", 0)
    (tmp / "closed").mkdir(mode=0o700)
    (tmp / "state").mkdir(mode=0o777)
    os.chmod(tmp / "state", 0o777)
    os.chmod(tmp / "node-open", 0o755)
    return tmp


@pytest.mark.parametrize("args,says", [
    (["ls"], "backup/shut/config: Permission denied"),
    (["ls", "--name", "shut"], "Permission denied"),
    (["check", "--name", "shut"], "Permission denied"),
    (["prune", "--name", "shut"], "Permission denied"),
    (["restore", "--name", "shut", "--to", "RESTORE"], "Permission denied"),
    (["backup", "--name", "shut", "--directory", "NODE"], "Permission denied"),
    (["backup", "--name", "open", "--directory", "NODE"], "Permission denied"),
    (["ls", "--backup-dir", "CLOSED"], "Permission denied"),
    (["backup", "--backup-dir", "CLOSED", "--name", "n", "--directory", "NODE"],
     "Permission denied"),
])
def test_no_permission_is_exit_7_not_damage(locked_out: Path, tmp_path: Path,
                                            args: list[str], says: str) -> None:
    """Permission problems are neither damage (5) nor a bug (1): one line, exit 7."""
    if os.geteuid() != 0:
        pytest.skip("needs root, to run as nobody")
    subst = {"RESTORE": str(locked_out / "state" / "r"), "NODE": str(locked_out / "node-open"),
             "CLOSED": str(locked_out / "closed")}
    args = [subst.get(a, a) for a in args]
    cmd = [sys.executable, "-m", "humiofs", args[0]]
    if "--backup-dir" not in args:
        cmd += ["--backup-dir", str(locked_out / "backup")]
    proc = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *cmd, *args[1:]],
        env={**clean_env(), "BACKUP_KEY": KEY, "BACKUP_STATE_DIR": str(locked_out / "state"),
             "HOME": str(locked_out / "state")},
        capture_output=True, text=True, timeout=120, cwd=locked_out)
    _one_line(proc, 7, says)


def test_mount_of_a_read_only_store_given_as_a_relative_path(ro_store: Path) -> None:
    """The mount goes to the background, which leaves the working folder: a relative
    BACKUP_DIR must still name the same folder."""
    from humiofs.mount.mount import is_mounted, unmount
    mnt = ro_store.parent / "mnt"
    mnt.mkdir(exist_ok=True)
    proc = subprocess.run([sys.executable, "-m", "humiofs", "mount", "--backup-dir", "ro",
                           "mnt"], env={**clean_env(), "BACKUP_KEY": KEY}, cwd=ro_store.parent,
                          capture_output=True, text=True, timeout=120)
    try:
        assert proc.returncode == 0, proc.stderr
        assert (mnt / "node1" / "segments" / "a").read_bytes() == b"hello"
    finally:
        if is_mounted(mnt):
            unmount(mnt)
        # The server exits just after the unmount; the fixture's umount of the read-only
        # bind needs its open packs closed.
        m = re.search(r"\(pid (\d+)\)", proc.stdout)
        deadline = time.monotonic() + DEADLINE_S
        while m and os.path.exists(f"/proc/{m.group(1)}") and time.monotonic() < deadline:
            time.sleep(0.02)


# -- what user nobody meets inside a store it owns ----------------------------------------------

@pytest.fixture
def nobodys(request: pytest.FixtureRequest) -> Path:
    """A store BACKUP_DIR/node1 (one backup of NODE) owned by user nobody, outside pytest's
    folders (nobody cannot pass through them), with a state folder nobody may write."""
    if os.geteuid() != 0:
        pytest.skip("needs root, to run as nobody")
    tmp = Path(tempfile.mkdtemp(prefix="humiofs-nobody-"))
    request.addfinalizer(lambda: shutil.rmtree(tmp, ignore_errors=True))
    os.chmod(tmp, 0o755)
    store = create_store(tmp / "backup" / "node1")
    node = tiny_node(tmp / "node", {"a": os.urandom(70_000), "b": b"x"})
    wait_not_racy(node)     # so that a backup of it stores nothing new
    backup(store, node)
    store.close()
    (tmp / "state").mkdir()
    # Not the node: a new ctime would make its files changed ones.
    for top in (tmp / "backup", tmp / "state"):
        for folder, dirs, files in os.walk(top):
            for name in [folder, *(os.path.join(folder, f) for f in files)]:
                os.chown(name, 65534, 65534)
    return tmp


def _as_nobody(tmp: Path, *args: str | Path) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "humiofs", *map(str, args), "--backup-dir",
           str(tmp / "backup"), "--name", "node1"]
    if args[0] == "backup":
        cmd += ["--directory", str(tmp / "node")]
    return subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *cmd],
        env={**clean_env(), "BACKUP_KEY": KEY, "BACKUP_STATE_DIR": str(tmp / "state"),
             "HOME": str(tmp / "state"), "BOOTSTRAP_HOST_ID": "1"},
        capture_output=True, text=True, timeout=120, cwd=tmp)


def _a_pack(store: Path) -> Path:
    return sorted(p for p in (store / "packs").glob("*/*") if p.is_file())[0]


@pytest.mark.parametrize("command", [["backup"], ["prune", "--grace", "0"], ["check"]])
def test_an_unreadable_packs_folder_is_named(nobodys: Path, command: list[str]) -> None:
    """The line names the folder of packs/ that cannot be read, not packs/ itself (an empty
    one: nothing but the listing of packs/ goes into it)."""
    folder = next(p for p in sorted((nobodys / "backup" / "node1" / "packs").iterdir())
                  if not any(p.iterdir()))
    os.chmod(folder, 0)
    _one_line(_as_nobody(nobodys, *command), 7, f"cannot read or write {folder}: Permission "
              "denied")


CHECK, READ_DATA, PRUNE = ["check"], ["check", "--read-data"], ["prune", "--grace", "0"]


@pytest.mark.parametrize("what,command", [
    *((what, command) for what in ("pack", "key file", "prune record", "journal")
      for command in (CHECK, READ_DATA)),
    ("prune record", PRUNE),    # prune reads no data pack, second key file or journal here
])
def test_an_unreadable_store_file_is_exit_7_not_damage(nobodys: Path, what: str,
                                                       command: list[str]) -> None:
    """check (and prune) call a store file this user may not read what it is: exit 7,
    naming it; never damage (exit 5), a damaged record dropped, or nothing at all. (Generations
    and config: test_no_permission_is_exit_7_not_damage and the store opening.)"""
    store = nobodys / "backup" / "node1"
    if what == "pack":
        victim = _a_pack(store)
    elif what == "key file":
        # A second key file (sorted last), so that the store opens with the first one and
        # check reads this one by itself.
        [first] = (store / "keys").iterdir()
        victim = store / "keys" / ("f" * 32)
        shutil.copy2(first, victim)
    elif what == "prune record":
        (store / "prune").mkdir(mode=0o700)
        os.chown(store / "prune", 65534, 65534)
        victim = store / "prune" / "1796070917750-0123456789abcdef"
        victim.write_text('{"version": 1, "packs": []}\n')
    else:
        victim = store / "tmp" / "0123456789abcdef.journal"
        victim.write_text(f"pack {_a_pack(store).name}\n")
    os.chown(victim, 65534, 65534)
    os.chmod(victim, 0)
    _one_line(_as_nobody(nobodys, *command), 7, f"cannot read or write {victim}: Permission "
              "denied")
    assert victim.exists()


def test_what_cannot_be_removed_from_tmp_is_exit_7(nobodys: Path) -> None:
    """A folder in tmp/ holding something this user may not remove: one line naming it."""
    store = nobodys / "backup" / "node1"
    (store / "tmp" / "dd").mkdir()
    (store / "tmp" / "dd" / "x").write_text("root's")
    proc = _as_nobody(nobodys, "backup")
    _one_line(proc, 7, f"cannot read or write {store / 'tmp' / 'dd' / 'x'}: Permission denied")


# -- the working folder deleted under a command -------------------------------------------------

@pytest.mark.parametrize("args,code", [
    (["ls", "--backup-dir", "backup"], 2),
    (["ls", "--backup-dir", "ABS", "--key-file", "key"], 2),
    (["ls", "--backup-dir", "ABS"], 0),
    (["check", "--backup-dir", "ABS", "--name", "node1"], 0),
    (["backup", "--backup-dir", "ABS", "--name", "node1", "--directory", "node"], 2),
    (["restore", "--backup-dir", "ABS", "--name", "node1", "--to", "r"], 6),
    (["mount", "--backup-dir", "ABS", "mnt"], 2),
])
def test_a_deleted_working_folder_is_one_line(paths: Path, tmp_path: Path, args: list[str],
                                             code: int) -> None:
    """A relative path cannot be found once the working folder is deleted: one line that
    says so, never exit 1; absolute paths still work."""
    gone = tmp_path / "gone"
    args = [str(paths / "backup") if a == "ABS" else a for a in args]
    proc = subprocess.run(
        ["sh", "-c", 'mkdir "$0" && cd "$0" && rmdir "$0" && exec "$@"', str(gone),
         sys.executable, "-m", "humiofs", *args],
        env={**clean_env(), "BACKUP_KEY": KEY}, capture_output=True, text=True, timeout=120)
    if code == 0:
        assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    else:
        _one_line(proc, code, "the working folder was deleted")


def test_a_relative_state_dir_in_a_deleted_working_folder(paths: Path, tmp_path: Path) -> None:
    gone = tmp_path / "gone"
    proc = subprocess.run(
        ["sh", "-c", 'mkdir "$0" && cd "$0" && rmdir "$0" && exec "$@"', str(gone),
         sys.executable, "-m", "humiofs", "ls", "--backup-dir", str(paths / "backup")],
        env={**clean_env(), "BACKUP_KEY": KEY, "BACKUP_STATE_DIR": "state"},
        capture_output=True, text=True, timeout=120)
    _one_line(proc, 2, "the working folder was deleted")
