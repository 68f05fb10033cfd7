"""Command line: argparse subcommands, logging setup and exit codes.

main(argv) returns the exit code; every HumiofsError becomes one line on stderr and its code.
"""
from __future__ import annotations

import argparse
import importlib
import io
import logging
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

from humiofs import config as configmod
from humiofs import errors
from humiofs.backup import scan
from humiofs.cli import summary
from humiofs.config import Config
from humiofs.store.backend.factory import is_remote, store_at
from humiofs.errors import HumiofsError, Interrupted, StoreError
from humiofs.progress import human_bytes
from humiofs.store import generations, keys
from humiofs.store.format import generation_time
from humiofs.store.localstate import LocalState
from humiofs.store.repository import (
    Store,
    backend_of,
    generation_names,
    list_stores,
    looks_like_store,
)

log = logging.getLogger("humiofs")

EPILOG = """\
settings come from --config (a KEY=VALUE env file as for docker --env-file), then the
environment, then flags (highest). The key is never taken from the command line: set
BACKUP_KEY in the env file or environment, or use --key-file.
exit codes: 0 ok, 1 internal error, 2 bad usage or settings, 3 wrong key, 4 store locked by
another writer, 5 store damaged, 6 restore target or mountpoint unusable, 7 backup disk full or
not writable, 8 finished with warnings (files skipped or read again), 130 interrupted."""


def _common(p: argparse.ArgumentParser, need_name: bool = True) -> None:
    g = p.add_argument_group("settings")
    g.add_argument("--config", "-c", type=Path, metavar="ENV_FILE",
                   help="KEY=VALUE settings file (docker --env-file format)")
    g.add_argument("--key-file", type=Path, metavar="FILE",
                   help="read the key from the first line of FILE instead of BACKUP_KEY")
    g.add_argument("--backup-dir", metavar="DIR", help="overrides BACKUP_DIR")
    if need_name:
        g.add_argument("--name", metavar="NAME", help="overrides BACKUP_NAME")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    p.add_argument("-q", "--quiet", action="store_true",
                   help="print nothing at all if the command succeeds (exit 0); otherwise "
                   "what it would have printed")


def _json(p: argparse.ArgumentParser, watch: bool = False) -> None:
    p.add_argument("--json", action="store_true", help="the summary as one JSON object on "
                   "stdout" + (" (one per pass with --watch)" if watch else "")
                   + "; the schema is in docs/JSON.md")


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


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="humiofs", description="Encrypted backups of a Humio/LogScale node's data "
        "directory, restorable with plain file copies from a read-only FUSE mount.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"humiofs {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    fmt = argparse.RawDescriptionHelpFormatter

    p = sub.add_parser("backup", help="back up DIRECTORY into BACKUP_DIR/BACKUP_NAME",
                       description="Store the current state of DIRECTORY as a new generation in "
                       "BACKUP_DIR/BACKUP_NAME (created on first use). Unchanged files are not "
                       "read again.", epilog=EPILOG, formatter_class=fmt)
    _common(p)
    p.add_argument("--directory", metavar="DIR", help="overrides DIRECTORY")
    p.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                   help="skip matching entries; /PATTERN is anchored at DIRECTORY, PATTERN "
                   "matches a name at any depth (added to BACKUP_EXCLUDE and /jvm-tmp)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on a terminal")
    _json(p, watch=True)
    p.add_argument("--watch", action="store_true",
                   help="keep running: back up every BACKUP_INTERVAL_SECONDS (default 60)")
    p.add_argument("--interval", type=float, metavar="SECONDS",
                   help="with --watch, overrides BACKUP_INTERVAL_SECONDS")
    p.set_defaults(func=cmd_backup)

    p = sub.add_parser("restore", help="write a generation back to disk",
                       description="Rebuild the node tree of the latest generation (or --at "
                       "TIME) in --to DIR: contents, holes, symlinks, hard links, FIFOs, modes, "
                       "mtimes and extended attributes (ACLs and SELinux labels included); "
                       "owners and device nodes too when run as root. An entry the target "
                       "cannot take is named in a warning (exit 8) and the rest restored.",
                       epilog=EPILOG, formatter_class=fmt)
    _common(p)
    p.add_argument("--to", type=Path, required=True, metavar="DIR", help="restore target")
    p.add_argument("--at", metavar="TIME", help="the latest generation at or before TIME: a "
                   "time as ls prints it (2026-11-24T10:00:00.123Z), a folder name under the "
                   "mount's .generations (20261124T100000.123Z), ISO 8601 such as 2026-11-24T10:00 "
                   "(local time without a zone; a time covers its whole last unit, here the "
                   "minute), @UNIXSECONDS, or a generation name (exactly that one)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--missing-only", action="store_true",
                      help="only write files that are absent from DIR (restore missing segments)")
    mode.add_argument("--overwrite", action="store_true",
                      help="replace files that exist in DIR")
    p.add_argument("--keep-going", action="store_true",
                   help="on a bad day: a file (or folder) whose stored data is damaged or "
                   "missing is named and skipped, every other one is restored, and the exit "
                   "code is 5 at the end (without it, the first damaged file ends the restore)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on a terminal")
    _json(p)
    p.set_defaults(func=cmd_restore)

    p = sub.add_parser("ls", help="list the backups in BACKUP_DIR and their generations",
                       description="List the stores in BACKUP_DIR (or only --name) with their "
                       "generations. Without a key only names and times are shown.",
                       epilog=EPILOG, formatter_class=fmt)
    _common(p)
    _json(p)
    p.set_defaults(func=cmd_ls)

    p = sub.add_parser("key", help="key management", description="Key management.")
    ksub = p.add_subparsers(dest="key_command", metavar="ACTION")
    ksub.required = True
    kp = ksub.add_parser("change", help="re-wrap the store key under a new BACKUP_KEY",
                         description="Wrap the store's master key under a new key read from "
                         "--new-key-file. No data is re-encrypted; the old key stops working.",
                         epilog=EPILOG, formatter_class=fmt)
    _common(kp)
    kp.add_argument("--new-key-file", type=Path, required=True, metavar="FILE",
                    help="file whose first line is the new key")
    kp.set_defaults(func=cmd_key_change)

    _add_extra_commands(sub, fmt)
    return parser


def _add_extra_commands(sub: "argparse._SubParsersAction[_Parser]",
                        fmt: type[argparse.HelpFormatter]) -> None:
    """Commands implemented in their own modules (mount_cli: mount, umount; maint_cli: check,
    prune)."""
    for module in ("humiofs.cli.mount", "humiofs.cli.maint"):
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError:
            continue
        mod.add_commands(sub, _common, fmt, EPILOG)


def load_config(args: argparse.Namespace) -> Config:
    flags = {
        "BACKUP_DIR": getattr(args, "backup_dir", None),
        "BACKUP_NAME": getattr(args, "name", None),
        "DIRECTORY": getattr(args, "directory", None),
    }
    return configmod.load(flags, env_file=args.config, key_file=args.key_file)


def open_store(cfg: Config, read_ahead: bool = False) -> Store:
    """Opens the configured store (it must exist). `read_ahead`, for a command that reads
    whole packs in order (restore): a store on object storage is read in blocks of 1 MiB
    with the next ones fetched in the background (backend/cache.py), in memory."""
    where = cfg.store_path()
    if read_ahead and is_remote(where):
        from humiofs.store.backend.cache import MEMORY_BYTES, CachedBackend
        from humiofs.store.repository import backend_of
        backend = CachedBackend(backend_of(where), None, MEMORY_BYTES)
        try:
            return Store.open(backend, cfg.passphrase())
        except BaseException:
            backend.close()
            raise
    return Store.open(where, cfg.passphrase())


def cmd_backup(args: argparse.Namespace) -> int:
    from humiofs.backup.scan import DEFAULT_EXCLUDES
    from humiofs.backup.writer import Backup, BackupOptions

    cfg = load_config(args)
    source = cfg.need_directory()
    cfg.need_name()
    cfg.need_key()
    if args.watch:
        watch = importlib.import_module("humiofs.backup.watch")
        interval = args.interval if args.interval is not None else cfg.interval_s
        return watch.run(cfg, interval, tuple(args.exclude), not args.no_progress,
                         json_out=args.json, quiet=args.quiet)
    store = Store.open_or_create(cfg.store_path(), cfg.passphrase())
    opts = BackupOptions(source=source, backup_name=store.name,
                         excludes=DEFAULT_EXCLUDES + cfg.excludes + tuple(args.exclude),
                         host_id=cfg.host_id, progress=None if not args.no_progress else False,
                         checkpoints=True, checkpoint_s=cfg.checkpoint_s,
                         checkpoint_bytes=cfg.checkpoint_bytes)
    start = time.monotonic()
    state = LocalState.of(cfg.state_dir)
    with store.lock():
        store.clean_tmp()
        parent = generations.latest_readable(store)
        rollback = (state.observe(store, generations.complete_name(parent)) if state
                    else None)
        if rollback:
            log.warning("%s", rollback)
        run = Backup(store, opts)
        gen = run.run(parent)
        if state and (done := generations.complete_name(gen)) is not None:
            state.observe(store, done)
    s = run.stats
    code = (errors.EXIT_PARTIAL if s.skipped or s.healed or s.vanished or s.lost_deleted
            or rollback else errors.EXIT_OK)
    if args.json:
        summary.emit("backup", store=store.name, generation=summary.generation(gen),
                     files=summary.backup_files(s), bytes_read=s.bytes_read,
                     bytes_stored=s.bytes_stored, lost_packs=len(s.lost_packs),
                     rolled_back=bool(rollback),
                     seconds=round(time.monotonic() - start, 3), exit=code)
    skipped = f", {s.skipped} skipped" if s.skipped else ""
    healed = (f", {s.healed} read again from the node after a lost pack" if s.healed
              else "")
    vanished = f", {s.vanished} vanished while read" if s.vanished else ""
    # A file being written (appended to) is stored as of the size it had when it was opened.
    live = f" ({s.live} still being written, stored as they were)" if s.live else ""
    # A run that resumed a backup that had not finished (FORMAT.md 7.4) says so.
    resumed = (f" (resumed from checkpoint {parent.name})" if parent is not None
               and parent.checkpoint else "")
    _human(args, f"backup {store.name}: generation {generations.describe(gen)}{resumed}: "
          f"{s.new} new, {s.changed} changed{live}, {s.unchanged} unchanged files{healed}"
          f"{vanished}{skipped}; read {human_bytes(s.bytes_read)}, stored {human_bytes(s.bytes_stored)} "
          f"in {time.monotonic() - start:.1f}s")
    if s.lost_packs:
        log.warning("the store has lost %d pack(s) that earlier generations need; this "
                    "generation does not need them (what it could read again from the node, "
                    "it stored anew). Run `humiofs check` to see which files of earlier "
                    "generations are lost", len(s.lost_packs))
    return code


def _human(args: argparse.Namespace, line: str) -> None:
    """A summary line for people: not with --json, which prints the object instead."""
    if not getattr(args, "json", False):
        print(line)


def cmd_restore(args: argparse.Namespace) -> int:
    from humiofs.restore import Restore, RestoreOptions

    cfg = load_config(args)
    at = generations.parse_at(args.at) if args.at is not None else None
    store = open_store(cfg, read_ahead=True)
    picked = generations.pick(store, at)
    gen = picked.generation
    state = LocalState.of(cfg.state_dir)
    # With --at the newest generation is not looked for, so a rollback is not either.
    rollback = state.observe(store, gen.name) if state and at is None else None
    if rollback:
        log.warning("%s", rollback)
    start = time.monotonic()
    opts = RestoreOptions(target=args.to, missing_only=args.missing_only,
                          overwrite=args.overwrite, keep_going=args.keep_going,
                          progress=None if not args.no_progress else False)
    stats = Restore(store, opts).run(gen)
    code = (errors.EXIT_DAMAGED if stats.damaged else errors.EXIT_PARTIAL
            if stats.skipped or stats.xattrs_refused or picked.damaged or rollback
            or gen.checkpoint else errors.EXIT_OK)     # a checkpoint is partial (7.4)
    if args.json:
        summary.emit("restore", store=store.name, generation=summary.generation(gen),
                     target=str(args.to), files=stats.files, dirs=stats.dirs,
                     symlinks=stats.symlinks, specials=stats.specials, links=stats.links,
                     skipped=stats.skipped + stats.present, xattrs_refused=stats.xattrs_refused,
                     bytes=stats.bytes, damaged=stats.damaged,
                     newer_damaged=[name for name, _ in picked.damaged],
                     rolled_back=bool(rollback),
                     seconds=round(time.monotonic() - start, 3), exit=code)
    skipped = f", {stats.present} already there (left alone)" if stats.present else ""
    skipped += f", {stats.skipped} left alone (named above)" if stats.skipped else ""
    if stats.xattrs_refused:
        skipped += f", {stats.xattrs_refused} kinds of extended attribute refused by the target"
    partial = " (a checkpoint: partial)" if gen.checkpoint else ""
    _human(args, f"restore {store.name}: generation {generations.describe(gen)}{partial} -> "
          f"{args.to}: {stats.files} files, {stats.dirs} folders, {stats.symlinks} symlinks"
          + (f", {stats.specials} FIFOs and devices" if stats.specials else "")
          + (f" ({stats.links} of the files as hard links)" if stats.links else "")
          + f"{skipped}; {human_bytes(stats.bytes)} of data in {time.monotonic() - start:.1f}s")
    if stats.damaged:
        shown = ", ".join(stats.damaged[:5]) + (", ..." if len(stats.damaged) > 5 else "")
        raise errors.StoreError(
            f"{len(stats.damaged)} damaged file(s) or folder(s) not restored ({shown}; each "
            "is named above); everything else was restored. Look for them in an earlier "
            "generation (restore --at, or the mount's .generations), and run `humiofs check`")
    if picked.damaged:
        log.warning("restored %s: the newer generation(s) %s are damaged (see above); run "
                    "`humiofs check`", generations.describe(gen),
                    ", ".join(name for name, _ in picked.damaged))
    return code


def cmd_ls(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    if cfg.backup_name and is_remote(cfg.backup_dir):
        list_stores(cfg.backup_dir)     # a missing bucket, said as such
    names = [cfg.backup_name] if cfg.backup_name else list_stores(cfg.backup_dir)
    if not names:
        _human(args, f"no backups in {cfg.backup_dir}")
        return errors.EXIT_OK
    for name in names:
        path = store_at(cfg.backup_dir, name)
        if not looks_like_store(backend_of(path)):
            raise errors.NoSuchStore(f"no humiofs store at {path}")
        store: Store | None = None
        if cfg.backup_key:
            try:
                store = Store.open(path, cfg.passphrase())
            except (errors.WrongKey, errors.StoreMetadataDamaged) as exc:
                # The store the settings name must open, as for every other command; when
                # listing all of BACKUP_DIR, the others may belong to nodes with other keys.
                if cfg.backup_name:
                    raise
                why = ("the key does not open this backup" if isinstance(exc, errors.WrongKey)
                       else f"cannot be opened: {exc}")
                if args.json:
                    summary.emit("ls", store=name, opened=False, error=why, generations=[])
                else:
                    print(f"{name}: {why}")
                continue
        rows = [row for gname in generation_names(path)
                if (row := _ls_row(store, gname)) is not None]
        # What restore, the mount's NAME/ and the next backup take as the latest: the newest
        # generation that reads back.
        readable = [row for row in rows if row["files"] is not None and not row["checkpoint"]]
        if readable:
            readable[-1]["latest"] = True
        state = LocalState.of(cfg.state_dir) if store is not None else None
        if store is not None and state is not None:
            newest = readable[-1]["name"] if readable else None
            rollback = state.observe(store, newest, [row["name"] for row in rows])
            if rollback:
                log.warning("%s", rollback)
        if args.json:
            summary.emit("ls", store=name, opened=store is not None, error=None,
                         generations=rows)
            continue
        cps = sum(1 for row in rows if row["checkpoint"])
        print(f"{name}: {len(rows) - cps} generation(s)"
              + (f", {cps} checkpoint(s)" if cps else ""))
        for row in rows:
            line = f"  {row['time']}  {row['name']}"
            if row["damaged"]:
                line += f"  DAMAGED: {row['damaged']}"
            elif row["checkpoint"]:
                line += (f"  checkpoint (partial): {row['files']} files  "
                         f"{human_bytes(row['bytes'])} so far")
                line += f"  node {row['node']}" if row["node"] is not None else ""
            elif row["files"] is not None:
                line += f"  {row['files']} files  {human_bytes(row['bytes'])}"
                line += f"  node {row['node']}" if row["node"] is not None else ""
            print(line + ("  (latest)" if row["latest"] else ""))
    return errors.EXIT_OK


def _ls_row(store: Store | None, gname: str) -> dict[str, Any] | None:
    """One generation for ls: name, time, and with a key files, bytes, node or damaged; None
    if its file is gone since the listing (superseded or pruned)."""
    row: dict[str, Any] = {"name": gname, "time": generations.format_time(generation_time(gname)),
                           "files": None, "bytes": None, "node": None, "damaged": None,
                           "latest": False, "checkpoint": False}
    if store is None:
        return row
    try:
        g = generations.load_listed(store, gname)
    except StoreError as exc:
        row["damaged"] = str(exc)
        return row
    if g is None:
        return None
    row.update(files=g.stats.get("files", 0), bytes=g.stats.get("bytes", 0),
               node=g.identity.node_id if g.identity else None, checkpoint=g.checkpoint)
    return row


def cmd_key_change(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    new_key = configmod.read_key_file(args.new_key_file)
    store = open_store(cfg)
    same = keys.Passphrase.of(new_key).text == store.passphrase
    with store.lock():
        store.change_key(new_key)
    if same:
        # A repair (README, After a bad check): one fresh key file instead of the old ones.
        print(f"the new key is the one that already opened {store.path}: its key files were "
              "rewritten as one, under the same key; nothing else changed")
    else:
        print(f"key changed for {store.path}; the old key no longer opens it")
    return errors.EXIT_OK


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


def _run(args: argparse.Namespace) -> int:
    func: Callable[[argparse.Namespace], int] = args.func
    old_term = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        # Backup, restore, check and prune walk trees recursively: a node may be deep.
        with scan.deep_walk():
            return func(args)
    except HumiofsError as exc:
        print(f"humiofs: error: {exc}", file=sys.stderr)
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
        where = f": {exc.filename}" if exc.filename else ""
        mapped = errors.refused(exc, str(exc.filename or "a file"), setting=True)
        if mapped is not None:
            print(f"humiofs: error: {mapped}", file=sys.stderr)
            return mapped.exit_code
        print(f"humiofs: error: {exc.strerror or exc}{where} (not expected here: please "
              "report it, with the output of -vv)", file=sys.stderr)
        return errors.EXIT_INTERNAL
    finally:
        signal.signal(signal.SIGTERM, old_term)
