"""The `restore` subcommand: a generation written back to disk (restore.py)."""
from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable
from pathlib import Path

from humiofs import errors
from humiofs.cli import summary
from humiofs.cli.common import add_json, human, load_config, open_store
from humiofs.progress import human_bytes
from humiofs.store import generations
from humiofs.store.localstate import LocalState

log = logging.getLogger(__name__)


def add_commands(sub: "argparse._SubParsersAction[argparse.ArgumentParser]",
                 common: Callable[..., None], fmt: type[argparse.HelpFormatter],
                 epilog: str) -> None:
    p = sub.add_parser("restore", help="write a generation back to disk",
                       description="Rebuild the node tree of the latest generation (or --at "
                       "TIME) in --to DIR: contents, holes, symlinks, hard links, FIFOs, modes, "
                       "mtimes and extended attributes (ACLs and SELinux labels included); "
                       "owners and device nodes too when run as root. An entry the target "
                       "cannot take is named in a warning (exit 8) and the rest restored.",
                       epilog=epilog, formatter_class=fmt)
    common(p)
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
    add_json(p)
    p.set_defaults(func=cmd_restore)


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
    human(args, f"restore {store.name}: generation {generations.describe(gen)}{partial} -> "
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
