"""Settings from flags, the environment and a Humio-style env file (`docker --env-file`).

Precedence: command-line flags, then the process environment, then the env file. The key is
read from BACKUP_KEY (environment or env file) or from a file, never from the command line,
and every source yields the same canonical passphrase (docs/FORMAT.md 4.4).
"""
from __future__ import annotations

import difflib
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from humiofs.errors import ConfigError, show
from humiofs.store.backend import s3 as s3_backend
from humiofs.store.backend.factory import store_at
from humiofs.store.keys import Passphrase, canonical_passphrase, check_passphrase

DEFAULT_BACKUP_DIR = "/backup"
DEFAULT_DELETE_AFTER_MS = 604_800_000
SETTINGS = ("DIRECTORY", "BACKUP_NAME", "BACKUP_KEY", "BACKUP_KEY_FILE", "BACKUP_DIR",
            "DELETE_BACKUP_AFTER_MILLIS", "BOOTSTRAP_HOST_ID", "BACKUP_EXCLUDE",
            "BACKUP_INTERVAL_SECONDS", "BACKUP_STATE_DIR", "BACKUP_CHECKPOINT_SECONDS",
            "BACKUP_CHECKPOINT_BYTES", "BACKUP_CACHE_DIR", "BACKUP_CACHE_BYTES"
            ) + s3_backend.SETTINGS
DEFAULT_CHECKPOINT_S = 300
DEFAULT_CHECKPOINT_BYTES = 1 << 30
DEFAULT_CACHE_BYTES = 1 << 30
log = logging.getLogger(__name__)
_KEY_LINE = re.compile(r"^(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)(?:=(.*))?$")
_HOST_ID = re.compile(r"[0-9A-Za-z_-][0-9A-Za-z._-]{0,99}")
# Names people guess for a setting, too far from it for difflib: warned about with the real one.
_GUESSES = {"BACKUP_INTERVAL": "BACKUP_INTERVAL_SECONDS", "BACKUP_DIRECTORY": "BACKUP_DIR",
            "BACKUP_PATH": "BACKUP_DIR", "HUMIO_BACKUP_DIR": "BACKUP_DIR",
            "BACKUP_FOLDER": "BACKUP_DIR", "BACKUP_KEY_PATH": "BACKUP_KEY_FILE",
            "BACKUP_PASSWORD": "BACKUP_KEY", "BACKUP_PASSPHRASE": "BACKUP_KEY",
            "BACKUP_EXCLUDE_PATTERNS": "BACKUP_EXCLUDE", "BACKUP_EXCLUDES": "BACKUP_EXCLUDE",
            "AWS_SECRET_KEY": "AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY": "AWS_ACCESS_KEY_ID",
            "AWS_SECRET": "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT": "AWS_ENDPOINT_URL"}
_NOT_UTF8 = re.compile("[\udc80-\udcff]")    # bytes of an env file that are not UTF-8
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")


@dataclass(frozen=True)
class Config:
    """The resolved settings; the key is kept out of repr so it cannot reach a log."""

    # A local folder (absolute), or object storage: the string `s3://BUCKET/PREFIX`.
    backup_dir: Path | str
    directory: Path | None = None
    backup_name: str | None = None
    backup_key: str | None = field(default=None, repr=False)
    key_source: str | None = None
    key_legacy: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    delete_after_ms: int = DEFAULT_DELETE_AFTER_MS
    host_id: str | None = None
    excludes: tuple[str, ...] = ()
    interval_s: float = 60.0
    # A running backup commits a checkpoint after this many seconds or bytes stored (FORMAT.md
    # 7.4); 0 turns that trigger off.
    checkpoint_s: int = DEFAULT_CHECKPOINT_S
    checkpoint_bytes: int = DEFAULT_CHECKPOINT_BYTES
    # Where this host keeps its record of each store's newest generation (rollback
    # detection, FORMAT.md 9.1); outside every store. `load` always sets it; None (a Config
    # made in code) keeps no record.
    state_dir: Path | None = None
    # The mount's on-disk cache of pack bytes from object storage (store/backend/cache.py):
    # its folder (None: no cache), and its size limit in bytes (0: no cache).
    cache_dir: Path | None = None
    cache_bytes: int = DEFAULT_CACHE_BYTES

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

    def passphrase(self) -> Passphrase:
        """The key (checked as need_key does), where it was read from, and the forms an
        earlier version read from the same source (FORMAT.md 4.4)."""
        return Passphrase(self.need_key(), self.key_source or "the key given", self.key_legacy)

    def store_path(self) -> Path | str:
        """BACKUP_DIR/BACKUP_NAME: a Path, or `s3://BUCKET/PREFIX/NAME`."""
        return store_at(self.backup_dir, self.need_name())


def parse_env_file(text: str, source: str, environ: Mapping[str, str],
                   raw: dict[str, tuple[int, str | None]] | None = None) -> dict[str, str]:
    """Parses KEY=VALUE lines the way `docker --env-file` does, plus optional quotes.

    Blank lines, lines starting with # or ; and a UTF-8 BOM are ignored; a line that is not
    KEY=VALUE is an error only if it names a humiofs setting (other programs share the file),
    and a name close to a setting is warned about (a misspelling). `KEY` alone takes the value from the
    environment as it is; a value loses the blanks around it, then one pair of matching single
    or double quotes around what is left (canonical_passphrase). If `raw` is given, it gets
    (line number, everything after the '=') of each KEY=VALUE line: what systemd's
    EnvironmentFile= reads (None for an `export KEY=VALUE` line, which systemd does not take).
    """
    values: dict[str, str] = {}
    for number, whole in enumerate(text.removeprefix("\ufeff").splitlines(), 1):
        # (A BOM starts a line where files were joined together.)
        line = whole.strip().removeprefix("\ufeff")
        if not line or line.startswith(("#", ";")):
            continue
        m = _KEY_LINE.match(line)
        if not m:
            # The file is the node's own env file too: a line of another program's that
            # humiofs cannot read is that program's business, a line of one of ours is not.
            word = re.split(r"[\s=]", line.removeprefix("export").strip(), maxsplit=1)[0]
            if word in SETTINGS or _closest(word):
                raise ConfigError(f"{source}:{number}: expected "
                                  f"{show(word.encode('utf-8', 'surrogateescape'))}=VALUE (no blanks "
                                  "around the '=')")
            log.debug("%s:%d: not a KEY=VALUE line; not a humiofs setting, ignored",
                      source, number)
            continue
        key, value = m.group(1), m.group(2)
        if key not in SETTINGS:
            near = _closest(key)
            if near:
                log.warning("%s:%d: %s is not a humiofs setting and is ignored; did you mean "
                            "%s?", source, number, key, near)
        elif _NOT_UTF8.search(line):
            raise ConfigError(f"{source}:{number}: {key} is not UTF-8 text")
        elif value is not None and "\0" in value:
            raise ConfigError(f"{source}:{number}: {key} holds a NUL byte")
        if value is None:
            if key in environ:
                values[key] = environ[key]
                if raw is not None:
                    raw.pop(key, None)
            continue
        values[key] = canonical_passphrase(value)
        if raw is not None:
            raw[key] = (number, None if line.startswith("export") else whole.split("=", 1)[1])
    return values


def _closest(name: str) -> str | None:
    """The humiofs setting `name` is a likely misspelling of, if any. Settings of other
    programs in a Humio env file (HUMIO_JVM_ARGS, BOOTSTRAP_HOST_UUID_COOKIE, ...) are not
    close enough to count."""
    if name in SETTINGS:
        return None
    if name.upper() in _GUESSES:
        return _GUESSES[name.upper()]
    near = difflib.get_close_matches(name.upper(), SETTINGS, n=1, cutoff=0.85)
    return near[0] if near else None


def systemd_value(value: str) -> str | None:
    """What systemd's EnvironmentFile= makes of VALUE in a line KEY=VALUE (its env-file rules:
    leading and trailing blanks dropped, backslash escapes outside single quotes, quoted parts
    joined); None if systemd would read on into the next line (an open quote or a final
    backslash)."""
    blank = " \t\n\r"
    out: list[str] = []
    state = "pre"
    trailing: int | None = None     # where unescaped blanks at the end of a bare value start
    for c in value:
        if state == "pre":
            if c == "'":
                state = "single"
            elif c == '"':
                state = "double"
            elif c == "\\":
                state = "escape"
            elif c not in blank:
                state = "bare"
                out.append(c)
        elif state == "bare":
            if c == "\\":
                state, trailing = "escape", None
            else:
                if c not in blank:
                    trailing = None
                elif trailing is None:
                    trailing = len(out)
                out.append(c)
        elif state == "escape":
            state = "bare"
            out.append(c)
        elif state == "single":
            if c == "'":
                state = "pre"
            else:
                out.append(c)
        elif state == "double":
            if c == '"':
                state = "pre"
            elif c == "\\":
                state = "double-escape"
            else:
                out.append(c)
        else:   # double-escape: only these lose their backslash, as in a shell
            state = "double"
            out.extend(c if c in '"\\`$' else "\\" + c)
    if state not in ("pre", "bare"):
        return None
    if state == "bare" and trailing is not None:
        del out[trailing:]
    return "".join(out)


def load(flags: Mapping[str, str | None], env_file: Path | None = None,
         key_file: Path | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Resolves the settings; raises ConfigError with a one-line message on bad input."""
    environ = os.environ if environ is None else environ
    layers: list[tuple[str, Mapping[str, str]]] = []
    lines: dict[str, tuple[int, str | None]] = {}
    if env_file is not None:
        # Decoded line by line, in effect: bytes that are not UTF-8 stay as surrogates, and
        # only a line of one of humiofs's own settings is refused for holding them.
        text = read_env_text(env_file)
        layers.append((f"the env file {env_file}",
                       parse_env_file(text, str(env_file), environ, lines)))
    layers.append(("the environment", {k: environ[k] for k in SETTINGS if k in environ}))
    flag_layer = {k: v for k, v in flags.items() if v is not None}
    if key_file is not None:
        flag_layer["BACKUP_KEY_FILE"] = str(key_file)
    layers.append(("--key-file", flag_layer))
    merged: dict[str, str] = {}
    key_layer = ""
    for where, layer in layers:
        if layer.get("BACKUP_DIR", None) == "":
            log.warning("BACKUP_DIR is empty in %s; using the default, %s", where,
                        DEFAULT_BACKUP_DIR)
        # BACKUP_KEY and BACKUP_KEY_FILE are one setting given two ways: the higher layer's
        # choice wins whichever way it is given (within one layer the file wins).
        if "BACKUP_KEY" in layer or "BACKUP_KEY_FILE" in layer:
            merged.pop("BACKUP_KEY", None)
            merged.pop("BACKUP_KEY_FILE", None)
            key_layer = where
        merged.update(layer)
    key, key_source, key_legacy = _key(merged, key_layer, env_file, lines)

    name = merged.get("BACKUP_NAME") or None
    if name is not None and not _NAME.fullmatch(name):
        raise ConfigError(f"BACKUP_NAME {name!r} must be letters, digits, '.', '_' or '-' "
                          "and must not start with '.'")
    directory = merged.get("DIRECTORY") or None
    backup_dir = _backup_dir(merged)
    excludes = tuple(p.strip() for p in merged.get("BACKUP_EXCLUDE", "").split(",") if p.strip())
    state_dir = Path(os.path.abspath(merged.get("BACKUP_STATE_DIR")
                                     or default_state_dir(environ)))
    return Config(
        # Absolute: a mount in the background leaves the working folder for /.
        backup_dir=backup_dir,
        directory=Path(directory) if directory else None,
        backup_name=name,
        backup_key=key,
        key_source=key_source,
        key_legacy=key_legacy,
        delete_after_ms=_int_setting(merged, "DELETE_BACKUP_AFTER_MILLIS",
                                     DEFAULT_DELETE_AFTER_MS),
        host_id=_host_id(merged.get("BOOTSTRAP_HOST_ID") or None),
        excludes=excludes,
        interval_s=float(_int_setting(merged, "BACKUP_INTERVAL_SECONDS", 60)),
        checkpoint_s=_int_setting(merged, "BACKUP_CHECKPOINT_SECONDS", DEFAULT_CHECKPOINT_S),
        checkpoint_bytes=_int_setting(merged, "BACKUP_CHECKPOINT_BYTES",
                                      DEFAULT_CHECKPOINT_BYTES),
        state_dir=state_dir,
        cache_dir=Path(os.path.abspath(merged.get("BACKUP_CACHE_DIR") or state_dir / "cache")),
        cache_bytes=_int_setting(merged, "BACKUP_CACHE_BYTES", DEFAULT_CACHE_BYTES),
    )


def _backup_dir(merged: Mapping[str, str]) -> Path | str:
    """BACKUP_DIR: an absolute Path (a mount in the background leaves the working folder for
    /), or `s3://BUCKET/PREFIX` with the AWS_* settings checked and registered for it."""
    value = merged.get("BACKUP_DIR") or DEFAULT_BACKUP_DIR
    if not value.lower().startswith("s3:"):
        return Path(os.path.abspath(value))
    try:
        bucket, prefix = s3_backend.parse_url(value)
    except ValueError as exc:
        raise ConfigError(f"BACKUP_DIR {exc}") from None
    try:
        s3_backend.use_settings(merged)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    missing = [k for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY") if not merged.get(k)]
    if missing:
        raise ConfigError(f"BACKUP_DIR is on object storage but {' and '.join(missing)} "
                          f"{'is' if len(missing) == 1 else 'are'} not set (in the env file "
                          "or the environment)")
    return f"s3://{bucket}" + (f"/{prefix}" if prefix else "")


def default_state_dir(environ: Mapping[str, str] | None = None) -> Path:
    """BACKUP_STATE_DIR's default: /var/lib/humiofs for root, else $XDG_STATE_HOME/humiofs
    (~/.local/state/humiofs)."""
    environ = os.environ if environ is None else environ
    if os.geteuid() == 0:
        return Path("/var/lib/humiofs")
    base = environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local",
                                                         "state")
    return Path(base) / "humiofs"


Legacy = tuple[tuple[str, str], ...]


def _key(merged: Mapping[str, str], where: str, env_file: Path | None,
         lines: Mapping[str, tuple[int, str | None]]) -> tuple[str | None, str | None, Legacy]:
    """The canonical passphrase, where it was read from, and the other forms earlier versions
    read from the same source (FORMAT.md 4.4). `where` is the layer that set the key."""
    if merged.get("BACKUP_KEY_FILE"):
        path = Path(merged["BACKUP_KEY_FILE"])
        key, first_line, with_bom = _read_key_file(path)
        named = "--key-file" if where == "--key-file" else f"BACKUP_KEY_FILE in {where}"
        return key, f"the first line of the key file {path} ({named})", _other(
            key, first_line, f"from the key file {path} as its first line holds it (blanks "
            "and quotes included)") + tuple(f for f in _other(
                key, with_bom, f"from the key file {path} with the byte-order mark at its "
                "start (humiofs 0.2)") if f[0] != first_line)
    value = merged.get("BACKUP_KEY")
    if not value:
        return None, None, ()
    line = lines.get("BACKUP_KEY")
    if env_file is not None and line is not None:
        number, raw = line
        in_file = f"BACKUP_KEY on line {number} of the env file {env_file}"
        systemd = systemd_value(raw) if raw is not None else None
        if where != "the environment":
            return value, in_file, _other(
                value, systemd, f"from line {number} of {env_file} as systemd's "
                "EnvironmentFile= reads it")
        if raw is not None and systemd == value and \
                canonical_passphrase(raw) != canonical_passphrase(value):
            # The service's unit gave this env file to EnvironmentFile= as well as --config:
            # the environment's value is systemd's reading of this very line.
            return canonical_passphrase(raw), (
                f"{in_file} (the environment's BACKUP_KEY, systemd's reading of that line, "
                "is not used)"), _other(canonical_passphrase(raw), value,
                                        "as systemd's EnvironmentFile= put it in the "
                                        "environment")
    # The environment's value (a line `BACKUP_KEY` alone in the env file names it too).
    key = canonical_passphrase(value)
    return key, "BACKUP_KEY in the environment", _other(
        key, value, "from the environment as it holds it (blanks and quotes included)")


def _other(key: str, form: str | None, how: str) -> Legacy:
    return ((form, how),) if form is not None and form and form != key else ()


def _host_id(value: str | None) -> str | None:
    """BOOTSTRAP_HOST_ID goes into a file name the mount presents, so it must be a plain id."""
    if value is not None and not _HOST_ID.fullmatch(value.strip()):
        raise ConfigError(f"BOOTSTRAP_HOST_ID {value!r} must be letters, digits, '.', '_' or '-'")
    return value.strip() if value else None


def read_key_file(path: Path) -> str:
    """The key stored in a file: the canonical passphrase of its first line (FORMAT.md 4.4);
    ConfigError if it cannot be read or holds none."""
    return _read_key_file(path)[0]


KEY_FILE_MAX = 64 << 10     # bytes of a key file read: the key is its first line
ENV_FILE_MAX = 1 << 20      # bytes of an env file read


def read_env_text(path: Path) -> str:
    """An env file's text for parse_env_file (ConfigError if it cannot be read or is over
    1 MiB); bytes that are not UTF-8 are kept as surrogates, an error only in a line of one
    of humiofs's settings."""
    return _read_capped(path, ENV_FILE_MAX, "env file").decode("utf-8", "surrogateescape")


def _read_capped(path: Path, cap: int, what: str) -> bytes:
    """At most `cap` bytes of `path` (a ConfigError if it holds more: /dev/zero, a log file
    named by mistake, would otherwise be read until memory runs out)."""
    try:
        with open(path, "rb") as f:
            data = f.read(cap + 1)
    except IsADirectoryError:
        raise ConfigError(f"{what} {path} is a folder, not a file") from None
    except OSError as exc:
        if isinstance(exc, FileNotFoundError) and what == "key file" and "/" not in str(path):
            # Likely the key itself given where a file name belongs: never echo it.
            raise ConfigError("the key file does not exist (BACKUP_KEY_FILE and --key-file "
                              "name a file holding the key, not the key itself)") from None
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}") from None
    except ValueError:      # a NUL byte in the path
        raise ConfigError(f"the {what}'s name holds a NUL byte") from None
    if len(data) > cap and (what != "key file" or b"\n" not in data):
        raise ConfigError(f"{what} {path} is larger than {cap >> 10} KiB; is it the right "
                          "file?")
    return data


def _read_key_file(path: Path) -> tuple[str, str, str]:
    """(the canonical passphrase, the first line as it is without its line ending, and the
    canonical passphrase humiofs 0.2 made of it, which kept a leading BOM)."""
    data = _read_capped(path, KEY_FILE_MAX, "key file")
    raw = data.split(b"\n", 1)[0]
    try:
        first = raw.decode("utf-8").rstrip("\r")
    except UnicodeDecodeError:
        raise ConfigError(f"key file {path} is not UTF-8 text") from None
    if "\0" in first:
        raise ConfigError(f"key file {path} holds a NUL byte in its first line")
    # A BOM that an editor put at the start of the file is not part of the key (FORMAT.md 4.4).
    key = canonical_passphrase(first.removeprefix("\ufeff"))
    if not key:
        if not first.removeprefix("\ufeff").strip():
            raise ConfigError(f"key file {path} is empty" if not data.decode(
                "utf-8", "replace").removeprefix("\ufeff").strip() else
                              f"the first line of key file {path} is blank; the key must be "
                              "on the first line")
        raise ConfigError(f"key file {path} holds no key (only blanks or quotes)")
    return key, first, canonical_passphrase(first)


def _int_setting(values: Mapping[str, str], name: str, default: int) -> int:
    raw = values.get(name)
    if raw is None or raw.strip() == "":
        return default
    digits = raw.strip()        # blanks around a value, as every setting; ASCII digits only
    if digits[:1] == "-" and digits[1:].isascii() and digits[1:].isdigit():
        raise ConfigError(f"{name} must not be negative")
    if not (digits.isascii() and digits.isdigit()):
        raise ConfigError(f"{name} must be a whole number (digits 0-9 only), not {raw!r}")
    if len(digits.lstrip("0")) > 19 or int(digits) > _INT_MAX:
        raise ConfigError(f"{name} is too large (at most {_INT_MAX})")
    value = int(digits)
    if name == "BACKUP_CHECKPOINT_BYTES" and 0 < value < 1 << 20:
        log.warning("BACKUP_CHECKPOINT_BYTES is %d: a backup commits a checkpoint after nearly "
                    "every file (1073741824, 1 GiB, is the default; 0 turns it off)", value)
    return value


_INT_MAX = (1 << 63) - 1       # DELETE_BACKUP_AFTER_MILLIS may be Long.MAX_VALUE
