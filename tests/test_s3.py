"""Every command on a store in object storage (BACKUP_DIR=s3://BUCKET/PREFIX), against the
real server (scripts/s3-server): backup one-shot and --watch, restore, --missing-only, check,
prune, key change, ls and the mount; and what goes wrong there: a missing bucket, wrong
credentials, the service going away in the middle of a backup or under the mount, two
writers."""
from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import KEY, ROOT, clean_env, make_sample, run_cli, tree_digest, write_env
from humiofs.store.backend.s3 import S3Backend, S3Location, S3Settings
from mountutil import Mount, is_mounted, mounted_digest, source_digest, wait_for
from s3util import S3Server, server_command

pytestmark = pytest.mark.s3


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny node, read only."""
    return make_sample(tmp_path_factory.mktemp("s3node") / "humio-data", size="3M",
                       small_files=20)


def s3_env(path: Path, server: S3Server, bucket: str, directory: Path | None = None,
           name: str = "node1", **over: str) -> Path:
    settings = {**server.settings, **over}
    return write_env(path, f"s3://{bucket}/backups", name=name,  # type: ignore[arg-type]
                     directory=directory, **settings)


def store_of(server: S3Server, bucket: str, name: str = "node1") -> S3Backend:
    return S3Location(f"s3://{bucket}/backups", S3Settings.from_env(server.settings)).store(name)


def generations(server: S3Server, bucket: str) -> list[str]:
    return [i.name for i in store_of(server, bucket).list("generations")]


def one_line(res: subprocess.CompletedProcess[str]) -> str:
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("humiofs: error:")]
    assert len(lines) == 1, res.stderr
    assert "Traceback" not in res.stderr
    return lines[0]


def backup_once_free(env: Path, deadline_s: float = 60) -> int:
    """Runs backups until one is not refused for a lock held (exit 4): a stale lock is taken
    over once its lease has run out. Returns the exit code of the last."""
    deadline = time.monotonic() + deadline_s
    while True:
        res = run_cli("backup", "--config", env)
        if res.returncode != 4 or time.monotonic() > deadline:
            assert res.returncode == 0, res.stderr
            return res.returncode


@pytest.fixture
def env(tmp_path: Path, s3_server: S3Server, s3_bucket: str, node: Path) -> Path:
    return s3_env(tmp_path / "node.env", s3_server, s3_bucket, node)


@pytest.fixture
def rgw(s3_server: S3Server) -> Iterator[None]:
    """Lets a test kill radosgw (scripts/s3-server rgw-kill); it is running again after."""
    yield
    res = server_command("rgw-start")
    assert res.returncode == 0, res.stderr


def test_every_command(env: Path, node: Path, tmp_path: Path, s3_server: S3Server,
                       s3_bucket: str) -> None:
    first = run_cli("backup", "--config", env)
    assert first.returncode == 0, first.stderr
    again = run_cli("backup", "--config", env)
    assert again.returncode == 0, again.stderr
    assert " 0 new, 0 changed, " in again.stdout
    assert "WARNING" not in again.stderr.replace("has no cluster_membership", "")

    ls = run_cli("ls", "--config", env)
    assert ls.returncode == 0, ls.stderr
    assert "node1: 2 generation(s)" in ls.stdout
    check = run_cli("check", "--config", env)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "healthy" in check.stdout

    target = tmp_path / "restored"
    res = run_cli("restore", "--config", env, "--to", target)
    assert res.returncode == 0, res.stderr
    assert tree_digest(target) == source_digest(node)
    victim = next(p for p in sorted(target.rglob("*")) if p.is_file() and p.stat().st_size > 64)
    victim.unlink()
    res = run_cli("restore", "--config", env, "--to", target, "--missing-only")
    assert res.returncode == 0, res.stderr
    assert "1 files" in res.stdout

    def files(digest: dict[str, tuple[object, ...]]) -> dict[str, tuple[object, ...]]:
        return {k: v for k, v in digest.items() if v[0] == "f"}   # the folder's mtime moved
    assert files(tree_digest(target)) == files(source_digest(node))

    prune = run_cli("prune", "--config", env)
    assert prune.returncode == 0, prune.stderr
    assert len(generations(s3_server, s3_bucket)) == 1

    # Nothing in the bucket but the store's own files, and no plaintext in them.
    backend = store_of(s3_server, s3_bucket)
    names = [i.name for i in backend.list("", recursive=True)]
    assert {n.split("/")[0] for n in names} <= {"config", "keys", "packs", "generations"}
    plain = victim.read_bytes()[:64]
    for name in names:
        assert plain not in backend.read(name)
        assert victim.name.encode() not in backend.read(name)

    new_key = tmp_path / "new.key"
    new_key.write_text("a new passphrase for the store\n")
    res = run_cli("key", "change", "--config", env, "--new-key-file", new_key)
    assert res.returncode == 0, res.stderr
    assert run_cli("ls", "--config", env).returncode == 3
    res = run_cli("ls", "--config", env, "--key-file", new_key)
    assert res.returncode == 0, res.stderr


def test_mount(env: Path, node: Path, tmp_path: Path) -> None:
    assert run_cli("backup", "--config", env).returncode == 0
    with Mount(env, tmp_path / "mnt") as m:
        assert mounted_digest(m.path / "node1", extents=False) == source_digest(node, extents=False)
    # In the background: a fresh process (obstore does not survive fork()).
    mnt = tmp_path / "bg"
    mnt.mkdir()
    res = run_cli("mount", "--config", env, mnt)
    try:
        assert res.returncode == 0, res.stderr
        assert is_mounted(mnt)
        assert mounted_digest(mnt / "node1", extents=False) == source_digest(node, extents=False)
    finally:
        if is_mounted(mnt):
            assert run_cli("umount", mnt).returncode == 0
    pid = int(res.stdout.split("(pid ")[1].split(")")[0])
    wait_for(lambda: not Path(f"/proc/{pid}").exists()
             or "Z" in Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0],
             "the mount process to exit")


@pytest.mark.allow_warnings
def test_mount_read_when_the_service_goes_away(env: Path, node: Path, tmp_path: Path,
                                               rgw: None) -> None:
    """A read the service cannot answer fails with EIO (after the bounded retries), never
    hangs and never gives wrong bytes; once the service is back the same read works."""
    assert run_cli("backup", "--config", env).returncode == 0
    big = max((p for p in node.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    rel = big.relative_to(node)
    with Mount(env, tmp_path / "mnt") as m:
        assert (m.path / "node1").is_dir()
        assert server_command("rgw-kill").returncode == 0
        started = time.monotonic()
        with pytest.raises(OSError) as e:
            (m.path / "node1" / rel).read_bytes()
        assert e.value.errno == errno.EIO
        assert time.monotonic() - started < 60
        # Listing a folder not read yet: EIO too, not the network's ECONNREFUSED.
        folders = sorted(p.relative_to(node) for p in node.rglob("*") if p.is_dir())
        with pytest.raises(OSError) as e:
            for folder in folders:
                os.listdir(m.path / "node1" / folder)
        assert e.value.errno == errno.EIO
        assert server_command("rgw-start").returncode == 0
        assert (m.path / "node1" / rel).read_bytes() == big.read_bytes()
    log = m.log.read_text()
    # One line per failure, as for a disk's I/O error: no "internal error", no traceback.
    assert "cannot connect to" in log and "internal error" not in log, log
    assert "Traceback" not in log, log


@pytest.mark.allow_warnings
def test_service_going_away_in_a_backup_commits_nothing(
        env: Path, node: Path, tmp_path: Path, s3_server: S3Server, s3_bucket: str,
        rgw: None) -> None:
    assert run_cli("backup", "--config", env).returncode == 0
    before = generations(s3_server, s3_bucket)
    changed = tmp_path / "node"
    subprocess.run(["cp", "-a", "--sparse=always", str(node), str(changed)], check=True)
    (changed / "new-file").write_bytes(os.urandom(300_000))
    env2 = s3_env(tmp_path / "changed.env", s3_server, s3_bucket, changed)
    # The lock it cannot give back while the service is away goes stale after 3 s.
    cli_env = {**clean_env(), "HUMIOFS_FAILPOINT": "committing:1", "HUMIOFS_S3_LEASE_S": "3"}
    proc = subprocess.Popen([sys.executable, "-m", "humiofs", "backup", "--config", str(env2)],
                            env=cli_env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        # Stopped with its packs stored and its generation not yet written: the service goes.
        wait_for(lambda: Path(f"/proc/{proc.pid}/stat").read_text().split(")")[1].split()[0]
                 == "T", "the backup to reach its commit")
        assert server_command("rgw-kill").returncode == 0
        proc.send_signal(signal.SIGCONT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 7, err
    line = [ln for ln in err.splitlines() if ln.startswith("humiofs: error:")]
    assert len(line) == 1 and "Traceback" not in err, err
    assert "cannot connect to http://127.0.0.1:" in line[0]
    assert server_command("rgw-start").returncode == 0
    assert generations(s3_server, s3_bucket) == before
    check = run_cli("check", "--config", env)
    assert check.returncode == 0, check.stdout + check.stderr
    assert backup_once_free(env2) == 0
    target = tmp_path / "restored"
    assert run_cli("restore", "--config", env2, "--to", target).returncode == 0
    assert tree_digest(target) == source_digest(changed)


def stopped_backup(env: Path, failpoint: str, **extra: str) -> subprocess.Popen[str]:
    """A backup stopped (SIGSTOP) at `failpoint`, holding the writer lock."""
    proc = subprocess.Popen([sys.executable, "-m", "humiofs", "backup", "--config", str(env)],
                            env={**clean_env(), "HUMIOFS_FAILPOINT": failpoint, **extra},
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: proc.poll() is not None or Path(f"/proc/{proc.pid}/stat").read_text()
                 .split(")")[1].split()[0] == "T", f"the backup to reach {failpoint}")
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    assert proc.poll() is None, proc.communicate()
    return proc


@pytest.mark.allow_warnings
def test_two_writers(env: Path, tmp_path: Path, node: Path, s3_server: S3Server,
                     s3_bucket: str) -> None:
    """A running backup holds the lock: a second one is refused (exit 4). One that stops
    renewing its lease (stopped here; a hung host) loses the lock to the next backup once
    the lease ran out, and when it carries on it commits nothing (exit 7)."""
    first = stopped_backup(env, "pack:1")
    try:
        second = run_cli("backup", "--config", env)
        assert second.returncode == 4, second.stderr
        assert "another humiofs writer is using s3://" in one_line(second)
    finally:
        first.kill()
        first.communicate()
    # Its lock is left behind for its whole lease (5 minutes): another store from here on.
    env = s3_env(tmp_path / "other.env", s3_server, s3_bucket, node, name="node2")
    slow = stopped_backup(env, "pack:1", HUMIOFS_S3_LEASE_S="3")
    try:
        assert backup_once_free(env) == 0
        slow.send_signal(signal.SIGCONT)
        out, err = slow.communicate(timeout=120)
    finally:
        if slow.poll() is None:
            slow.kill()
            slow.communicate()
    assert slow.returncode == 7, err
    assert "lost the lock lock of s3://" in err
    backend = store_of(s3_server, s3_bucket, "node2")
    assert len(backend.list("generations")) == 1


def test_watch(env: Path, tmp_path: Path, node: Path, s3_server: S3Server,
               s3_bucket: str) -> None:
    live = tmp_path / "live"
    subprocess.run(["cp", "-a", "--sparse=always", str(node), str(live)], check=True)
    env2 = s3_env(tmp_path / "live.env", s3_server, s3_bucket, live)
    log = tmp_path / "watch.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "humiofs", "backup", "--config",
                                 str(env2), "--watch", "--interval", "0.3"],
                                env=clean_env(), cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=err)
    try:
        wait_for(lambda: len(generations(s3_server, s3_bucket)) >= 1 or proc.poll() is not None,
                 "the first generation", 60)
        assert proc.poll() is None, log.read_text()
        (live / "written-later").write_bytes(b"x" * 5000)
        target = tmp_path / "restored"

        def caught_up() -> bool:
            if proc.poll() is not None:
                return True
            subprocess.run(["rm", "-rf", str(target)])
            run_cli("restore", "--config", env2, "--to", target)
            return (target / "written-later").exists()
        wait_for(caught_up, "the change in a generation", 60)
        assert proc.poll() is None, log.read_text()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert tree_digest(target) == source_digest(live)


def test_missing_bucket(tmp_path: Path, s3_server: S3Server, node: Path) -> None:
    env = s3_env(tmp_path / "e.env", s3_server, "no-such-bucket", node)
    (tmp_path / "mnt").mkdir()
    for args in (["backup"], ["ls"], ["check"], ["prune"], ["restore", "--to", tmp_path / "r"],
                 ["mount", tmp_path / "mnt"]):
        res = run_cli(*args, "--config", env)
        assert res.returncode == 2, (args, res.stderr)
        assert one_line(res) == ("humiofs: error: the bucket no-such-bucket does not exist at "
                                 f"{s3_server.endpoint}; create it (humiofs never does) or "
                                 "correct BACKUP_DIR"), args
    assert not (tmp_path / "r").exists()


def test_wrong_credentials(tmp_path: Path, s3_server: S3Server, s3_bucket: str,
                           node: Path) -> None:
    env = s3_env(tmp_path / "e.env", s3_server, s3_bucket, node,
                 AWS_SECRET_ACCESS_KEY="not-the-secret-at-all")
    (tmp_path / "mnt").mkdir()
    for args in (["backup"], ["ls"], ["check"], ["restore", "--to", tmp_path / "r"],
                 ["mount", tmp_path / "mnt"]):
        res = run_cli(*args, "--config", env)
        assert res.returncode == 7, (args, res.stderr)
        line = one_line(res)
        assert "refused access to the bucket" in line and "SignatureDoesNotMatch" in line
        assert "check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY" in line
        assert "not-the-secret-at-all" not in res.stderr + res.stdout


def test_settings_errors(tmp_path: Path, node: Path) -> None:
    """Refused before any request: one line, exit 2."""
    cases = [({"BACKUP_DIR": "s3://Bad_Bucket/x"}, "is not s3://BUCKET/PREFIX"),
             ({"AWS_ENDPOINT_URL": "http://s3.example.com"}, "AWS_ALLOW_HTTP=true"),
             ({"AWS_ACCESS_KEY_ID": ""}, "AWS_ACCESS_KEY_ID is not set")]
    for over, want in cases:
        settings = {"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_ACCESS_KEY_ID": "id",
                    "AWS_SECRET_ACCESS_KEY": "secret", **over}
        backup_dir = settings.pop("BACKUP_DIR", "s3://bucket/x")
        env = write_env(tmp_path / "e.env", backup_dir, directory=node,  # type: ignore
                        **settings)
        res = run_cli("backup", "--config", env)
        assert res.returncode == 2, res.stderr
        assert want in one_line(res)
    # What the environment holds goes into request headers: a control character is refused
    # (obstore would panic), without showing the value (it may be the secret).
    base = write_env(tmp_path / "b.env", "s3://bucket/x", directory=node,  # type: ignore
                     AWS_ENDPOINT_URL="http://127.0.0.1:9", AWS_ACCESS_KEY_ID="id",
                     AWS_SECRET_ACCESS_KEY="secret")
    for name, value in [("AWS_REGION", "x\x01"), ("AWS_SESSION_TOKEN", "tok\x7fen"),
                        ("AWS_SECRET_ACCESS_KEY", "se cret\x02"),
                        ("AWS_ACCESS_KEY_ID", "id\u00e9")]:
        res = run_cli("ls", "--config", base, env={**clean_env(), name: value})
        assert res.returncode == 2, res.stderr
        line = one_line(res)
        assert f"{name} may hold only visible ASCII" in line and value not in res.stderr, line
        assert "panicked" not in res.stderr
    for url, want in [("s3://bucket//x", "may not have empty"),
                      ("s3://bucket/x//y", "may not have empty"),
                      ("S3://bucket/x", "written s3:// (lower case), not S3://")]:
        env = write_env(tmp_path / "u.env", url, directory=node,  # type: ignore
                        AWS_ENDPOINT_URL="http://127.0.0.1:9", AWS_ACCESS_KEY_ID="id",
                        AWS_SECRET_ACCESS_KEY="secret")
        res = run_cli("ls", "--config", env)
        assert res.returncode == 2 and want in one_line(res), res.stderr
    env = write_env(tmp_path / "p.env", "s3://bucket/x", directory=node,  # type: ignore
                    AWS_ENDPOINT_URL="https://user:hunter2@s3.example.com",
                    AWS_ACCESS_KEY_ID="id", AWS_SECRET_ACCESS_KEY="secret")
    res = run_cli("ls", "--config", env)
    assert res.returncode == 2 and "user:***@s3.example.com" in one_line(res), res.stderr
    assert "hunter2" not in res.stderr
    env = write_env(tmp_path / "k.env", "s3://bucket/x", directory=node,  # type: ignore
                    AWS_ENDPOINT_URL="http://127.0.0.1:9", AWS_ACCESS_KEY_ID="id",
                    AWS_SECRET_KEY="secret")
    res = run_cli("ls", "--config", env)
    assert "did you mean AWS_SECRET_ACCESS_KEY?" in res.stderr, res.stderr
    # AWS_* in the env file are humiofs settings: no "not a humiofs setting" warning.
    env = write_env(tmp_path / "e.env", "s3://bucket/x", directory=node,  # type: ignore
                    AWS_ENDPOINT_URL="http://127.0.0.1:9", AWS_ACCESS_KEY_ID="id",
                    AWS_SECRET_ACCESS_KEY="secret", AWS_REGION="eu-west-1")
    res = run_cli("ls", "--config", env)
    assert "not a humiofs setting" not in res.stderr
    assert res.returncode == 7, res.stderr
    assert "cannot connect to http://127.0.0.1:9" in one_line(res)
    assert KEY not in res.stderr


@pytest.mark.allow_warnings
def test_watch_rides_out_an_outage(env: Path, tmp_path: Path, node: Path, s3_server: S3Server,
                                   s3_bucket: str, rgw: None) -> None:
    """The service going away for a while fails the watch's passes (one line, --json an
    object with `error`), not the watch: it keeps its lock and commits once it is back."""
    import json
    live = tmp_path / "live"
    subprocess.run(["cp", "-a", "--sparse=always", str(node), str(live)], check=True)
    env2 = s3_env(tmp_path / "live.env", s3_server, s3_bucket, live)
    out_path, err_path = tmp_path / "watch.out", tmp_path / "watch.err"
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "humiofs", "backup", "--config",
                                 str(env2), "--watch", "--interval", "1", "--json"],
                                env=clean_env(), cwd=ROOT, stdout=out, stderr=err)

    def passes() -> list[dict[str, object]]:
        return [json.loads(ln) for ln in out_path.read_text().splitlines() if ln.strip()]
    try:
        wait_for(lambda: proc.poll() is not None or any(p.get("committed") for p in passes()),
                 "the first generation", 60)
        assert proc.poll() is None, err_path.read_text()
        assert server_command("rgw-kill").returncode == 0
        seen = len(passes())
        wait_for(lambda: proc.poll() is not None or any(p.get("error") for p in passes()[seen:]),
                 "a pass failing for the outage", 60)
        assert proc.poll() is None, err_path.read_text()
        assert server_command("rgw-start").returncode == 0
        (live / "written-later").write_bytes(b"y" * 5000)
        seen = len(passes())
        wait_for(lambda: proc.poll() is not None
                 or any(p.get("committed") for p in passes()[seen:]), "a pass after it", 90)
        assert proc.poll() is None, err_path.read_text()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, err_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = err_path.read_text()
    assert "Traceback" not in log and "cannot remove the lock" not in log, log
    failed = [p for p in passes() if p.get("error")]
    assert failed and "cannot connect to" in str(failed[0]["error"]), failed
    target = tmp_path / "restored"
    assert run_cli("restore", "--config", env2, "--to", target).returncode == 0
    assert tree_digest(target) == source_digest(live)


def test_an_endpoint_that_is_not_s3(tmp_path: Path, node: Path) -> None:
    """A web server at AWS_ENDPOINT_URL answering 404 to bucket calls is a setting to fix
    (exit 2), not a damaged store (5)."""
    import http.server
    import threading
    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_error(404)
        do_HEAD = do_PUT = do_GET

        def log_message(self, *args: object) -> None:
            pass
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        env = write_env(tmp_path / "e.env", "s3://bucket/x", directory=node,  # type: ignore
                        AWS_ENDPOINT_URL=f"http://127.0.0.1:{server.server_address[1]}",
                        AWS_ACCESS_KEY_ID="id", AWS_SECRET_ACCESS_KEY="secret")
        for args in (["ls"], ["check"], ["restore", "--to", tmp_path / "r"]):
            res = run_cli(*args, "--config", env)
            assert res.returncode == 2, (args, res.stderr)
            assert "does not look like an S3 service" in one_line(res)
    finally:
        server.shutdown()
        server.server_close()
