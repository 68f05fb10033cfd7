"""Settings from flags, the environment and a Humio-style env file (`docker --env-file`).

Precedence: command-line flags, then the process environment, then the env file. The key is
read from BACKUP_KEY (environment or env file) or from a file, never from the command line.
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from humiofs.errors import ConfigError
from humiofs.keys import check_passphrase

DEFAULT_BACKUP_DIR = "/backup"
DEFAULT_DELETE_AFTER_MS = 604_800_000
SETTINGS = ("DIRECTORY", "BACKUP_NAME", "BACKUP_KEY", "BACKUP_KEY_FILE", "BACKUP_DIR",
            "DELETE_BACKUP_AFTER_MILLIS", "BOOTSTRAP_HOST_ID", "BACKUP_EXCLUDE",
            "BACKUP_INTERVAL_SECONDS")
_KEY_LINE = re.compile(r"^(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)(?:=(.*))?$")
_HOST_ID = re.compile(r"[0-9A-Za-z_-][0-9A-Za-z._-]{0,99}")
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")


@dataclass(frozen=True)
class Config:
    """The resolved settings; the key is kept out of repr so it cannot reach a log."""

    backup_dir: Path
    directory: Path | None = None
    backup_name: str | None = None
    backup_key: str | None = field(default=None, repr=False)
    delete_after_ms: int = DEFAULT_DELETE_AFTER_MS
    host_id: str | None = None
    excludes: tuple[str, ...] = ()
    interval_s: float = 60.0

    def need_directory(self) -> Path:
        """The data directory to back up, which must exist (checked before any store is
        created, so that a mistyped DIRECTORY does not leave an empty one behind)."""
        if self.directory is None:
            raise ConfigError("DIRECTORY is not set (the node's data directory)")
        if not self.directory.is_dir():
            raise ConfigError(f"DIRECTORY {self.directory} does not exist or is not a folder")
        return self.directory

    def need_name(self) -> str:
        if self.backup_name is None:
            raise ConfigError("BACKUP_NAME is not set")
        return self.backup_name

    def need_key(self) -> str:
        if not self.backup_key:
            raise ConfigError("BACKUP_KEY is not set (in the env file, the environment, "
                              "or with --key-file)")
        # Refused for every command, not only when a store is created: an existing store can
        # never have this key, and "the key does not open the store" would mislead.
        check_passphrase(self.backup_key)
        return self.backup_key

    def store_path(self) -> Path:
        return self.backup_dir / self.need_name()


def parse_env_file(text: str, source: str, environ: Mapping[str, str]) -> dict[str, str]:
    """Parses KEY=VALUE lines the way `docker --env-file` does, plus optional quotes.

    Blank lines and lines starting with # are ignored; `KEY` alone takes the value from the
    environment; a value wrapped in matching single or double quotes loses them.
    """
    values: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = _KEY_LINE.match(line)
        if not m:
            raise ConfigError(f"{source}:{number}: expected KEY=VALUE")
        key, value = m.group(1), m.group(2)
        if value is None:
            if key in environ:
                values[key] = environ[key]
            continue
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key] = value
    return values


def load(flags: Mapping[str, str | None], env_file: Path | None = None,
         key_file: Path | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Resolves the settings; raises ConfigError with a one-line message on bad input."""
    environ = os.environ if environ is None else environ
    layers: list[Mapping[str, str]] = []
    if env_file is not None:
        try:
            text = env_file.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read env file {env_file}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"env file {env_file} is not UTF-8 text") from None
        layers.append(parse_env_file(text, str(env_file), environ))
    layers.append({k: environ[k] for k in SETTINGS if k in environ})
    flag_layer = {k: v for k, v in flags.items() if v is not None}
    if key_file is not None:
        flag_layer["BACKUP_KEY_FILE"] = str(key_file)
    layers.append(flag_layer)
    merged: dict[str, str] = {}
    for layer in layers:
        # BACKUP_KEY and BACKUP_KEY_FILE are one setting given two ways: the higher layer's
        # choice wins whichever way it is given (within one layer the file wins).
        if "BACKUP_KEY" in layer or "BACKUP_KEY_FILE" in layer:
            merged.pop("BACKUP_KEY", None)
            merged.pop("BACKUP_KEY_FILE", None)
        merged.update(layer)

    key = merged.get("BACKUP_KEY") or None
    if merged.get("BACKUP_KEY_FILE"):
        key = read_key_file(Path(merged["BACKUP_KEY_FILE"]))

    name = merged.get("BACKUP_NAME") or None
    if name is not None and not _NAME.fullmatch(name):
        raise ConfigError(f"BACKUP_NAME {name!r} must be letters, digits, '.', '_' or '-' "
                          "and must not start with '.'")
    directory = merged.get("DIRECTORY") or None
    excludes = tuple(p.strip() for p in merged.get("BACKUP_EXCLUDE", "").split(",") if p.strip())
    return Config(
        backup_dir=Path(merged.get("BACKUP_DIR") or DEFAULT_BACKUP_DIR),
        directory=Path(directory) if directory else None,
        backup_name=name,
        backup_key=key,
        delete_after_ms=_int_setting(merged, "DELETE_BACKUP_AFTER_MILLIS",
                                     DEFAULT_DELETE_AFTER_MS),
        host_id=_host_id(merged.get("BOOTSTRAP_HOST_ID") or None),
        excludes=excludes,
        interval_s=float(_int_setting(merged, "BACKUP_INTERVAL_SECONDS", 60)),
    )


def _host_id(value: str | None) -> str | None:
    """BOOTSTRAP_HOST_ID goes into a file name the mount presents, so it must be a plain id."""
    if value is not None and not _HOST_ID.fullmatch(value.strip()):
        raise ConfigError(f"BOOTSTRAP_HOST_ID {value!r} must be letters, digits, '.', '_' or '-'")
    return value.strip() if value else None


def read_key_file(path: Path) -> str:
    """The key stored in a file: its first line, without the line ending."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read key file {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"key file {path} is not UTF-8 text") from None
    key = text.split("\n", 1)[0].rstrip("\r")
    if not key:
        raise ConfigError(f"key file {path} is empty")
    return key


def _int_setting(values: Mapping[str, str], name: str, default: int) -> int:
    raw = values.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a whole number, not {raw!r}") from None
    if value < 0:
        raise ConfigError(f"{name} must not be negative")
    return value
