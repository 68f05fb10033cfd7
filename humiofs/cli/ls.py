"""The `ls` subcommand: the stores in BACKUP_DIR and their generations."""
from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from typing import Any

from humiofs import errors
from humiofs.cli import summary
from humiofs.cli.common import add_json, human, load_config
from humiofs.config import Config
from humiofs.errors import StoreError
from humiofs.progress import human_bytes
from humiofs.store import generations
from humiofs.store.backend.factory import is_remote, store_at
from humiofs.store.format import generation_time
from humiofs.store.localstate import LocalState
from humiofs.store.repository import (
    Store,
    backend_of,
    generation_names,
    list_stores,
    looks_like_store,
)

log = logging.getLogger(__name__)


def add_commands(sub: "argparse._SubParsersAction[argparse.ArgumentParser]",
                 common: Callable[..., None], fmt: type[argparse.HelpFormatter],
                 epilog: str) -> None:
    p = sub.add_parser("ls", help="list the backups in BACKUP_DIR and their generations",
                       description="List the stores in BACKUP_DIR (or only --name) with their "
                       "generations. Without a key only names and times are shown.",
                       epilog=epilog, formatter_class=fmt)
    common(p)
    add_json(p)
    p.set_defaults(func=cmd_ls)


def cmd_ls(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    if cfg.backup_name and is_remote(cfg.backup_dir):
        list_stores(cfg.backup_dir)     # a missing bucket, said as such
    names = [cfg.backup_name] if cfg.backup_name else list_stores(cfg.backup_dir)
    if not names:
        human(args, f"no backups in {cfg.backup_dir}")
        return errors.EXIT_OK
    if cfg.backup_name:
        _ls_store(args, cfg, names[0])      # the store the settings name: its error is the run's
        return errors.EXIT_OK
    # Every store of BACKUP_DIR is listed, whatever is wrong with one: its error is its line,
    # and the run exits with the highest exit code among them.
    failed: list[tuple[str, errors.HumiofsError]] = []
    for name in names:
        try:
            _ls_store(args, cfg, name)
        except errors.HumiofsError as exc:
            failed.append((name, exc))
            if args.json:
                summary.emit("ls", store=name, opened=False, error=str(exc), generations=[])
            else:
                print(f"{name}: cannot be listed: {exc}", flush=True)
    if not failed:
        return errors.EXIT_OK
    worst = max(failed, key=lambda f: f[1].exit_code)
    if len(failed) == 1:
        print(f"humiofs: error: {worst[1]}", file=sys.stderr)
    else:
        print(f"humiofs: error: {len(failed)} of {len(names)} stores could not be listed "
              f"({', '.join(name for name, _ in failed)}); the first: {failed[0][1]}",
              file=sys.stderr)
    return worst[1].exit_code


def _ls_store(args: argparse.Namespace, cfg: Config, name: str) -> None:
    """Lists the store `name` of BACKUP_DIR; HumiofsError if it cannot be."""
    path = store_at(cfg.backup_dir, name)
    if not looks_like_store(backend_of(path)):
        raise errors.NoSuchStore(f"no humiofs store at {path}")
    store: Store | None = None
    if cfg.backup_key:
        try:
            store = Store.open(path, cfg.passphrase())
        except errors.WrongKey:
            # The store the settings name must open, as for every other command; when
            # listing all of BACKUP_DIR, the others may belong to nodes with other keys.
            if cfg.backup_name:
                raise
            why = "the key does not open this backup"
            if args.json:
                summary.emit("ls", store=name, opened=False, error=why, generations=[])
            else:
                print(f"{name}: {why}")
            return
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
        return
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
