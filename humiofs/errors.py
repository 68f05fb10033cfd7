"""One exception tree for humiofs; every class carries the exit code the CLI returns for it.

The exit codes are part of the interface and are listed in the README.
"""
from __future__ import annotations

import errno
import os

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_WRONG_KEY = 3
EXIT_LOCKED = 4
EXIT_DAMAGED = 5
EXIT_TARGET = 6
EXIT_IO = 7
EXIT_PARTIAL = 8
EXIT_INTERRUPTED = 130


class HumiofsError(Exception):
    """An error the user should see as one line, and the exit code it maps to."""

    exit_code = EXIT_INTERNAL

    def __init__(self, message: str, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class ConfigError(HumiofsError):
    """Bad flags, environment or env-file settings."""

    exit_code = EXIT_USAGE


class WrongKey(HumiofsError):
    """The key does not open the store (or every key file of it is damaged)."""

    exit_code = EXIT_WRONG_KEY


class StoreLocked(HumiofsError):
    """Another writer holds the store's lock."""

    exit_code = EXIT_LOCKED


class StoreError(HumiofsError):
    """The store is missing, malformed or fails authentication."""

    exit_code = EXIT_DAMAGED


class StoreMetadataDamaged(StoreError):
    """The store's config or key files are missing, damaged or from another store, so no key
    can open it as it is. Not a wrong key: the data may well be intact."""


class NoSuchObject(StoreError):
    """A store file that a ref points to does not exist."""


class IntegrityError(StoreError):
    """Stored bytes failed authentication or a structural check."""


class NoSuchStore(StoreError):
    """There is no store at the given location."""

    exit_code = EXIT_USAGE


class TargetError(HumiofsError):
    """A restore target or mountpoint is unusable or would be overwritten."""

    exit_code = EXIT_TARGET


class StoreIOError(HumiofsError):
    """Writing the store failed (for example, the backup disk is full)."""

    exit_code = EXIT_IO


class SourceChanged(HumiofsError):
    """A source file changed or vanished while it was being read."""

    exit_code = EXIT_PARTIAL


class Interrupted(HumiofsError):
    """The run was stopped by a signal before it finished."""

    exit_code = EXIT_INTERRUPTED


_CONTROL = ({c: f"\\x{c:02x}" for c in [*range(0x20), 0x7F]}
            | {0x0A: "\\n", 0x09: "\\t"}
            | {c: f"\\u{c:04x}" for c in range(0x80, 0xA0)}     # C1 (U+009B is CSI)
            # Line and paragraph separators and the bidi controls: they break a line or
            # reorder what a terminal shows (Trojan Source), so they are shown as \uNNNN.
            | {c: f"\\u{c:04x}" for c in [0x061C, 0x200E, 0x200F, 0x2028, 0x2029,
                                           *range(0x202A, 0x202F), *range(0x2066, 0x206A)]})


def show(name: bytes) -> str:
    """A path or name from the node for a one-line message: UTF-8 as is, any other byte as
    \\xNN, and control characters (C0 and C1, newlines, escape sequences; line separators and
    bidi controls as \\uNNNN) escaped, so that a name can neither break the line, act on the
    terminal, nor reorder what it shows."""
    return name.decode("utf-8", "backslashreplace").translate(_CONTROL)


_UNREACHABLE = (errno.ECONNREFUSED, errno.ETIMEDOUT, errno.ECONNRESET, errno.EHOSTUNREACH,
                errno.ENETUNREACH, errno.ENOLCK)


def refused(exc: OSError, what: str, setting: bool = False) -> HumiofsError | None:
    """The error for an OS refusal that is neither damage nor a bug, or None: no permission
    on the backup disk, or object storage that cannot be reached or whose lock was lost
    (exit 7, as a disk that cannot be written), or, if `what` is a path
    the settings name (not a part of a store, where it is damage), one that cannot be one (too
    long, a file where a folder belongs, a symlink loop: exit 2)."""
    if exc.errno in (errno.EACCES, errno.EPERM):
        if exc.strerror not in (os.strerror(errno.EACCES), os.strerror(errno.EPERM)):
            # Object storage's refusal: its line names the credentials to check.
            return StoreIOError(f"cannot read or write {what}: {exc.strerror}")
        return StoreIOError(f"cannot read or write {what}: {exc.strerror} (run humiofs as the "
                            "user that owns the backups, or give this user access)")
    if exc.errno in _UNREACHABLE:
        # Object storage that does not answer (after the backend's retries): not damage.
        return StoreIOError(f"cannot read or write {what}: {exc.strerror}")
    if setting and exc.errno in (errno.ENAMETOOLONG, errno.ENOTDIR, errno.ELOOP):
        return ConfigError(f"{what}: {exc.strerror} (check BACKUP_DIR and BACKUP_NAME)")
    return None


def os_reason(exc: OSError) -> str:
    """Why an OS call failed, for a message about one entry."""
    if exc.errno == errno.EMFILE:
        return ("folders nested deeper than the open-file limit allows (raise it with "
                "ulimit -n)")
    return exc.strerror or str(exc)
