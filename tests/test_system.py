"""How humiofs fits the host: sd_notify, scripts/install, the systemd units (checked with
systemd-analyze) and fstab lines mounted with mount(8) and unmounted with umount(8)."""
from __future__ import annotations

import fcntl
import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import KEY, ROOT
from mountutil import DEADLINE_S, backup, create_store, tiny_node

from humiofs.mount.mount import is_mounted
from humiofs.system import sdnotify

UNITS = ("humiofs-backup.service", "humiofs-mount.service")


# -- sd_notify ------------------------------------------------------------------------------

def _receive(sock: socket.socket, proc: subprocess.Popen[bytes] | None = None) -> bytes:
    """The next datagram, within the deadline and while `proc` lives."""
    sock.settimeout(0.1)
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        try:
            return sock.recv(4096)
        except TimeoutError:
            assert proc is None or proc.poll() is None, f"exited with {proc.returncode}"
    raise AssertionError("nothing received")


def test_notify_reaches_a_socket_path(tmp_path: Path) -> None:
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        assert sdnotify.notify("READY=1\nSTATUS=mounted", {"NOTIFY_SOCKET": str(path)})
        assert _receive(sock) == b"READY=1\nSTATUS=mounted"


def test_notify_reaches_an_abstract_socket() -> None:
    name = f"humiofs-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        assert sdnotify.notify("READY=1", {"NOTIFY_SOCKET": "@" + name})
        assert _receive(sock) == b"READY=1"


def test_notify_without_systemd_does_nothing() -> None:
    assert not sdnotify.notify("READY=1", {})


@pytest.mark.allow_warnings
def test_notify_to_a_missing_socket_is_a_warning(tmp_path: Path) -> None:
    assert not sdnotify.notify("READY=1", {"NOTIFY_SOCKET": str(tmp_path / "gone")})
    assert not sdnotify.notify("READY=1", {"NOTIFY_SOCKET": "relative"})


def _notify_socket(tmp_path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    return sock


def test_mount_foreground_says_ready_once_mounted(tmp_path: Path) -> None:
    store = create_store(tmp_path / "backup" / "node1")
    backup(store, tiny_node(tmp_path / "node", {"a": b"x"}))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    env = _env(tmp_path)
    with _notify_socket(tmp_path) as sock:
        env["NOTIFY_SOCKET"] = str(tmp_path / "notify")
        proc = subprocess.Popen(_humiofs("mount", "--foreground", "--backup-dir",
                                         tmp_path / "backup", mnt), env=env, cwd=ROOT)
        try:
            assert _receive(sock, proc).startswith(b"READY=1")
            assert is_mounted(mnt) and (mnt / "node1" / "a").read_bytes() == b"x"
        finally:
            proc.terminate()
            assert proc.wait(DEADLINE_S) == 0
    assert not is_mounted(mnt)


def test_watch_says_ready_once_it_runs_not_after_its_first_pass(tmp_path: Path) -> None:
    """READY=1 once the store is open and the writer lock held, so that a first pass of
    hours holds up neither `systemctl start` nor boot: here the process is stopped
    (HUMIOFS_FAILPOINT) before its first generation is written, and READY=1 came already."""
    node = tiny_node(tmp_path / "node", {"a": b"x"})
    (tmp_path / "backup").mkdir()
    env = _env(tmp_path)
    env["HUMIOFS_FAILPOINT"] = "committing:1"
    with _notify_socket(tmp_path) as sock:
        env["NOTIFY_SOCKET"] = str(tmp_path / "notify")
        proc = subprocess.Popen(_humiofs("backup", "--watch", "--interval", "60",
                                         "--backup-dir", tmp_path / "backup", "--name", "n",
                                         "--directory", node, "--no-progress"),
                                env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
        try:
            assert _receive(sock, proc).startswith(b"READY=1")
            store = tmp_path / "backup" / "n"
            assert (store / "config").is_file() and (store / "lock").is_file()
        finally:
            proc.kill()
            proc.wait(DEADLINE_S)


def _humiofs(*args: str | Path) -> list[str]:
    return [str(ROOT / ".venv" / "bin" / "humiofs"), *map(str, args)]


def _env(tmp_path: Path) -> dict[str, str]:
    from conftest import clean_env
    env = clean_env()
    env["BACKUP_KEY"] = KEY
    return env


# -- scripts/install and the units ------------------------------------------------------------

INSTALLED = [Path("/usr/local/bin/humiofs"), Path("/etc/humiofs/node.env"),
             *(Path("/etc/systemd/system") / u for u in UNITS),
             *(Path("/etc/systemd/system") / f"{u}.d" for u in UNITS)]


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """scripts/install run for real (the README's command), with an env file of this test's
    own; whatever was at those paths before is put back afterwards. Other worktrees run this
    too: a lock keeps them apart."""
    tmp = tmp_path_factory.mktemp("install")
    saved = tmp / "saved"
    lock = os.open("/run/lock/humiofs-install-test.lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(lock, fcntl.LOCK_EX)
    had_etc = Path("/etc/humiofs").exists()
    try:
        for path in INSTALLED:
            if path.exists() or path.is_symlink():
                dest = saved / path.relative_to("/")
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.move(path, dest)
        node = tiny_node(tmp / "node", {"segments/a": b"hello"})
        (tmp / "backup").mkdir()
        key = tmp / "backup.key"
        key.write_text(KEY + "\n")
        Path("/etc/humiofs").mkdir(mode=0o700, exist_ok=True)
        Path("/etc/humiofs/node.env").write_text(
            f"DIRECTORY={node}\nBACKUP_DIR={tmp / 'backup'}\nBACKUP_NAME=node1\n"
            f"BACKUP_KEY_FILE={key}\nBACKUP_STATE_DIR={tmp / 'state'}\n")
        for _ in range(2):      # idempotent
            subprocess.run([ROOT / "scripts" / "install"], check=True, cwd="/",
                           stdout=subprocess.DEVNULL)
        yield tmp
    finally:
        for path in INSTALLED:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()
            if (saved / path.relative_to("/")).exists():
                shutil.move(saved / path.relative_to("/"), path)
        if not had_etc:
            shutil.rmtree("/etc/humiofs", ignore_errors=True)
        os.close(lock)


def test_install_puts_the_program_and_units_in_place(installed: Path) -> None:
    assert os.path.realpath("/usr/local/bin/humiofs") == str(ROOT / ".venv" / "bin" / "humiofs")
    out = subprocess.run(["humiofs", "--version"], capture_output=True, text=True,
                         env={"PATH": "/usr/local/bin:/usr/bin:/bin"})
    assert re.fullmatch(r"humiofs \d+\.\d+\.\d+\n", out.stdout)
    for unit in UNITS:
        assert (Path("/etc/systemd/system") / unit).read_text() == \
            (ROOT / "contrib" / "systemd" / unit).read_text()
    backup_dropin = Path("/etc/systemd/system/humiofs-backup.service.d/50-env-file.conf")
    text = backup_dropin.read_text()
    assert f"RequiresMountsFor={installed / 'backup'} {installed / 'node'}\n" in text
    assert f"ReadWritePaths=-{installed / 'backup'} -{installed / 'state'}\n" in text
    assert f"LoadCredential=backup.key:{installed / 'backup.key'}\n" in text
    assert "Environment=BACKUP_KEY_FILE=%d/backup.key\n" in text


needs_systemd_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze is not installed (scripts/test installs the systemd package)")


@needs_systemd_analyze
def test_units_pass_systemd_analyze_verify(installed: Path) -> None:
    proc = subprocess.run(["systemd-analyze", "verify", *UNITS], capture_output=True,
                          text=True)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr


@needs_systemd_analyze
def test_install_takes_paths_with_blanks_and_quotes(installed: Path, tmp_path: Path) -> None:
    """Paths with blanks, quotes, backslashes and % go into the drop-ins quoted as systemd
    reads them: systemd-analyze verify (which reads the drop-ins) has nothing to say."""
    root = tmp_path / "root"
    (root / "etc" / "humiofs").mkdir(parents=True)
    (root / "etc" / "humiofs" / "node.env").write_text(
        'DIRECTORY=/data/humio data\nBACKUP_DIR="/mnt/backup disk"\nBACKUP_NAME=n\n'
        "BACKUP_KEY_FILE=/etc/humiofs/my key%s\nBACKUP_STATE_DIR=/var/lib/it's \\\"here\"\n")
    subprocess.run([ROOT / "scripts" / "install", "--root", root], check=True,
                   stdout=subprocess.DEVNULL)
    units = root / "etc" / "systemd" / "system"
    text = (units / "humiofs-backup.service.d" / "50-env-file.conf").read_text()
    assert 'RequiresMountsFor="/mnt/backup disk" "/data/humio data"\n' in text
    assert 'ReadWritePaths=-"/mnt/backup disk" -"/var/lib/it\'s \\\\\\"here\\""\n' in text, text
    assert "LoadCredential=backup.key:/etc/humiofs/my key%%s\n" in text
    proc = subprocess.run(["systemd-analyze", "verify", *UNITS], capture_output=True,
                          text=True, cwd=units,
                          env={**os.environ, "SYSTEMD_UNIT_PATH": f"{units}:"})
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    # The check can fail: a drop-in line systemd cannot read is named on stderr.
    with open(units / "humiofs-backup.service.d" / "50-env-file.conf", "a") as f:
        f.write('ReadWritePaths="/unterminated\n')
    proc = subprocess.run(["systemd-analyze", "verify", *UNITS], capture_output=True,
                          text=True, cwd=units,
                          env={**os.environ, "SYSTEMD_UNIT_PATH": f"{units}:"})
    assert "50-env-file.conf" in proc.stderr


def test_install_checks_everything_before_writing_anything(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc" / "humiofs").mkdir(parents=True)
    (root / "etc" / "humiofs" / "node.env").write_text("BACKUP_DIR=relative/backup\n")
    proc = subprocess.run([ROOT / "scripts" / "install", "--root", root],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "must be an absolute path" in proc.stderr, proc.stderr
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*")) == \
        ["etc", "etc/humiofs", "etc/humiofs/node.env"]


@needs_systemd_analyze
def test_units_pass_verify_only_when_they_are_right(installed: Path, tmp_path: Path) -> None:
    """The verify above can fail: a unit with a bad line does."""
    bad = tmp_path / "humiofs-bad.service"
    bad.write_text((ROOT / "contrib" / "systemd" / UNITS[0]).read_text()
                   .replace("Type=notify", "Type=notyfy"))
    proc = subprocess.run(["systemd-analyze", "verify", bad], capture_output=True, text=True)
    assert "notyfy" in proc.stderr


@needs_systemd_analyze
@pytest.mark.parametrize("unit,most", [("humiofs-backup.service", 2.5),
                                        ("humiofs-mount.service", 5.0)])
def test_units_are_sandboxed(installed: Path, unit: str, most: float) -> None:
    """systemd-analyze security: 9.0 and 9.6 ("UNSAFE") before; the mount cannot have a mount
    namespace of its own (its FUSE mount would be invisible), which caps its score."""
    proc = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--no-pager",
                           f"/etc/systemd/system/{unit}"], capture_output=True, text=True)
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", proc.stdout)
    assert m, proc.stdout + proc.stderr
    assert float(m.group(1)) <= most


# -- fstab and mount(8) -------------------------------------------------------------------------

def _mount_with_fstab(line: str, mnt: Path, tmp: Path) -> subprocess.CompletedProcess[str]:
    fstab = tmp / "fstab"
    fstab.write_text(line + "\n")
    return subprocess.run(["mount", "-T", str(fstab), str(mnt)], capture_output=True,
                          text=True, timeout=60)


def _fstab_store(tmp: Path) -> Path:
    """A store and an env file that names it and its key file; returns the env file."""
    store = create_store(tmp / "backup" / "node1")
    backup(store, tiny_node(tmp / "node", {"segments/a": b"hello"}))
    (tmp / "key").write_text(KEY + "\n")
    env = tmp / "node.env"
    env.write_text(f"BACKUP_DIR={tmp / 'backup'}\nBACKUP_KEY_FILE={tmp / 'key'}\n"
                   f"BACKUP_STATE_DIR={tmp / 'state'}\n")
    return env


def _mounted_then_unmounted(mnt: Path) -> None:
    try:
        assert (mnt / "node1" / "segments" / "a").read_bytes() == b"hello"
        with open("/proc/self/mounts") as f:
            assert any(line.split()[1:3] == [str(mnt), "fuse.humiofs"] and
                       line.split()[3].startswith("ro,") for line in f)
    finally:
        proc = subprocess.run(["umount", str(mnt)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert not is_mounted(mnt)


def test_fstab_line_with_type_fuse_humiofs(installed: Path, tmp_path: Path) -> None:
    env = _fstab_store(tmp_path)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = _mount_with_fstab(f"{env} {mnt} fuse.humiofs ro,noauto 0 0", mnt, tmp_path)
    assert proc.returncode == 0, proc.stderr
    _mounted_then_unmounted(mnt)
    assert proc.stdout == proc.stderr == ""


def test_fstab_line_in_program_hash_source_form(tmp_path: Path) -> None:
    env = _fstab_store(tmp_path)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = _mount_with_fstab(f"{ROOT / '.venv' / 'bin' / 'humiofs'}#{env} {mnt} fuse "
                             "ro,noauto,nofail,allow_other,name=node1 0 0", mnt, tmp_path)
    assert proc.returncode == 0, proc.stderr
    _mounted_then_unmounted(mnt)


def _mount_all_twice(line: str, mnt: Path, tmp: Path, source: str) -> None:
    """`mount -a -T FSTAB` twice: the second finds the line mounted (libmount compares the
    fstab source with the mount table's) and leaves it alone."""
    fstab = tmp / "fstab"
    fstab.write_text(line + "\n")
    try:
        for _ in range(2):
            proc = subprocess.run(["mount", "-a", "-T", str(fstab)], capture_output=True,
                                  text=True, timeout=60)
            assert proc.returncode == 0 and proc.stderr == "", proc.stderr
        with open("/proc/self/mounts") as f:
            sources = [fields[0].replace("\\043", "#") for fields in map(str.split, f)
                       if fields[1] == str(mnt)]
        assert sources == [source]
    finally:
        _mounted_then_unmounted(mnt)


def test_fstab_mount_all_twice_with_type_fuse_humiofs(installed: Path, tmp_path: Path) -> None:
    env = _fstab_store(tmp_path)
    (tmp_path / "mnt").mkdir()
    _mount_all_twice(f"{env} {tmp_path / 'mnt'} fuse.humiofs ro 0 0", tmp_path / "mnt",
                     tmp_path, str(env))


def test_fstab_mount_all_twice_in_program_hash_source_form(tmp_path: Path) -> None:
    env = _fstab_store(tmp_path)
    (tmp_path / "mnt").mkdir()
    source = f"{ROOT / '.venv' / 'bin' / 'humiofs'}#{env}"
    _mount_all_twice(f"{source} {tmp_path / 'mnt'} fuse ro 0 0", tmp_path / "mnt", tmp_path,
                     source)


@pytest.mark.parametrize("options,says", [("rw", "read-only"),
                                          ("ro,cache=yes", "unknown mount option 'cache=yes'")])
def test_fstab_options_humiofs_cannot_take(tmp_path: Path, options: str, says: str) -> None:
    env = _fstab_store(tmp_path)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = _mount_with_fstab(f"{ROOT / '.venv' / 'bin' / 'humiofs'}#{env} {mnt} fuse "
                             f"{options} 0 0", mnt, tmp_path)
    assert proc.returncode != 0 and says in proc.stderr
    assert "Traceback" not in proc.stderr and not is_mounted(mnt)


def test_dropins_read_the_env_file_as_humiofs_does(tmp_path: Path) -> None:
    from humiofs.system.units import dropins
    env = tmp_path / "node.env"
    env.write_bytes("\ufeff; comment\nHUMIO_JVM_ARGS=-Xmx4g\nBACKUP_DIR='/mnt/backup%disk'\n"
                    "BACKUP_KEY_FILE=\"/etc/humiofs/backup.key\"\n".encode())
    units = dropins(env)
    assert "RequiresMountsFor=/mnt/backup%%disk\n" in units["humiofs-mount.service"]
    assert "ReadWritePaths=-/mnt/backup%%disk\n" in units["humiofs-backup.service"]
    assert "LoadCredential=backup.key:/etc/humiofs/backup.key\n" in units["humiofs-mount.service"]
    env.write_bytes(b"# Kn\xf6del\nBACKUP_DIR=/mnt/backup disk\n")
    assert 'RequiresMountsFor="/mnt/backup disk"\n' in dropins(env)["humiofs-mount.service"]
    env.write_text("BACKUP_DIR=/mnt/backup\tdisk\n")
    from humiofs.errors import ConfigError
    with pytest.raises(ConfigError, match="control characters"):
        dropins(env)
    env.write_text("BACKUP_DIR=backup\n")
    with pytest.raises(ConfigError, match="absolute"):
        dropins(env)
    # Object storage is no path to wait for or to open up in the sandbox.
    env.write_text("BACKUP_DIR=s3://bucket/backups\nDIRECTORY=/data/humio\n")
    units = dropins(env)
    assert "RequiresMountsFor=/data/humio\n" in units["humiofs-backup.service"]
    assert "ReadWritePaths" not in units["humiofs-backup.service"]
    assert "s3:" not in units["humiofs-backup.service"] + units["humiofs-mount.service"]
    assert "RequiresMountsFor" not in units["humiofs-mount.service"]


def test_helper_form_maps_mount_options() -> None:
    from humiofs.cli.mount import helper_argv
    assert helper_argv(["/etc/humiofs/node.env", "/mnt/b", "-o",
                        "ro,dev,suid,noauto,nofail,_netdev,x-systemd.automount,allow_other,"
                        "name=node1,at=2026-11-24T10:00,log=/var/log/humiofs.log"]) == [
        "mount", "--config", "/etc/humiofs/node.env", "--quiet", "--source",
        "/etc/humiofs/node.env", "--allow-other",
        "--name", "node1", "--at", "2026-11-24T10:00", "--log", "/var/log/humiofs.log",
        "--", "/mnt/b"]


def test_a_mistyped_command_is_not_taken_for_the_helper_form() -> None:
    from conftest import run_cli
    proc = run_cli("bakup", "x")
    assert proc.returncode == 2 and "invalid choice: 'bakup'" in proc.stderr
