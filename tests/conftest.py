"""Shared fixtures: sample nodes, env files, running the CLI, and the no-unexpected-warnings rule."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from s3util import S3Server

ROOT = Path(__file__).resolve().parent.parent
MAKE_SAMPLE = ROOT / "scripts" / "make-sample-node"
KEY = "correct horse battery staple"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "allow_warnings: the test expects WARNING/ERROR logs")
    config.addinivalue_line("markers", "s3: needs the local S3 server, scripts/s3-server "
                            "(set automatically by the s3_server fixture)")


@pytest.hookimpl(tryfirst=True)  # before -m selects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # `-m "not s3"` leaves out every test that would start the S3 server.
    for item in items:
        if "s3_server" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.s3)


@pytest.fixture(autouse=True)
def _no_unexpected_warnings(request: pytest.FixtureRequest,
                            caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Fails a test that logs a WARNING or ERROR unless it is marked allow_warnings."""
    caplog.set_level(logging.INFO)
    yield
    if request.node.get_closest_marker("allow_warnings"):
        return
    bad = [r for r in caplog.get_records("call") if r.levelno >= logging.WARNING]
    if bad:
        pytest.fail("unexpected log output: " + "; ".join(r.getMessage() for r in bad))


# BACKUP_STATE_DIR for humiofs subprocesses (clean_env): never the host's own, and one per test,
# so that copies of one store in different tests (they share a store id) share no record of
# its newest generation. Module-scoped fixtures use the session's.
_state_dir: Path | None = None


@pytest.fixture(scope="session", autouse=True)
def _session_state_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    global _state_dir
    _state_dir = tmp_path_factory.mktemp("state-session")
    yield


@pytest.fixture(autouse=True)
def _test_state_dir(_session_state_dir: None, tmp_path_factory: pytest.TempPathFactory
                    ) -> Iterator[Path]:
    global _state_dir
    outer, _state_dir = _state_dir, tmp_path_factory.mktemp("state")
    yield _state_dir
    _state_dir = outer


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """The local S3 server (tests/s3util.py), started on first use in a session and stopped at
    its end; a server that was already running is used and left running. A server that cannot
    start fails every test that needs it, with the script's output: never a skip."""
    from s3util import S3ServerError, start_server, stop_server
    try:
        server = start_server()
    except S3ServerError as e:
        pytest.fail(str(e), pytrace=False)
    yield server
    if server.started_here:
        stop_server()


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> Iterator[str]:
    """A new, empty bucket on the S3 server, removed with its objects after the test."""
    name = s3_server.new_bucket()
    yield name
    s3_server.remove_bucket(name)


def make_sample(dest: Path, size: str = "8M", small_files: int = 300, seed: int = 1,
                node_id: int = 1) -> Path:
    """Builds a sample node with scripts/make-sample-node."""
    subprocess.run([sys.executable, str(MAKE_SAMPLE), str(dest), "--size", size,
                    "--small-files", str(small_files), "--seed", str(seed),
                    "--node-id", str(node_id)], check=True, stdout=subprocess.DEVNULL)
    return dest


@pytest.fixture(scope="session")
def sample_node(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small sample node shared by tests that only read it. Do not modify it."""
    return make_sample(tmp_path_factory.mktemp("sample") / "humio-data")


def write_env(path: Path, backup_dir: Path, name: str | None = "node1",
              directory: Path | None = None, key: str | None = KEY, **extra: str) -> Path:
    """Writes a Humio-style env file with the given settings."""
    lines = [f"BACKUP_DIR={backup_dir}"]
    if name is not None:
        lines.append(f"BACKUP_NAME={name}")
    if directory is not None:
        lines.append(f"DIRECTORY={directory}")
    if key is not None:
        lines.append(f"BACKUP_KEY={key}")
    lines += [f"{k}={v}" for k, v in extra.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def clean_env() -> dict[str, str]:
    """The environment for a humiofs subprocess, without any BACKUP_* settings of the caller,
    and with BACKUP_STATE_DIR in the test's own folder."""
    from humiofs.config import SETTINGS
    env = {k: v for k, v in os.environ.items() if k not in SETTINGS}
    assert _state_dir is not None
    env["BACKUP_STATE_DIR"] = str(_state_dir)
    return env


def run_cli(*args: str | Path, env: dict[str, str] | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Runs `python -m humiofs ARGS` and returns the finished process (never raises on rc)."""
    return subprocess.run([sys.executable, "-m", "humiofs", *map(str, args)],
                          env=env if env is not None else clean_env(), text=True,
                          capture_output=True, timeout=timeout, cwd=ROOT)


CLI = Callable[..., "subprocess.CompletedProcess[str]"]


def tree_digest(root: Path) -> dict[str, tuple[object, ...]]:
    """Everything restore must bring back, per relative path: type, mode, mtime, size,
    sha256, data extents (holes) and symlink target."""
    import hashlib

    from humiofs.backup.scan import data_extents
    out: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            st = p.lstat()
            if p.is_symlink():
                out[rel] = ("l", os.readlink(p), st.st_mtime_ns)
            elif p.is_dir():
                out[rel] = ("d", st.st_mode & 0o7777, st.st_mtime_ns)
            else:
                h = hashlib.sha256()
                with open(p, "rb") as f:
                    for block in iter(lambda: f.read(1 << 20), b""):
                        h.update(block)
                    extents = tuple(data_extents(f.fileno(), st.st_size))
                out[rel] = ("f", st.st_mode & 0o7777, st.st_mtime_ns, st.st_size,
                            h.hexdigest(), extents)
    return out
