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
from humiofs import sdnotify
from humiofs.mount import is_mounted
from mountutil import DEADLINE_S, backup, create_store, tiny_node

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


def test_watch_says_ready_after_its_first_pass(tmp_path: Path) -> None:
    node = tiny_node(tmp_path / "node", {"a": b"x"})
    (tmp_path / "backup").mkdir()
    env = _env(tmp_path)
    with _notify_socket(tmp_path) as sock:
        env["NOTIFY_SOCKET"] = str(tmp_path / "notify")
        proc = subprocess.Popen(_humiofs("backup", "--watch", "--interval", "60",
                                         "--backup-dir", tmp_path / "backup", "--name", "n",
                                         "--directory", node, "--no-progress"),
                                env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
        try:
            assert _receive(sock, proc).startswith(b"READY=1")
            # Ready means committed: the generation is there.
            assert os.listdir(tmp_path / "backup" / "n" / "generations")
        finally:
            proc.terminate()
            assert proc.wait(DEADLINE_S) == 0


def _humiofs(*args: str | Path) -> list[str]:
    return [str(ROOT / ".venv" / "bin" / "humiofs"), *map(str, args)]


def _env(tmp_path: Path) -> dict[str, str]:
    from conftest import clean_env
    env = clean_env()
    env["BACKUP_KEY"] = KEY
    return env
