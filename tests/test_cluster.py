"""A cluster in one BACKUP_DIR: six nodes back up at the same time into one folder (a shared
drive), each into its own BACKUP_NAME; `check` of each store runs while they write; one mount
shows every node byte for byte."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, clean_env, make_sample, write_env
from mountutil import Mount, mounted_digest, source_digest

NODES = 6


def _start(*args: str | Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "humiofs", *map(str, args)],
                            env=clean_env(), text=True, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _finish(procs: list[subprocess.Popen[str]], what: str) -> list[str]:
    outs = []
    for i, proc in enumerate(procs):
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{what} {i + 1} exited {proc.returncode}: {out}{err}"
        outs.append(out)
    return outs


@pytest.mark.allow_warnings     # sample nodes have no BOOTSTRAP_HOST_ID
def test_six_writers_into_one_backup_dir(tmp_path: Path) -> None:
    backup_dir = tmp_path / "shared"
    backup_dir.mkdir()
    nodes, envs = [], []
    for i in range(1, NODES + 1):
        node = make_sample(tmp_path / f"node{i}", size="3M", small_files=150, seed=100 + i,
                           node_id=i)
        nodes.append(node)
        envs.append(write_env(tmp_path / f"node{i}.env", backup_dir, name=f"node{i}",
                              directory=node, BACKUP_CHECKPOINT_BYTES=str(1 << 20)))
    # Round one: six first backups at once (each creates its store in the shared folder).
    _finish([_start("backup", "-c", env, "--no-progress") for env in envs], "first backup")
    # Round two: every node changes; six backups at once, and a check of every store while
    # they run (check takes no writer lock; it must find each store consistent).
    for i, node in enumerate(nodes):
        seg = sorted(node.glob("dataspace_*/datasource_*/segment_*"))[0]
        with open(seg, "ab") as f:
            f.write(bytes([i]) * 70000)
        (node / f"new-{i}.txt").write_text(f"node {i + 1}\n" * 100)
    writers = [_start("backup", "-c", env, "--no-progress") for env in envs]
    checks = [_start("check", "-c", env) for env in envs]
    outs = _finish(checks, "check")
    assert all("healthy" in out for out in outs), outs
    _finish(writers, "second backup")
    _finish([_start("check", "-c", env) for env in envs], "check after the writers")

    mount_env = write_env(tmp_path / "all.env", backup_dir, name=None)
    with Mount(mount_env, tmp_path / "mnt") as m:
        assert sorted(p.name for p in m.path.iterdir()) == (
            [".generations"] + [f"node{i}" for i in range(1, NODES + 1)])
        for i, node in enumerate(nodes, 1):
            assert mounted_digest(m.path / f"node{i}", extents=False) == \
                source_digest(node, extents=False), f"node{i}"
