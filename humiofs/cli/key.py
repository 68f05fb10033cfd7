"""The `key` subcommand: key management (key change)."""
from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from humiofs import config as configmod
from humiofs import errors
from humiofs.cli.common import load_config, open_store
from humiofs.store import keys


def add_commands(sub: "argparse._SubParsersAction[argparse.ArgumentParser]",
                 common: Callable[..., None], fmt: type[argparse.HelpFormatter],
                 epilog: str) -> None:
    p = sub.add_parser("key", help="key management", description="Key management.")
    ksub = p.add_subparsers(dest="key_command", metavar="ACTION")
    ksub.required = True
    kp = ksub.add_parser("change", help="re-wrap the store key under a new BACKUP_KEY",
                         description="Wrap the store's master key under a new key read from "
                         "--new-key-file. No data is re-encrypted; the old key stops working.",
                         epilog=epilog, formatter_class=fmt)
    common(kp)
    kp.add_argument("--new-key-file", type=Path, required=True, metavar="FILE",
                    help="file whose first line is the new key")
    kp.set_defaults(func=cmd_key_change)


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
