"""Output for scripts: --version, --json (docs/JSON.md), -q silent on success."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import KEY, ROOT, clean_env, run_cli
from mountutil import DEADLINE_S, backup, create_store, tiny_node


def _cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    env = clean_env()
    env["BACKUP_KEY"] = KEY
    return run_cli(*args, env=env)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("out")
    store = create_store(tmp / "backup" / "node1")
    node = tiny_node(tmp / "node", {"segments/a": b"hello", "segments/b": b"world"})
    backup(store, node)
    (tmp / "node.env").write_text(f"BACKUP_DIR={tmp / 'backup'}\nBACKUP_NAME=node1\n"
                                  f"DIRECTORY={node}\nBOOTSTRAP_HOST_ID=1\n")
    return tmp


def _objects(proc: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    assert proc.returncode == 0, proc.stderr
    objs = [json.loads(line) for line in proc.stdout.splitlines()]
    assert all(o["schema"] == 1 for o in objs)
    return objs


def test_version() -> None:
    proc = _cli("--version")
    assert proc.returncode == 0 and re.fullmatch(r"humiofs \d+\.\d+\.\d+\n", proc.stdout)


def test_version_is_looked_up_only_when_asked_for() -> None:
    # importlib.metadata's scan of the installed packages cost every command ~30 ms cold.
    code = ("import sys; from humiofs.cli import build_parser; "
            "build_parser().parse_args(['backup']); print('importlib.metadata' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert proc.stdout == "False\n", proc.stderr


def test_json_backup_restore_ls_check_prune(setup: Path, tmp_path: Path) -> None:
    cfg = ("--config", setup / "node.env")
    [b] = _objects(_cli("backup", *cfg, "--json"))
    assert b["command"] == "backup" and b["store"] == "node1" and b["exit"] == 0
    assert b["files"] == {"new": 0, "changed": 0, "unchanged": 3, "live": 0, "skipped": 0,
                          "vanished": 0, "healed": 0}
    assert re.fullmatch(r"\d{13}-[0-9a-f]{16}", b["generation"]["name"])

    [r] = _objects(_cli("restore", *cfg, "--json", "--to", tmp_path / "r"))
    assert (r["command"], r["files"], r["bytes"], r["target"], r["generation"]) == (
        "restore", 3, 10 + len(b"0b5a6c1e-8d3f-4c2a-9e71-2f6d8a9b0c13"), str(tmp_path / "r"),
        b["generation"])

    [ls] = _objects(_cli("ls", *cfg, "--json"))
    assert ls["opened"] and [g["latest"] for g in ls["generations"]][-1]
    assert ls["generations"][-1]["name"] == b["generation"]["name"]
    assert ls["generations"][-1]["files"] == 3 and ls["generations"][-1]["node"] == "1"

    [c] = _objects(_cli("check", *cfg, "--json", "--read-data"))
    assert c["healthy"] and c["problems"] == [] and c["read_data"] and c["exit"] == 0

    [p] = _objects(_cli("prune", *cfg, "--json", "--dry-run"))
    assert p["dry_run"] and p["kept"] == len([g for g in p["generations"] if g["keep"]]) >= 1


def test_json_check_lists_problems(tmp_path: Path) -> None:
    store = create_store(tmp_path / "backup" / "node1")
    backup(store, tiny_node(tmp_path / "node", {"a": b"x" * 1000}))
    for pack in (tmp_path / "backup" / "node1" / "packs").rglob("*"):
        if pack.is_file():
            pack.unlink()
    proc = _cli("check", "--backup-dir", tmp_path / "backup", "--name", "node1", "--json")
    assert proc.returncode == 5
    [c] = [json.loads(line) for line in proc.stdout.splitlines()]
    assert not c["healthy"] and c["exit"] == 5
    assert all("missing" in p["message"] and p["generations"] for p in c["problems"])
    assert c["problems"] and all(p["paths"] for p in c["problems"])


def test_json_watch_one_object_per_pass(tmp_path: Path) -> None:
    node = tiny_node(tmp_path / "node", {"a": b"x"})
    (tmp_path / "backup").mkdir()
    env = clean_env()
    env["BACKUP_KEY"] = KEY
    proc = subprocess.Popen([sys.executable, "-m", "humiofs", "backup", "--watch", "--json",
                             "--interval", "0.2", "--backup-dir", tmp_path / "backup",
                             "--name", "n", "--directory", node, "--no-progress"],
                            env=env, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    objs: list[dict[str, Any]] = []
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + DEADLINE_S
        while len(objs) < 4 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line, f"ended with {proc.poll()}"
            objs.append(json.loads(line))
            if len(objs) == 2:
                (node / "b").write_bytes(b"new")
    finally:
        proc.terminate()
        rest, _ = proc.communicate(timeout=DEADLINE_S)
    assert proc.returncode == 0
    assert [o["watch_pass"] for o in objs] == [1, 2, 3, 4]
    assert objs[0]["committed"] and objs[0]["files"]["new"] == 2
    assert not objs[1]["committed"]
    assert any(o["committed"] and o["files"]["new"] == 1 for o in objs[2:])
    assert all(json.loads(line)["command"] == "backup" for line in rest.splitlines())


@pytest.mark.parametrize("command", [["backup"], ["restore", "--to", "TARGET"], ["ls"],
                                     ["check"], ["prune"], ["prune", "--dry-run"]])
def test_quiet_prints_nothing_on_success(setup: Path, tmp_path: Path,
                                         command: list[str]) -> None:
    # The node has no cluster_membership.uuid-free warning: BOOTSTRAP_HOST_ID is set.
    args = [str(tmp_path / "r") if a == "TARGET" else a for a in command]
    proc = _cli(*args, "--config", setup / "node.env", "-q")
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")


def test_quiet_shows_everything_when_it_fails(setup: Path, tmp_path: Path) -> None:
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "x").write_text("in the way")
    proc = _cli("restore", "--config", setup / "node.env", "-q", "--to", tmp_path / "r")
    assert proc.returncode == 6 and proc.stderr.startswith("humiofs: error: ")


def test_quiet_shows_warnings_of_a_run_that_exits_8(setup: Path, tmp_path: Path) -> None:
    node = tmp_path / "node"
    (node / "sub").mkdir(parents=True)
    (node / "sub" / "f").write_text("x")
    os.mkfifo(node / "p")
    import socket
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(node / "sock"))
        proc = _cli("backup", "--backup-dir", setup / "backup", "--name", "q8", "-q",
                    "--directory", node)
    assert proc.returncode == 8, proc.stderr
    assert "WARNING" in proc.stderr and "sock" in proc.stderr and "backup q8" in proc.stdout


def _draw_on_a_terminal(columns: int, term: str | None) -> str:
    """What a Progress writes to a real terminal (a pty) `columns` wide, over a run."""
    import fcntl
    import struct
    import termios
    from humiofs.progress import Progress

    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    old = os.environ.get("TERM")
    if term is None:
        os.environ.pop("TERM", None)
    else:
        os.environ["TERM"] = term
    try:
        with open(slave, "w", closefd=True) as stream:
            p = Progress(total_bytes=10**10, stream=stream)
            assert p.enabled
            p.start -= 30
            for i in range(1, 6):
                p._last_draw = 0.0     # draw every update
                p.update(files=12345, nbytes=10**9 * i)
            p.close()
        out = b""
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
    finally:
        os.close(master)
        if old is None:
            os.environ.pop("TERM", None)
        else:
            os.environ["TERM"] = old
    return out.decode()


@pytest.mark.parametrize("columns", [50, 80, 30])
@pytest.mark.parametrize("term", ["xterm", "dumb", None])
def test_progress_fits_the_terminal(columns: int, term: str | None) -> None:
    out = _draw_on_a_terminal(columns, term)
    assert "\n" not in out
    segments = out.split("\r")
    assert len(segments) > 5 and all(len(s.replace("\x1b[K", "")) < columns for s in segments)
    assert ("\x1b" in out) == (term == "xterm")
    assert "12345 files" in out or columns < 30


def test_progress_never_cuts_a_field_at_narrow_widths() -> None:
    from humiofs.progress import Progress
    p = Progress(total_bytes=10**10, enabled=True)
    p.files, p.bytes = 12345, 112_100_000
    now = p.start + 30
    for width in range(1, 120):
        line = p.line(width, now)
        assert len(line) <= max(width - 1, 0)
        # Every field ends in its unit: "files", "B", "/s", "%" or an ETA's "s"/"m".
        assert line == "" or line[-1] in "sBm%", (width, line)
    assert p.line(1, now) == "" and p.line(4, now) == "" and p.line(5, now) == "1.1%"
    assert p.line(12, now) == "106.9 MiB"


@pytest.mark.parametrize("term", ["xterm", "dumb"])
def test_progress_on_a_one_column_terminal_writes_nothing(term: str) -> None:
    assert _draw_on_a_terminal(1, term) == ""
