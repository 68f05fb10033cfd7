"""Settings: the Humio-style env file, precedence flags > environment > file, the key file,
and the checks on names and numbers."""
from __future__ import annotations

import logging
import os
import shlex
import subprocess
from pathlib import Path

import pytest

from humiofs import config
from humiofs.config import Config, load, parse_env_file
from humiofs.errors import ConfigError
from humiofs.store.keys import canonical_passphrase

NO_FLAGS: dict[str, str | None] = {}


def env_file(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "node.env"
    p.write_text(text)
    return p


def test_env_file_syntax() -> None:
    text = """
# a comment
   # an indented comment

BACKUP_NAME=node1
export BACKUP_DIR=/mnt/backup
DIRECTORY="/data/humio data"
BACKUP_KEY='it''s # not a comment'
EMPTY=
"""
    values = parse_env_file(text, "node.env", {})
    assert values == {"BACKUP_NAME": "node1", "BACKUP_DIR": "/mnt/backup",
                      "DIRECTORY": "/data/humio data",
                      "BACKUP_KEY": "it''s # not a comment", "EMPTY": ""}


def test_value_keeps_inner_equals_hash_and_unmatched_quotes() -> None:
    values = parse_env_file('A=x=y#z\nB="abc\nC=\'q"\n', "f", {})
    assert values == {"A": "x=y#z", "B": '"abc', "C": "'q\""}


def test_key_without_value_takes_environment() -> None:
    values = parse_env_file("BACKUP_KEY\nBACKUP_NAME\n", "f", {"BACKUP_KEY": "from env"})
    assert values == {"BACKUP_KEY": "from env"}


@pytest.mark.parametrize("line", ["BACKUP_DIR /mnt/disk", "BACKUP_DIR = /mnt/disk",
                                  "export BACKUP_KEY secret-words-here", "BACKUP_NAME:n",
                                  "BACKUP_DRI /mnt/disk"])
def test_bad_line_names_file_and_line(tmp_path: Path, line: str) -> None:
    p = env_file(tmp_path, f"# header\nBACKUP_NAME=n\n{line}\n")
    with pytest.raises(ConfigError, match=rf"{p}:3:"):
        load(NO_FLAGS, env_file=p, environ={})


def test_missing_or_binary_env_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read env file"):
        load(NO_FLAGS, env_file=tmp_path / "nope.env", environ={})
    p = tmp_path / "bin.env"
    p.write_bytes(b"BACKUP_DIR=/b\xff\xfe\n")
    with pytest.raises(ConfigError, match=r"bin.env:1: BACKUP_DIR is not UTF-8 text"):
        load(NO_FLAGS, env_file=p, environ={})


def test_bytes_that_are_not_utf8_outside_humiofs_settings_are_ignored(tmp_path: Path) -> None:
    p = tmp_path / "node.env"
    p.write_bytes(b"# Kn\xf6del's node (Latin-1)\nHUMIO_X=\xff\xfe\nBACKUP_NAME=n\n"
                  b"\xff\xfe not a line at all\n")
    assert load(NO_FLAGS, env_file=p, environ={}).backup_name == "n"


@pytest.mark.parametrize("setting", ["BACKUP_DIR", "BACKUP_KEY_FILE", "BACKUP_STATE_DIR",
                                     "BACKUP_NAME", "DIRECTORY"])
def test_a_nul_byte_in_a_setting_is_one_line(tmp_path: Path, setting: str) -> None:
    p = tmp_path / "node.env"
    p.write_bytes(f"{setting}=/a\0b\nHUMIO_Y=\0\n".encode())
    with pytest.raises(ConfigError, match=f"node.env:1: {setting} holds a NUL byte"):
        load(NO_FLAGS, env_file=p, environ={})


@pytest.mark.parametrize("guess,real", [
    ("BACKUP_INTERVAL", "BACKUP_INTERVAL_SECONDS"), ("BACKUP_DIRECTORY", "BACKUP_DIR"),
    ("BACKUP_PATH", "BACKUP_DIR"), ("HUMIO_BACKUP_DIR", "BACKUP_DIR"),
    ("BACKUP_KEY_PATH", "BACKUP_KEY_FILE"), ("BACKUP_PASSWORD", "BACKUP_KEY"),
    ("BACKUP_EXCLUDE_PATTERNS", "BACKUP_EXCLUDE")])
@pytest.mark.allow_warnings
def test_guessed_names_are_warned_with_the_real_one(tmp_path: Path, guess: str, real: str,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    load(NO_FLAGS, env_file=env_file(tmp_path, f"{guess}=x\n"), environ={})
    assert f"{guess} is not a humiofs setting and is ignored; did you mean {real}?" \
        in caplog.text


@pytest.mark.allow_warnings
def test_an_empty_backup_dir_is_warned(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = load(NO_FLAGS, env_file=env_file(tmp_path, "BACKUP_DIR=\n"), environ={})
    assert cfg.backup_dir == Path("/backup")
    assert "BACKUP_DIR is empty" in caplog.text


def test_a_bom_opening_a_later_line_is_ignored(tmp_path: Path) -> None:
    p = env_file(tmp_path, "BACKUP_NAME=a\n\ufeffBACKUP_DIR=/b\n")
    assert load(NO_FLAGS, env_file=p, environ={}).backup_dir == Path("/b")


def test_precedence(tmp_path: Path) -> None:
    p = env_file(tmp_path, "BACKUP_NAME=file\nBACKUP_DIR=/file\nDIRECTORY=/d-file\n")
    assert load(NO_FLAGS, env_file=p, environ={}).backup_name == "file"
    env = {"BACKUP_NAME": "env", "BACKUP_DIR": "/env"}
    cfg = load(NO_FLAGS, env_file=p, environ=env)
    assert (cfg.backup_name, cfg.backup_dir, cfg.directory) == ("env", Path("/env"),
                                                               Path("/d-file"))
    cfg = load({"BACKUP_NAME": "flag", "BACKUP_DIR": None}, env_file=p, environ=env)
    assert (cfg.backup_name, cfg.backup_dir) == ("flag", Path("/env"))


def test_environment_only_takes_known_settings(tmp_path: Path) -> None:
    p = env_file(tmp_path, "BACKUP_NAME=file\n")
    cfg = load(NO_FLAGS, env_file=p, environ={"HOME": "/root", "PATH": "/bin"})
    assert cfg.backup_name == "file"


def test_defaults() -> None:
    cfg = load(NO_FLAGS, environ={})
    assert cfg.backup_dir == Path("/backup")
    assert cfg.delete_after_ms == 604_800_000
    assert cfg.backup_name is None and cfg.backup_key is None and cfg.directory is None
    assert cfg.excludes == ()


def test_key_file_first_line(tmp_path: Path) -> None:
    kf = tmp_path / "key"
    kf.write_text("first line key \r\nsecond\n")
    cfg = load(NO_FLAGS, key_file=kf, environ={"BACKUP_KEY": "from env"})
    assert cfg.backup_key == "first line key"
    assert cfg.key_source == f"the first line of the key file {kf} (--key-file)"
    # What an earlier version read from the same file: the line as it is.
    assert cfg.key_legacy == (("first line key ", f"from the key file {kf} as its first line "
                               "holds it (blanks and quotes included)"),)


# (how a value is written, the canonical passphrase): FORMAT.md 4.4
CANONICAL = [
    ("my key", "my key"),
    ("  my key\t", "my key"),
    ('"my key"', "my key"),
    ("'my key'", "my key"),
    ('  " my key "  ', " my key "),
    ("\"'quoted'\"", "'quoted'"),
    ("C:\\keys\\prod", "C:\\keys\\prod"),
    ("it's \"so\" #1 $HOME", "it's \"so\" #1 $HOME"),
    ('"unbalanced', '"unbalanced'),
    ("\u00a0nbsp\u00a0", "nbsp"),
]


@pytest.mark.parametrize("written,key", CANONICAL)
def test_every_source_gives_the_canonical_passphrase(tmp_path: Path, written: str,
                                                     key: str) -> None:
    """The env file, the environment (directly or named in the env file) and a key file give
    one key for one value."""
    p = env_file(tmp_path, f"BACKUP_KEY={written}\n")
    assert load(NO_FLAGS, env_file=p, environ={}).backup_key == key
    assert load(NO_FLAGS, environ={"BACKUP_KEY": written}).backup_key == key
    bare = env_file(tmp_path, "BACKUP_KEY\n")
    assert load(NO_FLAGS, env_file=bare, environ={"BACKUP_KEY": written}).backup_key == key
    kf = tmp_path / "key"
    kf.write_text(written + "\nsecond line\n")
    assert load(NO_FLAGS, key_file=kf, environ={}).backup_key == key
    assert config.read_key_file(kf) == key          # key change --new-key-file


def test_key_sources_are_named(tmp_path: Path) -> None:
    p = env_file(tmp_path, "# settings\nBACKUP_KEY=k1\n")
    assert load(NO_FLAGS, env_file=p, environ={}).key_source == \
        f"BACKUP_KEY on line 2 of the env file {p}"
    assert load(NO_FLAGS, env_file=p, environ={"BACKUP_KEY": "k2"}).key_source == \
        "BACKUP_KEY in the environment"
    bare = env_file(tmp_path, "BACKUP_KEY\n")
    assert load(NO_FLAGS, env_file=bare, environ={"BACKUP_KEY": "k2"}).key_source == \
        "BACKUP_KEY in the environment"
    kf = tmp_path / "key"
    kf.write_text("k3\n")
    with_file = env_file(tmp_path, f"BACKUP_KEY_FILE={kf}\n")
    assert load(NO_FLAGS, env_file=with_file, environ={}).key_source == \
        f"the first line of the key file {kf} (BACKUP_KEY_FILE in the env file {with_file})"


# Values whose reading by systemd's EnvironmentFile= differs from the canonical passphrase.
SYSTEMD = [("C:\\keys\\prod", "C:keysprod"), ("a\\ b", "a b"), ("'a' b", "ab"),
           ('"a\\"b"', 'a"b'), ("'it''s'", "its")]


@pytest.mark.parametrize("line,systemd", SYSTEMD)
def test_systemd_reading_of_the_env_file_is_recognised(tmp_path: Path, line: str,
                                                       systemd: str) -> None:
    """A unit with EnvironmentFile= and --config of the same file: the environment holds
    systemd's reading of the line, and the key is the line's canonical passphrase."""
    p = env_file(tmp_path, f"BACKUP_NAME=n\nBACKUP_KEY={line}\n")
    by_hand = load(NO_FLAGS, env_file=p, environ={})
    service = load(NO_FLAGS, env_file=p, environ={"BACKUP_KEY": systemd})
    assert service.backup_key == by_hand.backup_key == canonical_passphrase(line)
    assert f"line 2 of the env file {p}" in service.key_source  # type: ignore[operator]
    # Stores written by a service of an earlier version used systemd's reading: both runs
    # can still try it.
    assert systemd in [text for text, _ in service.key_legacy]
    assert systemd in [text for text, _ in by_hand.key_legacy]
    # Any other value in the environment overrides the env file, as always.
    assert load(NO_FLAGS, env_file=p, environ={"BACKUP_KEY": "other"}).backup_key == "other"


def systemd_reads(tmp_path: Path, line: str) -> str:
    """systemd's own reading of `BACKUP_KEY=line` in an env file, from its
    environment.d generator (the same parser as EnvironmentFile=, plus $ expansion)."""
    (tmp_path / "environment.d").mkdir(exist_ok=True)
    (tmp_path / "environment.d" / "k.conf").write_text(f"BACKUP_KEY={line}\n")
    done = subprocess.run([SYSTEMD_ENV_GENERATOR], capture_output=True, text=True, check=True,
                          env={"XDG_CONFIG_HOME": str(tmp_path), "HOME": str(tmp_path)})
    (value,) = [v for k, _, v in (ln.partition("=") for ln in done.stdout.splitlines())
                if k == "BACKUP_KEY"]
    return shlex.split(value)[0] if value else ""


SYSTEMD_ENV_GENERATOR = "/usr/lib/systemd/user-environment-generators/" \
    "30-systemd-environment-d-generator"


@pytest.mark.skipif(not os.access(SYSTEMD_ENV_GENERATOR, os.X_OK), reason="needs systemd")
@pytest.mark.parametrize("line", [line for line, _ in SYSTEMD] + [
    written for written, _ in CANONICAL if "$" not in written and "\t" not in written])
def test_systemd_value_is_what_systemd_reads(tmp_path: Path, line: str) -> None:
    got = config.systemd_value(line)
    if got is None:     # systemd reads on into the next line: not a one-line value
        assert line.count('"') % 2 == 1
        return
    assert got == systemd_reads(tmp_path, line)


def test_key_file_without_newline(tmp_path: Path) -> None:
    kf = tmp_path / "key"
    kf.write_text("k3y")
    assert config.read_key_file(kf) == "k3y"


@pytest.mark.parametrize("text", ["", "\n", "\ufeff", " \n\n"])
def test_empty_key_file(tmp_path: Path, text: str) -> None:
    kf = tmp_path / "key"
    kf.write_text(text)
    with pytest.raises(ConfigError, match="is empty"):
        load(NO_FLAGS, key_file=kf, environ={})


@pytest.mark.parametrize("text", ["\nsecond line\n", "  \r\nkey\n", "\ufeff\nkey"])
def test_key_file_with_a_blank_first_line_says_so(tmp_path: Path, text: str) -> None:
    kf = tmp_path / "key"
    kf.write_text(text)
    with pytest.raises(ConfigError, match="first line of key file .* is blank"):
        load(NO_FLAGS, key_file=kf, environ={})


@pytest.mark.parametrize("text", ["\ufeffmy key\n", "\ufeff my key \r\n", '\ufeff"my key"'])
def test_a_bom_opening_a_key_file_is_not_part_of_the_key(tmp_path: Path, text: str) -> None:
    kf = tmp_path / "key"
    kf.write_text(text, encoding="utf-8")
    assert config.read_key_file(kf) == "my key"


@pytest.mark.parametrize("what", ["key_file", "env_file"])
@pytest.mark.parametrize("source", ["/dev/zero", "big"])
def test_an_endless_or_huge_file_is_not_read_whole(tmp_path: Path, what: str,
                                                   source: str) -> None:
    path = Path(source)
    if source == "big":
        path = tmp_path / "big"
        path.write_bytes(b"x" * (2 << 20))
    with pytest.raises(ConfigError, match="larger than"):
        load(NO_FLAGS, environ={}, **{what: path})    # type: ignore[arg-type]


def test_missing_key_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read key file"):
        load(NO_FLAGS, key_file=tmp_path / "absent", environ={})


def test_backup_key_file_setting(tmp_path: Path) -> None:
    kf = tmp_path / "key"
    kf.write_text("key from file\n")
    p = env_file(tmp_path, f"BACKUP_KEY=inline\nBACKUP_KEY_FILE={kf}\n")
    assert load(NO_FLAGS, env_file=p, environ={}).backup_key == "key from file"
    p2 = env_file(tmp_path, "BACKUP_KEY=inline\n")
    assert load(NO_FLAGS, env_file=p2, environ={"BACKUP_KEY_FILE": str(kf)}).backup_key == \
        "key from file"


def test_key_from_file_and_environment(tmp_path: Path) -> None:
    p = env_file(tmp_path, "BACKUP_KEY=from file\n")
    assert load(NO_FLAGS, env_file=p, environ={}).backup_key == "from file"
    assert load(NO_FLAGS, env_file=p, environ={"BACKUP_KEY": "from env"}).backup_key == \
        "from env"


@pytest.mark.parametrize("raw,want", [("1000", 1000), ("0", 0), ("", 604_800_000)])
def test_delete_after(raw: str, want: int) -> None:
    assert load(NO_FLAGS, environ={"DELETE_BACKUP_AFTER_MILLIS": raw}).delete_after_ms == want


@pytest.mark.parametrize("raw", ["abc", "-1", "1.5", "1e3", "7 days"])
def test_bad_delete_after(raw: str) -> None:
    with pytest.raises(ConfigError, match="DELETE_BACKUP_AFTER_MILLIS"):
        load(NO_FLAGS, environ={"DELETE_BACKUP_AFTER_MILLIS": raw})


@pytest.mark.parametrize("name", ["../x", ".hidden", "..", ".", "a/b", "a b", "x" * 129,
                                  "nœud", "a\nb", "node1\n"])
def test_bad_backup_name(name: str) -> None:
    with pytest.raises(ConfigError, match="BACKUP_NAME"):
        load({"BACKUP_NAME": name}, environ={})


@pytest.mark.parametrize("name", ["node1", "humio-2.prod", "_x", "9"])
def test_good_backup_name(name: str) -> None:
    cfg = load({"BACKUP_NAME": name, "BACKUP_DIR": "/b"}, environ={})
    assert cfg.store_path() == Path("/b") / name


def test_excludes_split() -> None:
    cfg = load(NO_FLAGS, environ={"BACKUP_EXCLUDE": " /a ,*.tmp,, "})
    assert cfg.excludes == ("/a", "*.tmp")


def test_need_errors() -> None:
    cfg = load(NO_FLAGS, environ={})
    for need in (cfg.need_directory, cfg.need_name, cfg.need_key, cfg.store_path):
        with pytest.raises(ConfigError):
            need()


def test_need_key_refuses_published_default() -> None:
    cfg = load(NO_FLAGS, environ={"BACKUP_KEY": "developer"})
    with pytest.raises(ConfigError, match="default"):
        cfg.need_key()


def test_repr_never_shows_key(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    secret = "s3cret-Пароль-key"
    cfg = load({"BACKUP_NAME": "n"}, environ={"BACKUP_KEY": secret})
    assert cfg.backup_key == secret
    assert secret not in repr(cfg) and secret not in str(cfg) and secret not in f"{cfg!r}"
    logging.getLogger("humiofs.test").info("config %s %r", cfg, cfg)
    assert secret not in caplog.text
    assert "n" in repr(cfg)
    # Nor the forms an earlier version read (here: with the blanks around it).
    cfg = load({"BACKUP_NAME": "n"}, environ={"BACKUP_KEY": f" {secret} "})
    assert cfg.key_legacy and secret not in repr(cfg) + repr(cfg.passphrase())


def test_config_is_frozen() -> None:
    cfg = Config(backup_dir=Path("/b"))
    with pytest.raises(AttributeError):
        cfg.backup_name = "x"  # type: ignore[misc]


def test_key_given_two_ways_follows_layer_precedence(tmp_path: Path) -> None:
    """BACKUP_KEY and BACKUP_KEY_FILE are one setting: the higher layer wins either way."""
    kf = tmp_path / "key"
    kf.write_text("key from file\n")
    p = env_file(tmp_path, f"BACKUP_KEY_FILE={kf}\n")
    # The environment's BACKUP_KEY beats the env file's BACKUP_KEY_FILE ...
    assert load(NO_FLAGS, env_file=p, environ={"BACKUP_KEY": "from env"}).backup_key == \
        "from env"
    # ... and the --key-file flag beats the environment's BACKUP_KEY.
    p2 = env_file(tmp_path, "BACKUP_KEY=inline\n")
    assert load(NO_FLAGS, env_file=p2, key_file=kf,
                environ={"BACKUP_KEY": "from env"}).backup_key == "key from file"


@pytest.mark.parametrize("bad", ["../x", "1/2", "a b", ".hidden", "x" * 101])
def test_bad_bootstrap_host_id(tmp_path: Path, bad: str) -> None:
    p = env_file(tmp_path, f"BOOTSTRAP_HOST_ID={bad}\n")
    with pytest.raises(ConfigError, match="BOOTSTRAP_HOST_ID"):
        load(NO_FLAGS, env_file=p, environ={})


def test_good_bootstrap_host_id(tmp_path: Path) -> None:
    p = env_file(tmp_path, "BOOTSTRAP_HOST_ID= 7 \n")
    assert load(NO_FLAGS, env_file=p, environ={}).host_id == "7"


def test_a_key_given_as_the_key_file_name_is_not_echoed(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        config.load({}, environ={"BACKUP_KEY_FILE": "my secret key"})
    assert "secret" not in str(err.value) and "not the key itself" in str(err.value)


@pytest.mark.parametrize("line", ["not a setting", "KEY VALUE", "1KEY=x", "-x=1", "A B=c",
                                  "humio.config.value = 3", "JAVA_OPTS -Xmx4g"])
def test_other_programs_lines_are_ignored_quietly(tmp_path: Path, line: str,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    p = env_file(tmp_path, f"BACKUP_NAME=n\n{line}\nBACKUP_DIR=/b\n")
    cfg = load(NO_FLAGS, env_file=p, environ={})
    assert (cfg.backup_name, cfg.backup_dir) == ("n", Path("/b"))


@pytest.mark.allow_warnings
@pytest.mark.parametrize("wrong,right", [("BACKUP_DRI", "BACKUP_DIR"),
                                         ("DELETE_BACKUP_AFTER_MILIS", "DELETE_BACKUP_AFTER_MILLIS"),
                                         ("BACKUP_NMAE", "BACKUP_NAME"),
                                         ("backup_key_file", "BACKUP_KEY_FILE"),
                                         ("BACKUP_INTERVAL_SECOND", "BACKUP_INTERVAL_SECONDS")])
def test_misspelt_setting_is_a_warning_with_the_closest_name(
        tmp_path: Path, wrong: str, right: str, caplog: pytest.LogCaptureFixture) -> None:
    p = env_file(tmp_path, f"BACKUP_NAME=n\n{wrong}=/somewhere\n")
    load(NO_FLAGS, env_file=p, environ={})
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [f"{p}:2: {wrong} is not a humiofs setting and is ignored; did you "
                        f"mean {right}?"]


# A Humio node's env file as operators have it (settings from Humio's and LogScale's
# documentation, a Windows editor's BOM and CRLF line ends, ';' and '#' comments), with
# humiofs's settings added.
HUMIO_ENV = (
    "\ufeff; Humio node 1, managed by ops\r\n"
    "# ---- Humio ----\r\n"
    "HUMIO_JVM_ARGS=-Xss2m -Xms8g -Xmx8g -server -XX:MaxDirectMemorySize=16g -XX:+UseParallelGC\r\n"
    "HUMIO_PORT=8080\r\nELASTIC_PORT=9200\r\nHUMIO_SOCKET_BIND=0.0.0.0\r\n"
    "HUMIO_HTTP_BIND=0.0.0.0\r\nBOOTSTRAP_HOST_ID=1\r\n"
    "BOOTSTRAP_HOST_UUID_COOKIE=a5b3f8e1\r\n"
    "KAFKA_SERVERS=kafka1:9092,kafka2:9092,kafka3:9092\r\n"
    "ZOOKEEPER_URL=zk1:2181,zk2:2181,zk3:2181\r\nKAFKA_MANAGED_BY_HUMIO=true\r\n"
    "HUMIO_KAFKA_TOPIC_PREFIX=humio1_\r\nPUBLIC_URL=https://humio.example.com\r\n"
    "EXTERNAL_URL=http://10.0.0.11:8080\r\nAUTHENTICATION_METHOD=single-user\r\n"
    "SINGLE_USER_PASSWORD=change-me\r\nLOCAL_STORAGE_PERCENTAGE=80\r\n"
    "LOCAL_STORAGE_MIN_AGE_DAYS=7\r\nS3_STORAGE_BUCKET=humio-bucket\r\n"
    "S3_STORAGE_REGION=eu-west-1\r\nS3_STORAGE_ENCRYPTION_KEY=some-long-secret\r\n"
    "CACHE_STORAGE_DIRECTORY=/cache/humio\r\nCACHE_STORAGE_PERCENTAGE=90\r\n"
    "INGEST_QUEUE_REPLICATION_FACTOR=2\r\nDEFAULT_PARTITION_COUNT=24\r\n"
    "MAX_INGEST_REQUEST_SIZE=33554432\r\nHUMIO_LOG4J_CONFIGURATION=log4j2-json-stdout.xml\r\n"
    "export JAVA_HOME=/usr/lib/jvm/java-17\r\n"
    "-Dhumio.debug=false\r\n"
    "# ---- humiofs ----\r\n"
    "DIRECTORY=/data/humio-data\r\nBACKUP_DIR=/mnt/backupdisk\r\nBACKUP_NAME=node1\r\n"
    "DELETE_BACKUP_AFTER_MILLIS=86400000\r\n")


def test_a_real_humio_env_file(tmp_path: Path) -> None:
    p = tmp_path / "humio.env"
    p.write_bytes(HUMIO_ENV.encode())
    cfg = load(NO_FLAGS, env_file=p, environ={})
    assert (cfg.directory, cfg.backup_dir, cfg.backup_name, cfg.delete_after_ms,
            cfg.host_id) == (Path("/data/humio-data"), Path("/mnt/backupdisk"), "node1",
                             86400000, "1")


@pytest.mark.allow_warnings
def test_a_real_humio_env_file_with_a_typo(tmp_path: Path,
                                           caplog: pytest.LogCaptureFixture) -> None:
    p = tmp_path / "humio.env"
    p.write_bytes(HUMIO_ENV.replace("BACKUP_DIR=", "BACKUP_DRI=").encode())
    cfg = load(NO_FLAGS, env_file=p, environ={})
    assert cfg.backup_dir == Path("/backup")
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == [
        f"{p}:33: BACKUP_DRI is not a humiofs setting and is ignored; did you mean BACKUP_DIR?"]


def test_the_mounts_cache_settings(tmp_path: Path) -> None:
    """BACKUP_CACHE_DIR defaults to a folder in BACKUP_STATE_DIR, BACKUP_CACHE_BYTES to 1 GiB;
    a size that is not a whole number is one line (exit 2)."""
    cfg = load(NO_FLAGS, env_file=env_file(tmp_path, f"BACKUP_STATE_DIR={tmp_path}/state\n"),
               environ={})
    assert cfg.cache_dir == tmp_path / "state" / "cache" and cfg.cache_bytes == 1 << 30
    cfg = load(NO_FLAGS, env_file=env_file(
        tmp_path, "BACKUP_CACHE_DIR=/var/cache/humiofs\nBACKUP_CACHE_BYTES= 0 \n"), environ={})
    assert cfg.cache_dir == Path("/var/cache/humiofs") and cfg.cache_bytes == 0
    with pytest.raises(ConfigError, match="BACKUP_CACHE_BYTES must be a whole number"):
        load(NO_FLAGS, env_file=env_file(tmp_path, "BACKUP_CACHE_BYTES=1G\n"), environ={})
