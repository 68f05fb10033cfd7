"""Settings: the Humio-style env file, precedence flags > environment > file, the key file,
and the checks on names and numbers."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest

from humiofs import config
from humiofs.config import Config, load, parse_env_file
from humiofs.errors import ConfigError

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


@pytest.mark.parametrize("line", ["not a setting", "KEY VALUE", "1KEY=x", "-x=1", "A B=c"])
def test_bad_line_names_file_and_line(tmp_path: Path, line: str) -> None:
    p = env_file(tmp_path, f"# header\nBACKUP_NAME=n\n{line}\n")
    with pytest.raises(ConfigError, match=rf"{p}:3:"):
        load(NO_FLAGS, env_file=p, environ={})


def test_missing_or_binary_env_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read env file"):
        load(NO_FLAGS, env_file=tmp_path / "nope.env", environ={})
    p = tmp_path / "bin.env"
    p.write_bytes(b"A=\xff\xfe\n")
    with pytest.raises(ConfigError, match="UTF-8"):
        load(NO_FLAGS, env_file=p, environ={})


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
    assert cfg.backup_key == "first line key "


def test_key_file_without_newline(tmp_path: Path) -> None:
    kf = tmp_path / "key"
    kf.write_text("k3y")
    assert config.read_key_file(kf) == "k3y"


@pytest.mark.parametrize("text", ["", "\nsecond line\n"])
def test_empty_key_file(tmp_path: Path, text: str) -> None:
    kf = tmp_path / "key"
    kf.write_text(text)
    with pytest.raises(ConfigError, match="empty"):
        load(NO_FLAGS, key_file=kf, environ={})


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
