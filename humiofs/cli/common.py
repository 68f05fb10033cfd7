"""What the subcommands share: the settings flags and --json, the settings and the store they
name, a summary line for people, and the epilog with the exit codes."""
from __future__ import annotations

import argparse
from pathlib import Path

from humiofs import config as configmod
from humiofs.config import Config
from humiofs.store.backend.factory import is_remote
from humiofs.store.repository import Store

EPILOG = """\
settings come from --config (a KEY=VALUE env file as for docker --env-file), then the
environment, then flags (highest). The key is never taken from the command line: set
BACKUP_KEY in the env file or environment, or use --key-file.
exit codes: 0 ok, 1 internal error, 2 bad usage or settings, 3 wrong key, 4 store locked by
another writer, 5 store damaged, 6 restore target or mountpoint unusable, 7 backup disk full or
not writable, 8 finished with warnings (files skipped or read again), 130 interrupted."""


def add_settings(p: argparse.ArgumentParser, need_name: bool = True) -> None:
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


def add_json(p: argparse.ArgumentParser, watch: bool = False) -> None:
    p.add_argument("--json", action="store_true", help="the summary as one JSON object on "
                   "stdout" + (" (one per pass with --watch)" if watch else "")
                   + "; the schema is in docs/JSON.md")


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


def human(args: argparse.Namespace, line: str) -> None:
    """A summary line for people: not with --json, which prints the object instead."""
    if not getattr(args, "json", False):
        print(line)
