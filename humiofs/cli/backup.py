"""The `backup` subcommand: one run, or --watch (backup/watch.py)."""
from __future__ import annotations

import argparse
import importlib
import logging
import time
from collections.abc import Callable

from humiofs import errors
from humiofs.cli import summary
from humiofs.cli.common import add_json, human, load_config
from humiofs.progress import human_bytes
from humiofs.store import generations
from humiofs.store.localstate import LocalState
from humiofs.store.repository import Store

log = logging.getLogger(__name__)


def add_commands(sub: "argparse._SubParsersAction[argparse.ArgumentParser]",
                 common: Callable[..., None], fmt: type[argparse.HelpFormatter],
                 epilog: str) -> None:
    p = sub.add_parser("backup", help="back up DIRECTORY into BACKUP_DIR/BACKUP_NAME",
                       description="Store the current state of DIRECTORY as a new generation in "
                       "BACKUP_DIR/BACKUP_NAME (created on first use). Unchanged files are not "
                       "read again.", epilog=epilog, formatter_class=fmt)
    common(p)
    p.add_argument("--directory", metavar="DIR", help="overrides DIRECTORY")
    p.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                   help="skip matching entries; /PATTERN is anchored at DIRECTORY, PATTERN "
                   "matches a name at any depth (added to BACKUP_EXCLUDE and /jvm-tmp)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on a terminal")
    add_json(p, watch=True)
    p.add_argument("--watch", action="store_true",
                   help="keep running: back up every BACKUP_INTERVAL_SECONDS (default 60)")
    p.add_argument("--interval", type=float, metavar="SECONDS",
                   help="with --watch, overrides BACKUP_INTERVAL_SECONDS")
    p.set_defaults(func=cmd_backup)


def cmd_backup(args: argparse.Namespace) -> int:
    from humiofs.backup.prewarm import Prewarm
    from humiofs.backup.scan import DEFAULT_EXCLUDES

    cfg = load_config(args)
    source = cfg.need_directory()
    cfg.need_name()
    cfg.need_key()
    if args.watch:
        watch = importlib.import_module("humiofs.backup.watch")
        interval = args.interval if args.interval is not None else cfg.interval_s
        return watch.run(cfg, interval, tuple(args.exclude), not args.no_progress,
                         json_out=args.json, quiet=args.quiet)
    # Opening the store is mostly its key's derivation: the run's imports and the node's
    # metadata are read meanwhile (backup/prewarm.py).
    with Prewarm(source):
        store = Store.open_or_create(cfg.store_path(), cfg.passphrase())
    from humiofs.backup.writer import Backup, BackupOptions
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
            state.record(store, done)
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
    human(args, f"backup {store.name}: generation {generations.describe(gen)}{resumed}: "
          f"{s.new} new, {s.changed} changed{live}, {s.unchanged} unchanged files{healed}"
          f"{vanished}{skipped}; read {human_bytes(s.bytes_read)}, stored {human_bytes(s.bytes_stored)} "
          f"in {time.monotonic() - start:.1f}s")
    if s.lost_packs:
        log.warning("the store has lost %d pack(s) that earlier generations need; this "
                    "generation does not need them (what it could read again from the node, "
                    "it stored anew). Run `humiofs check` to see which files of earlier "
                    "generations are lost", len(s.lost_packs))
    return code
