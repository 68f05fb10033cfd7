"""The `check` and `prune` subcommands (wired in by cli.build_parser)."""
from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable

from humiofs import errors
from humiofs.cli import summary
from humiofs.cli.common import load_config, open_store
from humiofs.progress import human_bytes
from humiofs.store.backend.factory import store_at
from humiofs.store.format import generation_time
from humiofs.store.generations import format_time
from humiofs.store.localstate import LocalState

log = logging.getLogger(__name__)

CHECK_DESCRIPTION = """\
Verify the store BACKUP_DIR/BACKUP_NAME and report every problem with the node files and
generations it affects.

Always checked: the store layout, every key file, every generation (it must decrypt and
authenticate), every folder listing reachable from any generation, and every pack a
generation refers to: it exists, has a valid header, is long enough for every blob in it, and
one chunk of it authenticates (so a pack replaced by another file is found). With --read-data
every chunk of every file's data is authenticated too, which reads the whole store;
--read-data-subset spreads that over several runs. Safe next to a running backup (also
--watch) and mounts; a prune waits for check to finish.

What to do after a bad check. Under each 'problem:' line are the node files (paths relative
to DIRECTORY) whose backup is lost in the generations named ('including the latest' if the
newest is hit); everything else restores. First copy what you need from generations that are
not affected: restore --at TIME --keep-going, or the mount's .generations/. Then, by finding:

  pack ... is missing, or is truncated
      The next backup reads the files of that pack that are still on the node again (it
      exits 8 and names them): new generations are whole. Earlier generations keep missing
      them; prune drops those in time.
  pack ... fails authentication, is not a readable humiofs pack, or a reference into it is
  inconsistent; it holds file data
      The pack's bytes were changed in place, and a backup would keep referring to it for
      files that have not changed. Move that pack file out of the store (keep it), then run
      a backup: it is then 'missing', and the backup reads those files again.
  the same; it holds folder listings
      Leave the pack where it is and run a backup: it reads those folders again from the
      node (it needs about their size of free space). Moving it out would lose every other
      folder it lists from earlier generations; prune frees nothing while it is damaged, so
      on a full disk free space outside the store, or move the pack out after all.
  pack ... is cut short (not even a pack header)
      Run a backup, which reads its files again; leave the file.
  no generation of the store can be read
      The key files' master key opens none of the generations: keys/ came from another
      store (put this store's keys/ back from a copy of it), or every generation is damaged.
      Backup and prune refuse; nothing is deleted. Do not set the generations aside.
  the store has ... pack(s) but no generation
      generations/ was emptied or lost. Put it back from a copy of the store; prune deletes
      no pack meanwhile.
  damaged/... reads back
      An intact generation was moved to damaged/ by hand: move it back to generations/.
  X is a symlink, not part of a humiofs store
      Move it out and put the real folder or file back; backup and prune refuse until then.
  generation ... cannot be read
      That state of the node is lost; no other generation depends on it. Restore, the mount
      and the next backup take the newest generation that reads, but prune deletes no pack
      while it is in generations/ (it may need any): `humiofs prune --set-aside-damaged`
      (--grace 0 on a full disk) moves it to NAME/damaged/ and frees what the others do not
      need.
  the store ... was rolled back
      Generations this host committed or saw were deleted, or the store was replaced by an
      older copy. If nobody did that on purpose, find out who can write the backup drive.
      Until then prune refuses (exit 5), so putting them back still works. The next
      backup's generation ends the finding.
  key file keys/... is damaged
      Another key file opens the store; `humiofs key change` with the same key rewrites them.
  NAME is missing from the store, or has the wrong type
      Recreate the folder (mkdir -m 700), or put back the file from a copy of the store.

Not problems (exit 0): 'warning:' lines name files the store does not use (a note, a pack in
the wrong packs/xx/, a damaged prune record): move them out of the store; generation
files set aside in damaged/; and a key file another passphrase opens (an interrupted key
change leaves two): remove the one the warning names, or run `humiofs key change`. 'note:' lines name packs no generation needs and leftovers in
tmp/: prune, or the next backup, removes them (the note says when prune cannot yet).

If the store cannot be opened at all, check says why instead: a wrong key (exit 3), or a
missing or damaged config, or key files from another store (exit 5; the message says what
to put back). A store is never to be deleted for either: keep it."""

CHECK_EXIT = """\
check exit codes: 0 healthy (warnings and notes are not damage), 5 damaged (problems listed;
also a rolled-back store, or a config or key file that is missing or damaged), 3 wrong key,
2 no such store or bad settings, 4 a prune holds the store (only with --no-wait)."""

PRUNE_DESCRIPTION = """\
Drop the generations that retention no longer keeps, then the packs that no kept generation
needs. `backup --watch` does this by itself (every 10 intervals after a change, hourly when
idle); run it by hand for a store without a watching backup.

Kept: the latest generation; every generation holding a file that the next generation
lacks, while that next one (the first without the file) is younger than
DELETE_BACKUP_AFTER_MILLIS (default 7 days), and that next one with it, so that a file deleted
on the node stays restorable for that long after the backup first saw it gone, and goes with
the first prune after that; the last generation of each hour of the past day and of each day
within DELETE_BACKUP_AFTER_MILLIS. The rest goes. --dry-run shows why each generation is kept,
and when its files first went missing ("gone at").

Packs go in two steps, so that a mount reading a dropped generation keeps working: a prune
records the packs nothing needs, and a prune at least --grace seconds later deletes the
recorded ones that are still unneeded. Safe next to a running backup and mounts, and after a
kill at any point; two prunes never overlap."""


def add_commands(sub: "argparse._SubParsersAction[argparse.ArgumentParser]",
                 common: Callable[..., None], fmt: type[argparse.HelpFormatter],
                 epilog: str) -> None:
    p = sub.add_parser("check", help="verify the store; the exit code says if it is healthy",
                       description=CHECK_DESCRIPTION, epilog=CHECK_EXIT + "\n" + epilog,
                       formatter_class=fmt)
    common(p)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--read-data", action="store_true",
                      help="also authenticate every chunk of file data (reads the whole store)")
    mode.add_argument("--read-data-subset", metavar="N/M|P%",
                      help="like --read-data, for part of the packs: N/M checks the packs "
                      "whose id modulo M is N-1 (run 1/M .. M/M to cover all), P%% a random "
                      "P percent")
    p.add_argument("--no-wait", action="store_true",
                   help="fail at once (exit 4) instead of waiting while a prune runs")
    _json(p)
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("prune", help="remove what retention no longer needs",
                       description=PRUNE_DESCRIPTION, epilog=epilog, formatter_class=fmt)
    common(p)
    p.add_argument("--dry-run", action="store_true",
                   help="show what would be removed, and why each generation is kept")
    p.add_argument("--grace", type=float, metavar="SECONDS", default=3600.0,
                   help="delete unneeded packs only this long after a prune recorded them "
                   "(default 3600); 0 deletes them at once, which can break a running mount "
                   "of a dropped generation, but frees space on a full disk")
    p.add_argument("--set-aside-damaged", action="store_true",
                   help="move generation files that cannot be read to NAME/damaged/ (kept, "
                   "never read), so that the packs only they could need can go; without it no "
                   "pack is deleted while one is in generations/")
    _json(p)
    p.set_defaults(func=cmd_prune)


def _json(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="the summary as one JSON object on "
                   "stdout; the schema is in docs/JSON.md")


def cmd_check(args: argparse.Namespace) -> int:
    from humiofs.check import Checker, describe, parse_subset
    from humiofs.prune import prune_lock

    subset = None
    if args.read_data_subset is not None:
        try:
            subset = parse_subset(args.read_data_subset)
        except ValueError as exc:
            raise errors.ConfigError(f"--read-data-subset {args.read_data_subset}: {exc}") \
                from None
    cfg = load_config(args)
    store = open_store(cfg)
    start = time.monotonic()
    try:
        with prune_lock(store, wait=not args.no_wait, reading=True):
            checker = Checker(store, store.passphrase or cfg.need_key(), args.read_data, subset)
            report = checker.run()
    finally:
        store.close()
    state = LocalState.of(cfg.state_dir)
    names = checker.gen_names       # as listed by the check (none if generations/ is gone)
    rollback = state.observe(store, report.newest, names) if state else None
    if rollback:
        checker.rolled_back(rollback)
    took = time.monotonic() - start
    if args.json:
        summary.emit(
            "check", store=store.name, healthy=report.healthy,
            problems=[{"message": p.message, "paths": sorted(p.paths),
                       "generations": sorted(p.generations)} for p in report.problems.values()],
            warnings=report.warnings, notes=report.notes, generations=report.generations,
            trees=report.trees, blobs=report.blobs, packs=report.packs,
            read_data=report.read_data, packs_read=report.packs_read,
            bytes_read=report.bytes_read, seconds=round(took, 3),
            exit=errors.EXIT_OK if report.healthy else errors.EXIT_DAMAGED)
        return errors.EXIT_OK if report.healthy else errors.EXIT_DAMAGED
    for line in describe(report, names[-1] if names else None, all_paths=args.verbose > 0):
        print(line)
    for warning in report.warnings:
        print(f"warning: {warning}")
    for note in report.notes:
        print(f"note: {note}")
    read = (f"; read {human_bytes(report.bytes_read)} of data from {report.packs_read} packs"
            if report.read_data else "")
    what = (f"{report.generations} generations, {report.trees} folder listings, "
            f"{report.blobs} file blobs, {report.packs} packs{read}")
    if report.healthy:
        warned = f", {len(report.warnings)} warning(s)" if report.warnings else ""
        print(f"check {store.name}: healthy{warned} ({what}) in {took:.1f}s")
        return errors.EXIT_OK
    print(f"check {store.name}: DAMAGED, {len(report.problems)} problem(s) ({what}) in "
          f"{took:.1f}s; see `humiofs check --help` for what to do")
    return errors.EXIT_DAMAGED


def cmd_prune(args: argparse.Namespace) -> int:
    from humiofs.prune import prune

    cfg = load_config(args)
    store = open_store(cfg)
    if args.grace < 0:
        raise errors.ConfigError("--grace must not be negative")
    state = LocalState.of(cfg.state_dir)
    rollback = state.rollback_of(store, record=not args.dry_run) if state else None
    if rollback:
        store.close()
        raise errors.StoreError(f"{rollback}. Prune removes nothing while the store stands "
                                "rolled back: it would delete the packs only the missing "
                                "generations need. Put them back, or run a backup (its newer "
                                "generation ends the rollback), then prune")
    try:
        r = prune(store, cfg.delete_after_ms, grace_s=args.grace, dry_run=args.dry_run,
                  set_aside_damaged=args.set_aside_damaged)
    finally:
        store.close()
    if args.json:
        summary.emit(
            "prune", store=store.name, dry_run=args.dry_run,
            generations=[{"name": d.name, "time": format_time(generation_time(d.name)),
                          "keep": d.keep, "reason": d.reason} for d in r.decisions],
            kept=sum(1 for d in r.decisions if d.keep), dropped=r.dropped,
            deleted_packs=r.deleted_packs, deleted_bytes=r.deleted_bytes,
            condemned_packs=r.condemned_packs, condemned_bytes=r.condemned_bytes,
            pending_packs=r.pending_packs, young_packs=r.young_packs, damaged=r.damaged,
            exit=errors.EXIT_DAMAGED if r.damaged else errors.EXIT_OK)
        if r.damaged:
            raise errors.StoreError(_no_pack_deleted(r.damaged[0]))
        return errors.EXIT_OK
    would = "would " if args.dry_run else ""
    if args.dry_run or args.verbose:
        for d in r.decisions:
            what = f"keep: {d.reason}" if d.keep else "drop"
            if d.keep and d.compared and d.gone_ms is None:
                what += "; none of its files has gone missing"
            print(f"  {format_time(generation_time(d.name))}  {d.name}  {what}")
    kept = sum(1 for d in r.decisions if d.keep)
    parts = [f"prune {store.name}: {would}keep {kept} of {len(r.decisions)} generations"
             + (f" ({'would remove' if args.dry_run else 'removed'} {len(r.dropped)} by "
                f"retention: {', '.join(r.dropped)})"
                if r.dropped else "")]
    if r.deleted_packs:
        parts.append(f"{would}delete {r.deleted_packs} packs ({human_bytes(r.deleted_bytes)})")
    if r.condemned_packs:
        due = format_time(int((time.time() + args.grace) * 1000))
        parts.append(f"{would}record {r.condemned_packs} unneeded packs "
                     f"({human_bytes(r.condemned_bytes)}) for deletion by a prune after {due}")
    if r.pending_packs:
        parts.append(f"{r.pending_packs} packs recorded earlier wait for their grace period")
    if r.young_packs:
        parts.append(f"{r.young_packs} unneeded packs are newer than the latest generation "
                     "and a backup is running (they may be its own: a prune after it has "
                     "finished handles them)")
    if r.set_aside:
        parts.append(f"{would}set aside {len(r.set_aside)} unreadable generation(s) in "
                     f"{store.name}/damaged/: {', '.join(r.set_aside)}")
    print("; ".join(parts))
    if r.unreadable:
        raise errors.StoreError(
            f"no pack was deleted: {len(r.unreadable)} generation file(s) cannot be read "
            f"({r.damaged[0]}), and a generation that cannot be read may need any pack. "
            "`humiofs prune --set-aside-damaged` moves them to "
            f"{store_at(store.path, 'damaged')}/ (that state of the node is lost anyway) and then "
            "frees what the readable generations do not need")
    if r.damaged:
        raise errors.StoreError(_no_pack_deleted(r.damaged[0]))
    return errors.EXIT_OK


def _no_pack_deleted(why: str) -> str:
    if why.startswith("not deleting packs: "):
        return why[len("not deleting packs: "):].replace("Nothing was deleted",
                                                          "No pack was deleted")
    return f"the store is damaged, so no pack was deleted: {why}; run `humiofs check`"
