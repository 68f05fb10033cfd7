"""Command line: the parser, main, logging setup and exit codes.

main(argv) returns the exit code; every HumiofsError becomes one line on stderr and its code.
Each command family is its own module: backup, restore, ls, key, mount (mount, umount) and
maint (check, prune); common.py holds what they share.
"""
from __future__ import annotations

import argparse
import io
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any, NoReturn

from humiofs import errors
from humiofs.backup import scan
from humiofs.cli import backup, key, ls, maint, mount, restore
from humiofs.cli.common import EPILOG, add_settings
from humiofs.errors import HumiofsError, Interrupted

log = logging.getLogger("humiofs")


class _Parser(argparse.ArgumentParser):
    """No abbreviated options: `--key SECRET` must not be taken as `--key-file SECRET` and
    then echoed in an error message. Subcommand parsers inherit the class."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        if message.startswith("unrecognized arguments"):
            # Do not echo them: a mistaken `--key SECRET` would print the secret.
            message = ("unrecognized arguments (not shown, in case one is a key; the key is "
                       "never taken on the command line: use BACKUP_KEY or --key-file)")
        super().error(message)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("humiofs")
    except PackageNotFoundError:
        return "unknown (not installed)"


class _VersionAction(argparse.Action):
    """--version, looked up only when asked for: importlib.metadata and its scan of the
    installed packages cost every command about 30 ms on a cold cache."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS,
                 default: str = argparse.SUPPRESS, help: str | None = None) -> None:
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: object, option_string: str | None = None) -> None:
        parser._print_message(f"humiofs {_version()}\n", sys.stdout)
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="humiofs", description="Encrypted backups of a Humio/LogScale node's data "
        "directory, restorable with plain file copies from a read-only FUSE mount.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action=_VersionAction,
                        help="show program's version number and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    fmt = argparse.RawDescriptionHelpFormatter

    for module in (backup, restore, ls, key, mount, maint):
        module.add_commands(sub, add_settings, fmt, EPILOG)
    return parser


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.ERROR if quiet else (logging.DEBUG if verbose > 1 else
                                         logging.INFO if verbose else logging.WARNING)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("humiofs: %(levelname)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


# What an interrupted command leaves, per command (the rest: see the default in main).
_INTERRUPTED = {
    "cmd_backup": "interrupted; every generation and checkpoint committed before is intact "
                  "(the next run resumes from the newest checkpoint, if there is one)",
    "cmd_restore": "interrupted; every file restored so far is complete, the rest is missing "
                   "(restore --missing-only into the same target finishes it, folders' "
                   "attributes included)",
}


def _helper_form(argv: list[str], commands: set[str]) -> bool:
    """True for mount.fuse3's call `humiofs CONFIG MOUNTPOINT [-o OPTIONS]`; a mistyped
    command (`humiofs bakup ...`) is left to argparse, which names the commands."""
    import difflib
    if len(argv) not in (2, 4) or (len(argv) == 4 and argv[2] != "-o"):
        return False
    first = argv[0]
    return not (first.startswith("-") or first in commands
                or difflib.get_close_matches(first, commands, n=1, cutoff=0.6))


def _commands(parser: argparse.ArgumentParser) -> set[str]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return set(action.choices)
    return set()


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if _helper_form(argv, _commands(parser)):
        # mount(8) by way of mount.fuse3: `humiofs CONFIG MOUNTPOINT -o OPTIONS`.
        from humiofs.cli.mount import helper_argv
        try:
            argv = helper_argv(argv)
        except HumiofsError as exc:
            print(f"humiofs: error: {exc}", file=sys.stderr)
            return exc.exit_code
    args = parser.parse_args(argv)
    quiet = getattr(args, "quiet", False)
    # -q: nothing at all on success. A run that ends otherwise shows what it held back (its
    # warnings and summary), in order. What runs until stopped (backup --watch, a mount in
    # the foreground) only logs errors, as they happen.
    endless = getattr(args, "watch", False) or getattr(args, "foreground", False)
    # --json objects are what a script asked for: -q never holds them back.
    held = _Held(hold_stdout=not getattr(args, "json", False)) if quiet and not endless \
        else None
    _setup_logging(getattr(args, "verbose", 0), quiet and held is None)
    code = errors.EXIT_INTERNAL
    try:
        code = _run(args)
    finally:
        if held is not None:
            held.release(show=code != errors.EXIT_OK)
    return code


class _Held:
    """Holds back everything written to stdout and stderr (and so the log) until release."""

    def __init__(self, hold_stdout: bool = True) -> None:
        self.parts: list[tuple[bool, str]] = []
        self.saved = sys.stdout, sys.stderr
        if hold_stdout:
            sys.stdout = _Part(self.parts, False)
        sys.stderr = _Part(self.parts, True)
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.StreamHandler):
                handler.setStream(sys.stderr)

    def release(self, show: bool) -> None:
        sys.stdout, sys.stderr = self.saved
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.StreamHandler):
                handler.setStream(sys.stderr)
        if show:
            for is_err, text in self.parts:
                (sys.stderr if is_err else sys.stdout).write(text)
            sys.stdout.flush()
            sys.stderr.flush()


class _Part(io.StringIO):
    def __init__(self, parts: list[tuple[bool, str]], is_err: bool) -> None:
        super().__init__()
        self.parts, self.is_err = parts, is_err

    def write(self, text: str) -> int:
        self.parts.append((self.is_err, text))
        return len(text)


_NO_WORKING_FOLDER = ("the working folder was deleted, so a relative path cannot be "
                      "found: cd to a folder that exists, or give absolute paths")


def _working_folder_gone() -> bool:
    try:
        os.getcwd()
    except FileNotFoundError:
        return True
    return False


def _run(args: argparse.Namespace) -> int:
    func: Callable[[argparse.Namespace], int] = args.func
    old_term = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        # Backup, restore, check and prune walk trees recursively: a node may be deep.
        with scan.deep_walk():
            return func(args)
    except HumiofsError as exc:
        hint = (f" ({_NO_WORKING_FOLDER})" if exc.exit_code in (errors.EXIT_USAGE,
                errors.EXIT_TARGET) and _working_folder_gone() else "")
        print(f"humiofs: error: {exc}{hint}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        exc2 = Interrupted(_INTERRUPTED.get(args.func.__name__, "interrupted; the store is "
                                            "as it was before, or as the run left it complete"))
        print(f"humiofs: error: {exc2}", file=sys.stderr)
        return exc2.exit_code
    except BrokenPipeError:
        return errors.EXIT_OK
    except OSError as exc:
        # Every OS error a user can cause is mapped where it happens; one that is not is a
        # bug, but still one line (the traceback with -v). No permission, a name too long
        # or a file where a folder belongs are the user's to fix wherever they show up.
        log.debug("unexpected OS error", exc_info=True)
        if isinstance(exc, FileNotFoundError) and not exc.filename and _working_folder_gone():
            # os.getcwd(), for a relative path (Path.resolve, os.path.abspath): no name given.
            print(f"humiofs: error: {_NO_WORKING_FOLDER}", file=sys.stderr)
            return errors.EXIT_USAGE
        where = f": {exc.filename}" if exc.filename else ""
        mapped = errors.refused(exc, str(exc.filename or "a file"), setting=True)
        if mapped is not None:
            print(f"humiofs: error: {mapped}", file=sys.stderr)
            return mapped.exit_code
        print(f"humiofs: error: {exc.strerror or exc}{where} (not expected here: please "
              "report it, with the output of -vv)", file=sys.stderr)
        return errors.EXIT_INTERNAL
    except BaseException as exc:
        # The last resort for a panic in obstore's Rust code (pyo3's PanicException, not an
        # Exception): config.py refuses the settings known to cause one.
        if type(exc).__name__ != "PanicException":
            raise
        log.debug("panic in the S3 client", exc_info=True)
        print(f"humiofs: error: the S3 client failed: {str(exc).splitlines()[0][:200]} (not "
              "expected: please report it, with the output of -vv)", file=sys.stderr)
        return errors.EXIT_IO
    finally:
        signal.signal(signal.SIGTERM, old_term)
