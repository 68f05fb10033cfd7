"""The local S3 server (scripts/s3-server) and humiofs's S3 client (obstore) against it: the
calls a store on object storage makes, and the server script's start, crash and stop."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import obstore
import pytest
from obstore.exceptions import AlreadyExistsError

from conftest import ROOT
from s3util import S3Server, parse_settings, processes_using, server_command

# All of them start servers, the last two of their own.
pytestmark = pytest.mark.s3


def test_objects_round_trip(s3_server: S3Server, s3_bucket: str) -> None:
    store = s3_server.store(s3_bucket)
    data = os.urandom(300_000)
    obstore.put(store, "packs/ab/one", data)
    obstore.put(store, "packs/cd/two", b"two")
    obstore.put(store, "config", b"c")

    assert bytes(obstore.get(store, "packs/ab/one").bytes()) == data
    assert obstore.head(store, "packs/ab/one")["size"] == len(data)
    assert bytes(obstore.get_range(store, "packs/ab/one", start=65536, length=65536)) \
        == data[65536:131072]
    # A range reaching past the end gives the rest of the object.
    assert bytes(obstore.get_range(store, "packs/ab/one", start=299_990, length=100)) \
        == data[299_990:]
    parts = obstore.get_ranges(store, "packs/ab/one", starts=[0, 200_000], lengths=[10, 5000])
    assert [bytes(p) for p in parts] == [data[:10], data[200_000:205_000]]

    everything = sorted(m["path"] for batch in obstore.list(store) for m in batch)
    assert everything == ["config", "packs/ab/one", "packs/cd/two"]
    under = obstore.list_with_delimiter(store, "packs/")
    assert sorted(under["common_prefixes"]) == ["packs/ab", "packs/cd"]
    assert [m["path"] for m in obstore.list_with_delimiter(store)["objects"]] == ["config"]

    obstore.delete(store, "packs/ab/one")
    with pytest.raises(FileNotFoundError):
        obstore.get(store, "packs/ab/one")
    assert sorted(m["path"] for batch in obstore.list(store, "packs/") for m in batch) \
        == ["packs/cd/two"]


def test_create_if_absent(s3_server: S3Server, s3_bucket: str) -> None:
    """PUT with If-None-Match: * (what a writer lock is built on): the second create of a key
    fails and leaves the first one's bytes; of several at once exactly one wins."""
    store = s3_server.store(s3_bucket)
    obstore.put(store, "lock", b"holder 1", mode="create")
    with pytest.raises(AlreadyExistsError):
        obstore.put(store, "lock", b"holder 2", mode="create")
    assert bytes(obstore.get(store, "lock").bytes()) == b"holder 1"

    won: list[int] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def contend(i: int) -> None:
        barrier.wait()
        try:
            obstore.put(store, "race", f"holder {i}".encode(), mode="create")
            won.append(i)
        except AlreadyExistsError:
            pass
        except BaseException as e:
            errors.append(e)
    threads = [threading.Thread(target=contend, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(won) == 1
    assert bytes(obstore.get(store, "race").bytes()) == f"holder {won[0]}".encode()


def test_start_again_finds_the_running_server(s3_server: S3Server) -> None:
    for command in ("start", "env"):
        res = server_command(command)
        assert res.returncode == 0, res.stderr
        assert parse_settings(res.stdout) == s3_server.settings
    assert set(s3_server.settings) == {"AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID",
                                       "AWS_SECRET_ACCESS_KEY", "AWS_REGION"}


def test_crashed_server_is_replaced_and_stop_leaves_nothing(tmp_path: Path) -> None:
    """A second server in its own state folder: a start after one daemon died builds a new
    cluster, and stop ends every process and removes the state."""
    state = tmp_path / "s3"
    env = {**os.environ, "HUMIOFS_S3_STATE": str(state)}
    conf = state / "ceph.conf"
    try:
        first = server_command("start", env)
        assert first.returncode == 0, first.stderr
        assert len(processes_using(conf)) == 3

        rgw = int((state / "server.json").read_text().split('"rgw": ')[-1].split("}")[0])
        os.kill(rgw, signal.SIGKILL)
        res = server_command("env", env)
        assert res.returncode == 1
        assert "no server is running" in res.stderr

        second = server_command("start", env)
        assert second.returncode == 0, second.stderr
        assert parse_settings(second.stdout)["AWS_ACCESS_KEY_ID"] \
            != parse_settings(first.stdout)["AWS_ACCESS_KEY_ID"]
        assert len(processes_using(conf)) == 3
    finally:
        res = server_command("stop", env)
    assert res.returncode == 0, res.stderr
    assert processes_using(conf) == []
    assert sorted(p.name for p in state.iterdir()) == ["lock"]
    assert server_command("env", env).returncode == 1


def test_a_server_that_cannot_start_fails_the_tests(tmp_path: Path) -> None:
    """No silent skip: S3 tests error out with the script's own message."""
    (tmp_path / "file").write_text("")
    env = {**os.environ, "HUMIOFS_S3_STATE": str(tmp_path / "file" / "s3")}
    res = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q",
                          f"{Path(__file__).name}::test_objects_round_trip"],
                         cwd=ROOT / "tests", env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 1, res.stdout
    assert "scripts/s3-server start failed (exit 1)" in res.stdout
    assert "cannot use the state folder" in res.stdout
    assert "1 error" in res.stdout and "skipped" not in res.stdout
    assert "Traceback" not in res.stdout
