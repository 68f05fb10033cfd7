"""The command line end to end: summary lines, exit codes as documented in cli.EPILOG, the key
(wrong, changed, refused, never shown), ls, --at, --missing-only, target checks, store modes."""
from __future__ import annotations

import json
import os
import re
import resource
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import storetools
from conftest import KEY, ROOT, clean_env, make_sample, run_cli, tree_digest, write_env
from storetools import create_store, pack_files, source_digest, store_files, wait_not_racy

from humiofs import cli, errors
from humiofs.store.generations import format_time
from humiofs.store.repository import Store

WRONG = "not the right key"
BACKUP_LINE = re.compile(
    r"^backup (?P<name>\S+): generation (?P<time>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z) "
    r"\((?P<gen>\d{13}-[0-9a-f]{16})\): (?P<new>\d+) new, "
    r"(?P<changed>\d+) changed, (?P<unchanged>\d+) unchanged files(, (?P<skipped>\d+) skipped)?; "
    r"read (?P<read>[\d.]+ \w+), stored [\d.]+ \w+ in [\d.]+s$")
RESTORE_LINE = re.compile(
    r"^restore (?P<name>\S+): generation (?P<time>\S+) \((?P<gen>\S+)\) -> (?P<to>.+): "
    r"(?P<files>\d+) files, \d+ folders, "
    r"\d+ symlinks(, (?P<present>\d+) already there \(left alone\))?"
    r"(, (?P<alone>\d+) left alone \(named above\))?; [\d.]+ \w+ of data in [\d.]+s$")


@dataclass
class Made:
    node: Path
    env: Path
    store: Path
    backups: Path
    first: subprocess.CompletedProcess[str]
    second: subprocess.CompletedProcess[str]
    packs: set[str]


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> Made:
    """A small node, backed up twice through the CLI into BACKUP_DIR/node1."""
    base = tmp_path_factory.mktemp("cli")
    node = make_sample(base / "node", size="2M", small_files=200, seed=31)
    wait_not_racy(node)
    backups = base / "backups"
    backups.mkdir()
    env = write_env(base / "node.env", backups, directory=node)
    first = run_cli("backup", "-c", env)
    packs = pack_files(backups / "node1")
    second = run_cli("backup", "-c", env)
    return Made(node, env, backups / "node1", backups, first, second, packs)


@pytest.fixture()
def copy(made: Made, tmp_path: Path) -> tuple[Path, Path]:
    """A private copy of the module's store, and an env file for it."""
    dst = tmp_path / "backups" / "node1"
    shutil.copytree(made.store, dst)
    return dst, write_env(tmp_path / "node.env", tmp_path / "backups",
                          directory=made.node)


def one_line_error(r: subprocess.CompletedProcess[str]) -> str:
    assert r.stderr.startswith("humiofs: error: ") and r.stderr.count("\n") == 1, r.stderr
    return r.stderr


# -- summary lines and round trip --------------------------------------------------------------

def test_first_backup_summary(made: Made) -> None:
    r = made.first
    assert r.returncode == 0 and r.stderr == "", r.stderr
    m = BACKUP_LINE.match(r.stdout.strip())
    assert m, r.stdout
    n_files = sum(1 for v in source_digest(made.node).values() if v[0] == "f")
    assert (m["name"], int(m["new"]), int(m["changed"]), int(m["unchanged"])) == \
        ("node1", n_files, 0, 0)


def test_second_backup_reads_nothing(made: Made) -> None:
    r = made.second
    assert r.returncode == 0, r.stderr
    m = BACKUP_LINE.match(r.stdout.strip())
    assert m and int(m["new"]) == int(m["changed"]) == 0 and m["read"] == "0 B", r.stdout
    assert pack_files(made.store) == made.packs
    assert len(os.listdir(made.store / "generations")) == 2


def test_restore_round_trip(made: Made, tmp_path: Path) -> None:
    r = run_cli("restore", "-c", made.env, "--to", tmp_path / "t")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    m = RESTORE_LINE.match(r.stdout.strip())
    assert m and m["to"] == str(tmp_path / "t"), r.stdout
    digest = source_digest(made.node)
    assert tree_digest(tmp_path / "t") == digest
    assert int(m["files"]) == sum(1 for v in digest.values() if v[0] == "f")
    for src in made.node.glob("dataspace_*/datasource_*/*.gz.tmp"):
        dst = tmp_path / "t" / src.relative_to(made.node)
        assert dst.stat().st_blocks <= src.stat().st_blocks + 8


def test_flags_override_env_file(made: Made, tmp_path: Path) -> None:
    env = write_env(tmp_path / "other.env", tmp_path / "nowhere", name="nothing")
    r = run_cli("restore", "-c", env, "--backup-dir", made.backups, "--name", "node1",
                "--to", tmp_path / "t")
    assert r.returncode == 0, r.stderr


def test_settings_from_environment_and_key_file(made: Made, tmp_path: Path) -> None:
    kf = tmp_path / "keyfile"
    kf.write_text(KEY + "\nignored second line\n")
    environ = {**clean_env(), "BACKUP_DIR": str(made.backups), "BACKUP_NAME": "node1",
               "BACKUP_KEY": WRONG}
    r = run_cli("restore", "--key-file", kf, "--to", tmp_path / "t", env=environ)
    assert r.returncode == 0, r.stderr
    environ["BACKUP_KEY_FILE"] = str(kf)
    r = run_cli("ls", env=environ)
    assert r.returncode == 0 and "2 generation(s)" in r.stdout, r.stderr


# -- restore targets ----------------------------------------------------------------------------

def test_non_empty_target(made: Made, tmp_path: Path) -> None:
    target = tmp_path / "t"
    target.mkdir()
    (target / "keep").write_bytes(b"mine")
    before = tree_digest(target)
    r = run_cli("restore", "-c", made.env, "--to", target)
    assert r.returncode == 6
    assert "--missing-only" in one_line_error(r) and "--overwrite" in r.stderr
    assert tree_digest(target) == before


def test_target_is_a_file(made: Made, tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"x")
    r = run_cli("restore", "-c", made.env, "--to", tmp_path / "f")
    assert r.returncode == 6 and (tmp_path / "f").read_bytes() == b"x"


def test_missing_only_and_overwrite(made: Made, tmp_path: Path) -> None:
    env, node = made.env, made.node
    target = tmp_path / "t"
    assert run_cli("restore", "-c", env, "--to", target).returncode == 0
    segs = sorted(target.glob("dataspace_*/datasource_*/segment_*.gz"))
    for p in segs[:3]:
        p.unlink()
    segs[3].write_bytes(b"locally changed")
    r = run_cli("restore", "-c", env, "--to", target, "--missing-only")
    assert r.returncode == 0, r.stderr
    m = RESTORE_LINE.match(r.stdout.strip())
    assert m and int(m["files"]) == 3, r.stdout
    assert segs[3].read_bytes() == b"locally changed"
    assert all(p.read_bytes() == (node / p.relative_to(target)).read_bytes() for p in segs[:3])
    # What was there and left alone is counted: in the line, and as "skipped" in --json.
    present = sum(1 for p in target.rglob("*") if p.is_symlink() or not p.is_dir())
    assert f", {present - 3} already there (left alone)" in r.stdout, r.stdout
    segs[0].unlink()
    r = run_cli("restore", "-c", env, "--to", target, "--missing-only", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["files"] == 1 and doc["skipped"] == present - 1, doc
    r = run_cli("restore", "-c", env, "--to", target, "--overwrite")
    assert r.returncode == 0, r.stderr
    want = {k: v for k, v in source_digest(node).items() if v[0] == "f"}
    assert {k: v for k, v in tree_digest(target).items() if v[0] == "f"} == want
    r = run_cli("restore", "-c", env, "--to", target, "--overwrite", "--missing-only")
    assert r.returncode == 2


def test_planted_symlink_left_alone_exits_8(made: Made, tmp_path: Path) -> None:
    env = made.env
    target = tmp_path / "t"
    assert run_cli("restore", "-c", env, "--to", target).returncode == 0
    victim = sorted(target.glob("dataspace_*/datasource_*"))[0]
    shutil.rmtree(victim)
    outside = tmp_path / "outside"
    outside.mkdir()
    victim.symlink_to(outside)
    r = run_cli("restore", "-c", env, "--to", target, "--missing-only")
    assert r.returncode == 8, r.stderr
    m = RESTORE_LINE.match(r.stdout.strip())
    assert m and m["alone"] == "1", r.stdout
    assert "WARNING" in r.stderr and victim.name in r.stderr
    assert list(outside.iterdir()) == [] and victim.is_symlink()


# -- generations in time --------------------------------------------------------------------------

@dataclass
class History:
    env: Path
    digests: list[dict[str, tuple[object, ...]]]
    names: list[str]
    deleted: str

    @property
    def times(self) -> list[int]:
        return [int(n[:13]) for n in self.names]


@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory) -> History:
    """Three CLI backups: as made; after deleting a segment; after adding a file."""
    base = tmp_path_factory.mktemp("cli-history")
    node = make_sample(base / "node", size="1M", small_files=200, seed=32)
    (base / "backups").mkdir()
    env = write_env(base / "node.env", base / "backups", directory=node)
    deleted = sorted(node.glob("dataspace_*/datasource_*/segment_*.gz"))[0]
    digests = []
    for step in range(3):
        if step == 1:
            deleted.unlink()
        if step == 2:
            (node / "added.txt").write_bytes(b"added\n")
        r = run_cli("backup", "-c", env)
        assert r.returncode == 0, r.stderr
        digests.append(source_digest(node))
    names = sorted(os.listdir(base / "backups" / "node1" / "generations"))
    return History(env, digests, names, str(deleted.relative_to(node)))


@pytest.mark.parametrize("at,want", [
    (lambda t: f"@{t[0] / 1000}", 0),
    (lambda t: f"@{(t[1] - 1) / 1000:.3f}", 0),
    (lambda t: f"@{t[1] / 1000:.3f}", 1),
    (lambda t: f"@{(t[2] + 999) / 1000:.3f}", 2),
    (lambda t: format_time(t[2] + 1000), 2),
    (lambda t: "2999-01-01T00:00", 2),
])
def test_restore_at(history: History, tmp_path: Path, at: Callable[[list[int]], str],
                    want: int) -> None:
    when = at(history.times)
    r = run_cli("restore", "-c", history.env, "--to", tmp_path / "t", "--at", when)
    assert r.returncode == 0, r.stderr
    assert tree_digest(tmp_path / "t") == history.digests[want]


def test_restore_at_brings_deleted_file_back(history: History, tmp_path: Path) -> None:
    t0 = history.times[0]
    r = run_cli("restore", "-c", history.env, "--to", tmp_path / "t", "--at", f"@{t0 / 1000}")
    assert r.returncode == 0 and (tmp_path / "t" / history.deleted).is_file()
    r = run_cli("restore", "-c", history.env, "--to", tmp_path / "u")
    assert r.returncode == 0 and not (tmp_path / "u" / history.deleted).exists()


@pytest.mark.parametrize("when,why", [
    ("@1", "no generation at or before 1970-01-01T00:00:01.999Z"),
    ("1999-01-01", "no generation at or before"),
    (f"{1:013d}-{'0' * 16}", f"no generation {1:013d}-{'0' * 16}"),
    ("yesterday", "a time as ls prints it"),
    ("2026-13-01T00:00Z", "a time as ls prints it"),
    ("@1.5.5", "a time as ls prints it")])
def test_restore_at_errors(history: History, tmp_path: Path, when: str, why: str) -> None:
    r = run_cli("restore", "-c", history.env, "--to", tmp_path / "t", "--at", when)
    assert r.returncode == 2
    assert why in one_line_error(r)
    assert not (tmp_path / "t").exists()


def ls_generations(env: Path) -> list[tuple[str, str]]:
    """(time, generation name) of each generation, as `ls` prints them."""
    r = run_cli("ls", "-c", env)
    assert r.returncode == 0, r.stderr
    return [(line.split()[0], line.split()[1]) for line in r.stdout.splitlines()[1:]]


def restored_generation(r: subprocess.CompletedProcess[str]) -> tuple[str, str]:
    """(time, name) of the generation a restore says it chose."""
    assert r.returncode == 0, r.stderr
    m = RESTORE_LINE.match(r.stdout.strip())
    assert m, r.stdout
    return m["time"], m["gen"]


@pytest.mark.parametrize("form", ["as ls prints it", "generation name", "to the second"])
def test_restore_at_what_ls_prints(history: History, tmp_path: Path, form: str) -> None:
    """A time or name copied from ls gives that generation, and the summary says which one
    (full time in UTC, and name). A time to the second covers that whole second."""
    listed = ls_generations(history.env)
    assert [name for _, name in listed] == history.names
    assert [when for when, _ in listed] == [format_time(t) for t in history.times]
    for i, (when, name) in enumerate(listed):
        at = {"as ls prints it": when, "generation name": name,
              "to the second": when[:19] + "Z"}[form]
        want = i
        if form == "to the second":   # the latest generation committed by the end of it
            want = max(j for j, t in enumerate(history.times) if t // 1000 <= history.times[i]
                       // 1000)
        r = run_cli("restore", "-c", history.env, "--to", tmp_path / f"t{i}", "--at", at)
        assert restored_generation(r) == listed[want], (at, r.stdout)
        assert tree_digest(tmp_path / f"t{i}") == history.digests[want]


@dataclass
class SameSecond:
    env: Path
    backups: Path
    names: list[str]
    digests: list[dict[str, tuple[object, ...]]]


@pytest.fixture(scope="module")
def same_second(tmp_path_factory: pytest.TempPathFactory) -> SameSecond:
    """Two generations committed within one second (backups in-process, as fast as they go)."""
    base = tmp_path_factory.mktemp("same-second")
    node = base / "node"
    node.mkdir()
    (node / "cluster_membership.uuid").write_text("0b5a6c1e-8d3f-4c2a-9e71-2f6d8a9b0c13")
    store = create_store(base / "backups" / "node1")
    made = storetools.backups_within_one_second(store, node)
    return SameSecond(write_env(base / "node.env", base / "backups", directory=node),
                      base / "backups", [g.name for g, _ in made], [d for _, d in made])


def test_two_generations_in_one_second(same_second: SameSecond, tmp_path: Path) -> None:
    listed = dict((name, when) for when, name in ls_generations(same_second.env))
    times = [listed[n] for n in same_second.names]
    assert times[0] != times[1] and times[0][:19] == times[1][:19]
    for i, name in enumerate(same_second.names):
        for at in (times[i], name):
            r = run_cli("restore", "-c", same_second.env, "--to", tmp_path / "t", "--at", at)
            assert restored_generation(r) == (times[i], name)
            assert tree_digest(tmp_path / "t") == same_second.digests[i]
            shutil.rmtree(tmp_path / "t")


def test_ls(history: History, made: Made) -> None:
    env = history.env
    r = run_cli("ls", "-c", env)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "node1: 3 generation(s)"
    for line, name, digest in zip(lines[1:], history.names, history.digests):
        n_files = sum(1 for v in digest.values() if v[0] == "f")
        assert name in line and f"{n_files} files" in line and "node 1" in line
    assert len(lines) == 4


def test_ls_all_stores_without_key(made: Made, tmp_path: Path) -> None:
    backups = tmp_path / "backups"
    shutil.copytree(made.store, backups / "node1")
    shutil.copytree(made.store, backups / "node2")
    (backups / "not-a-store").mkdir()
    env = write_env(tmp_path / "all.env", backups, name=None, key=None)
    r = run_cli("ls", "-c", env)
    assert r.returncode == 0, r.stderr
    gens = sorted(os.listdir(backups / "node1" / "generations"))
    assert r.stdout.splitlines() == [
        "node1: 2 generation(s)", *(f"  {format_time(int(g[:13]))}  {g}" for g in gens),
        "node2: 2 generation(s)", *(f"  {format_time(int(g[:13]))}  {g}" for g in gens)]


def test_ls_all_stores_with_another_nodes_key(made: Made, tmp_path: Path) -> None:
    backups = tmp_path / "backups"
    shutil.copytree(made.store, backups / "node1")
    (backups / "node2").mkdir()
    s2 = backups / "other"
    shutil.copytree(made.store, s2)
    Store.open(s2, KEY).change_key("the other node's key")
    env = write_env(tmp_path / "all.env", backups, name=None)
    r = run_cli("ls", "-c", env)
    assert r.returncode == 0, r.stderr
    assert "other: the key does not open this backup" in r.stdout
    assert "node1: 2 generation(s)" in r.stdout


def test_ls_empty_backup_dir(tmp_path: Path) -> None:
    r = run_cli("ls", "-c", write_env(tmp_path / "e.env", tmp_path, name=None))
    assert r.returncode == 0 and r.stdout == f"no backups in {tmp_path}\n"


# -- the key --------------------------------------------------------------------------------------

WRONG_KEY_COMMANDS: dict[str, Callable[[Path, Path], list[str | Path]]] = {
    "backup": lambda env, tmp: ["backup", "-c", env],
    "restore": lambda env, tmp: ["restore", "-c", env, "--to", tmp / "target"],
    "ls": lambda env, tmp: ["ls", "-c", env],
    "key change": lambda env, tmp: ["key", "change", "-c", env, "--new-key-file", tmp / "new"],
}


@pytest.mark.parametrize("command", sorted(WRONG_KEY_COMMANDS))
def test_wrong_key(made: Made, tmp_path: Path, command: str) -> None:
    store = made.store
    env = write_env(tmp_path / "wrong.env", made.backups, directory=made.node,
                    key=WRONG)
    (tmp_path / "new").write_text("a new key\n")
    before = store_files(store)
    r = run_cli(*WRONG_KEY_COMMANDS[command](env, tmp_path))
    assert r.returncode == 3, (r.stdout, r.stderr)
    msg = one_line_error(r)
    assert str(store) in msg and "key is lost" in msg and "delete" not in msg
    # How to check the key comes first: where it was read from, and what counts in it. The
    # advice for a lost key (a fresh backup) comes after it.
    check = msg.index(f"Check the key first: it was read from BACKUP_KEY on line 4 of the env "
                      f"file {env}")
    assert "every character" in msg and "blanks" in msg and "quotes" in msg
    assert check < msg.index("key is lost") < msg.index("fresh backup") < msg.index("keep this")
    assert store_files(store) == before
    assert not (tmp_path / "target").exists()
    assert WRONG not in r.stdout + r.stderr


def test_wrong_key_names_where_it_was_read(made: Made, tmp_path: Path) -> None:
    env = write_env(tmp_path / "nokey.env", made.backups, key=None)
    kf = tmp_path / "key"
    kf.write_text(WRONG + "\n")
    for args, environ, source in (
            ((), {"BACKUP_KEY": WRONG}, "BACKUP_KEY in the environment"),
            (("--key-file", kf), {}, f"the first line of the key file {kf} (--key-file)")):
        r = run_cli("ls", "-c", env, *args, env={**clean_env(), **environ})
        assert r.returncode == 3
        assert f"Check the key first: it was read from {source}," in one_line_error(r)
        assert WRONG not in r.stderr


def test_a_service_with_environmentfile_and_a_person_use_one_key(made: Made,
                                                                 tmp_path: Path) -> None:
    """A unit with EnvironmentFile= and --config of the same env file: systemd puts its own
    reading of BACKUP_KEY in the environment (backslashes dropped). The store it writes opens
    by hand with --config alone, and the other way round."""
    line = "C:\\keys\\prod 'x'"
    systemd = "C:keysprod 'x'"      # systemd's reading (test_config checks it against systemd)
    backups = tmp_path / "backups"
    backups.mkdir()
    env = write_env(tmp_path / "node.env", backups, directory=made.node, key=line)
    service = {**clean_env(), "BACKUP_KEY": systemd}
    r = run_cli("backup", "-c", env, env=service)
    assert r.returncode == 0 and "WARNING" not in r.stderr, r.stderr
    r = run_cli("restore", "-c", env, "--to", tmp_path / "t")
    assert r.returncode == 0 and "WARNING" not in r.stderr, r.stderr
    assert tree_digest(tmp_path / "t") == source_digest(made.node)
    assert Store.open(backups / "node1", "C:\\keys\\prod 'x'").passphrase == line
    r = run_cli("backup", "-c", env, env=service)
    assert r.returncode == 0 and "WARNING" not in r.stderr, r.stderr


@pytest.mark.parametrize("source", ["environment", "key file", "systemd", "bom", "bom 0.2"])
def test_a_store_made_with_an_earlier_reading_of_the_key_still_opens(
        made: Made, tmp_path: Path, source: str) -> None:
    """Earlier versions used the environment's value and a key file's line as they were, and a
    service with EnvironmentFile= used systemd's reading: such a store opens, with a warning
    that says what to do, and after `key change` with the same key it opens without one."""
    written, earlier = {"environment": ("  my key ", "  my key "),
                        "key file": ('"my key"', '"my key"'),
                        "systemd": ("C:\\keys\\prod", "C:keysprod"),
                        # A key file opening with a BOM: 0.1 took the line as it was, 0.2
                        # its canonical form with the BOM kept.
                        "bom": ("\ufeffmy key", "\ufeffmy key"),
                        "bom 0.2": ("\ufeff my key ", "\ufeff my key")}[source]
    backups = tmp_path / "backups"
    shutil.copytree(made.store, backups / "node1")
    Store.open(backups / "node1", KEY).change_key(earlier)   # as an earlier version made it
    kf = tmp_path / "key"
    kf.write_text(written + "\n")
    env = write_env(tmp_path / "node.env", backups,
                    key=written if source == "systemd" else None)
    args: list[str | Path] = ["--key-file", kf] if source in ("key file", "bom", "bom 0.2") \
        else []
    environ = {**clean_env(), **({"BACKUP_KEY": written} if source == "environment" else {})}
    r = run_cli("ls", "-c", env, *args, env=environ)
    assert r.returncode == 0, r.stderr
    assert "2 generation(s)" in r.stdout
    assert "WARNING" in r.stderr and "(as an earlier humiofs read it)" in r.stderr
    assert "humiofs key change" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert "my key" not in r.stderr and "keysprod" not in r.stderr and "prod" not in r.stderr
    r = run_cli("key", "change", "-c", env, *args, "--new-key-file", kf, env=environ)
    assert r.returncode == 0, r.stderr
    r = run_cli("ls", "-c", env, *args, env=environ)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    r = run_cli("check", "-c", env, *args, env=environ)
    assert r.returncode == 0, r.stdout + r.stderr


def test_key_change(copy: tuple[Path, Path], made: Made, tmp_path: Path) -> None:
    store, env = copy
    new = "a brand new key"
    (tmp_path / "new").write_text(new + "\n")
    data_files = {k: v for k, v in store_files(store).items()
                  if k.startswith(("packs", "generations", "config"))}
    r = run_cli("key", "change", "-c", env, "--new-key-file", tmp_path / "new")
    assert r.returncode == 0, r.stderr
    assert str(store) in r.stdout
    assert {k: v for k, v in store_files(store).items()
            if k.startswith(("packs", "generations", "config"))} == data_files
    assert len(os.listdir(store / "keys")) == 1

    r = run_cli("restore", "-c", env, "--to", tmp_path / "old")
    assert r.returncode == 3
    new_env = write_env(tmp_path / "new.env", store.parent, key=new)
    r = run_cli("restore", "-c", new_env, "--to", tmp_path / "t")
    assert r.returncode == 0, r.stderr
    assert tree_digest(tmp_path / "t") == source_digest(made.node)


def test_key_change_refuses_developer(copy: tuple[Path, Path], tmp_path: Path) -> None:
    store, env = copy
    (tmp_path / "new").write_text("developer\n")
    before = store_files(store)
    r = run_cli("key", "change", "-c", env, "--new-key-file", tmp_path / "new")
    assert r.returncode == 2 and "default" in one_line_error(r)
    assert {k: v for k, v in store_files(store).items() if k != "lock"} == \
        {k: v for k, v in before.items() if k != "lock"}
    assert run_cli("ls", "-c", env).returncode == 0


def test_developer_key_refused(made: Made, tmp_path: Path) -> None:
    backups = tmp_path / "backups"
    backups.mkdir()
    env = write_env(tmp_path / "dev.env", backups, directory=made.node, key="developer")
    r = run_cli("backup", "-c", env)
    assert r.returncode == 2 and "default" in one_line_error(r)
    assert list(backups.iterdir()) == []
    # An existing store: refused as a setting, not reported as a wrong key.
    env = write_env(tmp_path / "dev2.env", made.backups, key="developer")
    commands: list[list[str | Path]] = [["restore", "-c", env, "--to", tmp_path / "t"],
                                        ["ls", "-c", env]]
    for args in commands:
        r = run_cli(*args)
        assert r.returncode == 2 and "default" in one_line_error(r)


def test_empty_or_missing_key(made: Made, tmp_path: Path) -> None:
    env = write_env(tmp_path / "nokey.env", made.backups, directory=made.node, key="")
    r = run_cli("backup", "-c", env)
    assert r.returncode == 2 and "BACKUP_KEY" in one_line_error(r)


def test_no_key_option() -> None:
    parser = cli.build_parser()
    options: set[str] = set()
    stack = [parser]
    while stack:
        p = stack.pop()
        for action in p._actions:
            options.update(action.option_strings)
            for sub in getattr(action, "choices", None) or {}:
                if isinstance(action.choices, dict):
                    stack.append(action.choices[sub])
    keyish = {o for o in options if re.search(r"key|pass|secret", o)}
    assert keyish == {"--key-file", "--new-key-file"}


def test_key_never_shown(made: Made, tmp_path: Path) -> None:
    secret = "Zq7-unusual-passphrase-4711"
    backups = tmp_path / "backups"
    backups.mkdir()
    env = write_env(tmp_path / "s.env", backups, directory=made.node, key=secret)
    (tmp_path / "new").write_text("Yx8-second-passphrase-0815\n")
    out = []
    commands: list[list[str | Path]] = [
        ["backup", "-vv", "-c", env], ["backup", "-vv", "-c", env],
        ["restore", "-vv", "-c", env, "--to", tmp_path / "t"], ["ls", "-vv", "-c", env],
        ["key", "change", "-vv", "-c", env, "--new-key-file", tmp_path / "new"]]
    for args in commands:
        r = run_cli(*args)
        assert r.returncode == 0, r.stderr
        out.append(r.stdout + r.stderr)
    text = "\n".join(out)
    assert "DEBUG" in text or "INFO" in text
    assert secret not in text and "Yx8-second" not in text
    for p in (backups / "node1").rglob("*"):
        if p.is_file():
            blob = p.read_bytes()
            assert secret.encode() not in blob and b"Yx8-second" not in blob, p


# -- store files ---------------------------------------------------------------------------------

def test_store_modes_with_umask_zero(made: Made, tmp_path: Path) -> None:
    backups = tmp_path / "backups"
    backups.mkdir()
    env = write_env(tmp_path / "m.env", backups, directory=made.node)
    for _ in range(2):
        r = subprocess.run([sys.executable, "-m", "humiofs", "backup", "-c", str(env)],
                           env=clean_env(), cwd=ROOT, capture_output=True, text=True,
                           preexec_fn=lambda: os.umask(0), timeout=120)  # noqa: PLW1509
        assert r.returncode == 0, r.stderr
    entries = [backups / "node1", *(backups / "node1").rglob("*")]
    assert any(p.name == "lock" for p in entries)
    for p in entries:
        mode = stat.S_IMODE(p.lstat().st_mode)
        assert mode == (0o700 if p.is_dir() else 0o600), (p, oct(mode))


# -- usage errors and exit codes ---------------------------------------------------------------

def test_epilog_documents_exit_codes() -> None:
    text = " ".join(cli.EPILOG.split())
    m = re.search(r"exit codes: (.*?)\.$", text)
    assert m
    documented = {int(code): what for code, what in
                  (part.strip().split(" ", 1) for part in m.group(1).split(","))}
    assert documented == {
        0: "ok", 1: "internal error", 2: "bad usage or settings", 3: "wrong key",
        4: "store locked by another writer", 5: "store damaged",
        6: "restore target or mountpoint unusable", 7: "backup disk full or not writable",
        8: "finished with warnings (files skipped or read again)", 130: "interrupted"}
    assert (errors.ConfigError.exit_code, errors.WrongKey.exit_code,
            errors.StoreLocked.exit_code, errors.StoreError.exit_code,
            errors.IntegrityError.exit_code, errors.NoSuchObject.exit_code,
            errors.TargetError.exit_code, errors.StoreIOError.exit_code,
            errors.SourceChanged.exit_code, errors.Interrupted.exit_code,
            errors.HumiofsError.exit_code) == (2, 3, 4, 5, 5, 5, 6, 7, 8, 130, 1)


HELPS = [[], ["backup"], ["restore"], ["ls"], ["key"], ["key", "change"], ["mount"],
         ["umount"], ["check"], ["prune"]]


@pytest.mark.parametrize("args", HELPS, ids=lambda a: " ".join(a) or "humiofs")
def test_help(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main([*args, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: humiofs")
    if args == ["umount"]:
        assert "exit codes:" in out and "--config" not in out   # it takes no settings
    elif args and args != ["key"]:
        assert "exit codes:" in out and "--config" in out


@pytest.mark.parametrize("args", [["backup", "--key", "s3cr3t-value"],
                                  ["backup", "--key=s3cr3t-value"],
                                  ["restore", "--to", "/tmp/x", "--key", "s3cr3t-value"]])
def test_key_on_command_line_is_refused_and_not_echoed(args: list[str]) -> None:
    """No abbreviation turns --key into --key-file, and the error does not repeat the value."""
    r = run_cli(*args)
    assert r.returncode == 2
    assert "s3cr3t-value" not in r.stderr + r.stdout
    assert "never taken on the command line" in r.stderr


def test_help_as_a_process() -> None:
    r = run_cli("backup", "--help")
    assert r.returncode == 0 and "--exclude" in r.stdout


def usage_cases(made: Made, tmp: Path) -> dict[str, list[str | Path]]:
    b, node = made.backups, made.node
    return {
        "no command": [],
        "unknown flag": ["backup", "--key", "x"],
        "no name": ["backup", "-c", write_env(tmp / "a.env", b, name=None, directory=node)],
        "bad name": ["backup", "-c", write_env(tmp / "b.env", b, name="../x", directory=node)],
        "no directory": ["backup", "-c", write_env(tmp / "c.env", b)],
        "missing directory": ["backup", "-c", write_env(tmp / "d.env", b, name="fresh",
                                                        directory=tmp / "absent")],
        "no backup dir": ["backup", "-c", write_env(tmp / "e.env", tmp / "absent",
                                                    directory=node)],
        "no store": ["restore", "-c", write_env(tmp / "f.env", b, name="absent"),
                     "--to", tmp / "t"],
        "bad env line": ["ls", "-c", tmp / "bad.env"],
        "missing env file": ["ls", "-c", tmp / "absent.env"],
        "bad delete after": ["ls", "-c", write_env(tmp / "g.env", b,
                                                   DELETE_BACKUP_AFTER_MILLIS="soon")],
    }


@pytest.mark.parametrize("case", ["no command", "unknown flag", "no name", "bad name",
                                  "no directory", "missing directory", "no backup dir",
                                  "no store", "bad env line", "missing env file",
                                  "bad delete after"])
def test_usage_errors_exit_2(made: Made, tmp_path: Path, case: str) -> None:
    (tmp_path / "bad.env").write_text("BACKUP_DIR=/x\nBACKUP_NAME node1\n")
    before = store_files(made.backups)
    r = run_cli(*usage_cases(made, tmp_path)[case])
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert r.stderr.strip() and "Traceback" not in r.stderr
    if case == "bad env line":
        assert f"{tmp_path / 'bad.env'}:2:" in r.stderr
    assert store_files(made.backups) == before
    assert not (tmp_path / "absent").exists() and not (tmp_path / "t").exists()


def test_backup_disk_full_exits_7(made: Made, tmp_path: Path) -> None:
    node = tmp_path / "node"
    node.mkdir()
    (node / "big.bin").write_bytes(os.urandom(3 << 20))
    (node / "cluster_membership.uuid").write_text("3b0c4f2e-6a3d-4c1f-9e2a-5d8b7c6a1f00")
    backups = tmp_path / "backups"
    backups.mkdir()
    env = write_env(tmp_path / "n.env", backups, directory=node, BOOTSTRAP_HOST_ID="1")

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    r = subprocess.run([sys.executable, "-m", "humiofs", "backup", "-c", str(env)],
                       env=clean_env(), cwd=ROOT, capture_output=True, text=True,
                       preexec_fn=limit, timeout=120)  # noqa: PLW1509
    assert r.returncode == 7, (r.stdout, r.stderr)
    assert "cannot write" in one_line_error(r)
    store = backups / "node1"
    assert os.listdir(store / "generations") == [] and os.listdir(store / "tmp") == []
    r = run_cli("backup", "-c", env)
    assert r.returncode == 0, r.stderr
    r = run_cli("restore", "-c", env, "--to", tmp_path / "t")
    assert r.returncode == 0 and tree_digest(tmp_path / "t") == tree_digest(node)


def test_forever_retention_and_a_key_that_is_not_utf8_are_no_tracebacks(tmp_path: Path) -> None:
    """DELETE_BACKUP_AFTER_MILLIS=Long.MAX_VALUE ("keep forever") made prune --dry-run and
    backup --watch die printing a year past 9999; bytes that are not UTF-8 in BACKUP_KEY from
    the environment died in the KDF and left a half-created store behind."""
    node = tmp_path / "node"
    (node / "ds").mkdir(parents=True)
    (node / "ds" / "p").write_bytes(b"a")
    (tmp_path / "b").mkdir()
    env = write_env(tmp_path / "env", tmp_path / "b", directory=node,
                    DELETE_BACKUP_AFTER_MILLIS="9223372036854775807")
    assert run_cli("backup", "--config", env).returncode == 0
    (node / "ds" / "p").unlink()
    assert run_cli("backup", "--config", env).returncode == 0
    r = run_cli("prune", "--config", env, "--dry-run")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert "never" in r.stdout, r.stdout
    bad = clean_env() | {"BACKUP_KEY": os.fsdecode(b"ab\xffcd")}
    r = run_cli("backup", "--directory", node, "--backup-dir", tmp_path / "b", "--name", "x",
                env=bad)
    assert r.returncode == 2 and "not UTF-8" in r.stderr and "Traceback" not in r.stderr
    assert not [p for p in os.listdir(tmp_path / "b") if p != "node1"]


def test_object_storage_without_its_client_is_one_line(tmp_path: Path) -> None:
    """obstore is an optional extra: without it, BACKUP_DIR=s3://… is one line naming the
    extra and exit 2, never an ImportError's traceback (the import is blocked for real)."""
    node = tmp_path / "node"
    node.mkdir()
    code = ("import sys; sys.modules['obstore'] = None; from humiofs.cli import main; "
            "sys.exit(main(sys.argv[1:]))")
    env = clean_env()
    env.update(BACKUP_KEY=KEY, AWS_ENDPOINT_URL="http://127.0.0.1:9", AWS_ACCESS_KEY_ID="id",
               AWS_SECRET_ACCESS_KEY="secret")
    for args in (["ls"], ["backup", "--name", "n", "--directory", str(node)]):
        res = subprocess.run([sys.executable, "-c", code, *args, "--backup-dir",
                              "s3://bucket/prefix"], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=60)
        assert res.returncode == 2, res.stderr
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and "pip install 'humiofs[s3]'" in lines[0], res.stderr
