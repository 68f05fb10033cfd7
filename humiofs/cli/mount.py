"""The `mount` and `umount` subcommands (wired in by cli.build_parser)."""
from __future__ import annotations

import argparse
import logging
import os
import shlex
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from humiofs.mount.sources import PackCache
    from humiofs.store.keys import Passphrase
    from humiofs.store.repository import Store

MOUNT_HELP = """\
Mount the backups in BACKUP_DIR read-only at MOUNTPOINT (an empty folder), decrypted:

  MOUNTPOINT/NAME/                  store NAME at its latest generation (or the one --at TIME),
                                    byte for byte, holes, symlinks, modes and times included
  MOUNTPOINT/NAME/globaldata/cluster_membership-NODEID-UUID.uuid
                                    the node's seed file: cp it to restore the node's identity
                                    (in the node's own globaldata/ if it has one)
  MOUNTPOINT/.generations/NAME/TIME/    every generation, TIME its commit time in UTC like
                                    20261124T100000.123Z; no ':' in it, so rsync and scp
                                    copy it as named

Only BACKUP_DIR and the key are needed. The root lists every store in BACKUP_DIR that the key
opens (stores it does not open are left out with a warning); --name limits it to one.
BACKUP_NAME in the env file does not limit the mount. NAME/ follows new backups within about a
second, and stores created after the mount started appear in it (it starts on an empty or
missing BACKUP_DIR). An unchanged file keeps its inode number across remounts and backups, so
restic and borg pointed at MOUNTPOINT/NAME read only what changed. By default the mount serves in the background and the command returns once it is
mounted; unmount with `humiofs umount MOUNTPOINT`.

Copies that keep holes (sparse files stay sparse): rsync -aS, tar -S, cp --sparse=always, and
plain cp / cp -a (coreutils 9.1). Restoring missing segments, without the seed file (which
would claim a lost node's identity) or a globaldata/ folder the node does not have:

  rsync -aS --ignore-existing --prune-empty-dirs \\
        --exclude='/globaldata/cluster_membership-*.uuid' MOUNTPOINT/NAME/ /data/humio-data/

or, without a mount: humiofs restore --missing-only --to /data/humio-data"""

UMOUNT_HELP = """\
Unmount a humiofs mount (as fusermount3 -u does); the mount process then exits. Fails while
files on it are open, unless --lazy."""


def add_commands(sub: "argparse._SubParsersAction[argparse.ArgumentParser]",
                 common: Callable[..., None], fmt: type[argparse.HelpFormatter],
                 epilog: str) -> None:
    p = sub.add_parser("mount", help="mount the backups read-only (restore with cp or rsync)",
                       description=MOUNT_HELP, epilog=epilog, formatter_class=fmt)
    common(p, need_name=False)
    p.add_argument("mountpoint", type=Path, metavar="MOUNTPOINT", help="an empty folder")
    p.add_argument("--name", metavar="NAME", help="show only the store NAME")
    p.add_argument("--at", metavar="TIME", help="NAME/ shows the latest generation at or before "
                   "TIME: a time as ls prints it, a folder name under .generations, ISO 8601 "
                   "such as 2026-11-24T10:00 (local time without a zone; it covers the whole "
                   "minute), @UNIXSECONDS, or a generation name")
    p.add_argument("--foreground", "-f", action="store_true",
                   help="serve in this process until unmounted, Ctrl-C or SIGTERM")
    p.add_argument("--allow-other", action="store_true",
                   help="let other users than the one mounting see the files (their modes "
                   "still apply); needs user_allow_other in /etc/fuse.conf unless root")
    p.add_argument("--log", type=Path, metavar="FILE",
                   help="append the mount's log to FILE (in the background it otherwise goes "
                   "to syslog, if there is one)")
    p.add_argument("--debug", action="store_true",
                   help="debug logging, including every request that fails")
    # Set by the mount(8) helper form (helper_argv): the fstab source, as the mount's source.
    p.add_argument("--source", default="humiofs", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_mount)

    p = sub.add_parser("umount", help="unmount a humiofs mount", description=UMOUNT_HELP,
                       epilog=UMOUNT_EPILOG, formatter_class=fmt)
    p.add_argument("mountpoint", type=Path, metavar="MOUNTPOINT")
    p.add_argument("--lazy", "-z", action="store_true",
                   help="detach now even if files are open; the mount ends when they close")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    p.add_argument("-q", "--quiet", action="store_true", help="only errors")
    p.set_defaults(func=cmd_umount)


UMOUNT_EPILOG = """\
exit codes: 0 unmounted, 2 bad usage, 6 not mounted, busy (see --lazy) or no fusermount3."""


class _Opening(threading.Thread):
    """sources.open_sources in a thread: the stores' Argon2id unwraps (most of the time to
    mount) run while the mount's modules (pyfuse3, trio, the model) are imported; the unwrap
    runs in OpenSSL without the GIL. result() gives its stores or raises what it raised."""

    def __init__(self, backup_dir: Path | str, key: Passphrase, name: str | None,
                 allow_none: bool, cache: PackCache | None) -> None:
        super().__init__(name="open-stores", daemon=True)
        self._args = (backup_dir, key, name, allow_none, cache)
        self._stores: list[Store] = []
        self._error: BaseException | None = None
        self.start()

    def run(self) -> None:
        from humiofs.mount.sources import open_sources

        try:
            self._stores = open_sources(*self._args)
        except BaseException as exc:  # handed to the caller as it is
            self._error = exc

    def result(self) -> list[Store]:
        self.join()
        if self._error is not None:
            raise self._error
        return self._stores


def cmd_mount(args: argparse.Namespace) -> int:
    from humiofs import errors
    from humiofs.cli.common import load_config
    from humiofs.mount import mount
    from humiofs.store import generations
    from humiofs.store import repository as store
    from humiofs.store.backend.factory import is_remote, store_at
    from humiofs.store.localstate import LocalState

    if args.debug:
        logging.getLogger().setLevel(logging.DEBUG)
    cfg = load_config(args)
    key = cfg.passphrase()
    at = generations.parse_at(args.at) if args.at else None
    mountpoint = mount.check_mountpoint(args.mountpoint)
    log_handler = mount.open_log(args.log)
    from humiofs.mount.sources import PackCache
    cache = None
    if is_remote(cfg.backup_dir) and cfg.cache_dir is not None and cfg.cache_bytes > 0:
        cache = PackCache(cfg.cache_dir, cfg.cache_bytes)
        if not cache.check():
            cache = None
    # Only --name limits the mount: BACKUP_NAME in a node's env file names the store that
    # node writes, while an operator mounting wants to see every backup the key opens.
    opening = _Opening(cfg.backup_dir, key, args.name, args.name is None and at is None, cache)
    try:
        from humiofs.mount import fs, tree  # noqa: F401  (pyfuse3 and trio, while the keys unwrap)
    finally:
        opening.join()
    stores = opening.result()
    model = tree.Tree.from_backup_dir(cfg.backup_dir, key, args.name, at,
                                      state=LocalState.of(cfg.state_dir), stores=stores,
                                      cache=cache)
    if at is not None and at.name is not None:
        # A generation asked for by name is that one or an error (FORMAT.md 7.2), as restore
        # --at has it: never an older one in its place.
        for name, gen in model.shown():
            if gen is None or gen.name != at.name:
                names = store.generation_names(store_at(cfg.backup_dir, name))
                if at.name in names:
                    model.close()
                    raise errors.IntegrityError(
                        f"generation {at.name} of backup {name} cannot be read (damaged; run "
                        "humiofs check), so it is not mounted; --at an earlier generation or "
                        "time mounts that one")
    if at is not None:
        for name, gen in model.shown():
            if gen is not None:
                print(f"humiofs: {name}/ shows generation {generations.describe(gen)} "
                      f"(--at {at.text})", flush=True)
    again = _foreground_argv(args, mountpoint) if is_remote(cfg.backup_dir) else None
    return mount.run(model, mountpoint, foreground=args.foreground,
                     allow_other=args.allow_other, log_handler=log_handler,
                     source=args.source or "humiofs", again=again)


def _foreground_argv(args: argparse.Namespace, mountpoint: Path) -> list[str]:
    """This mount's command line in the foreground (mount.respawn): the same settings, the
    key read again from where it was (never put on the command line)."""
    argv = ["mount", "--foreground", "--quiet"]
    for flag, value in (("--config", args.config), ("--key-file", args.key_file),
                        ("--backup-dir", args.backup_dir), ("--name", args.name),
                        ("--at", args.at), ("--log", args.log), ("--source", args.source)):
        if value is not None:
            argv += [flag, os.path.abspath(value) if isinstance(value, Path) else str(value)]
    argv += ["--allow-other"] if args.allow_other else []
    argv += ["--debug"] if args.debug else []
    return argv + ["--", os.path.abspath(mountpoint)]


def cmd_umount(args: argparse.Namespace) -> int:
    from humiofs.mount import mount

    mount.unmount(args.mountpoint, lazy=args.lazy)
    return 0


# Mount options mount(8) and mount.fuse3 pass on that say nothing to humiofs: the mount is
# read-only, nodev and nosuid whatever they say, and the rest are fstab's own business.
_IGNORED_OPTIONS = {"ro", "dev", "nodev", "suid", "nosuid", "exec", "noexec", "atime",
                    "noatime", "relatime", "strictatime", "nodiratime", "diratime", "async",
                    "sync", "defaults", "auto", "noauto", "user", "nouser", "users", "nofail",
                    "_netdev", "default_permissions"}


def helper_argv(argv: list[str]) -> list[str]:
    """The `humiofs mount` command line for mount(8)'s helper form, which mount.fuse3 uses for
    an fstab line `CONFIG MOUNTPOINT fuse.humiofs OPTIONS` (or `PATH/humiofs#CONFIG ... fuse`):
    `humiofs CONFIG MOUNTPOINT [-o OPTIONS]`. Options humiofs takes: allow_other, name=NAME,
    at=TIME, log=FILE; mount's generic ones (ro, noauto, nofail, x-*, ...) are ignored; rw and
    anything else is a ConfigError. The mount goes to the background as mount(8) expects."""
    from humiofs.errors import ConfigError

    if len(argv) not in (2, 4) or (len(argv) == 4 and argv[2] != "-o"):
        raise ConfigError("as a mount helper humiofs takes CONFIG MOUNTPOINT [-o OPTIONS] "
                          "(see humiofs mount --help)")
    out = ["mount", "--config", argv[0], "--quiet", "--source", _fstab_source(argv[0])]
    for opt in (argv[3].split(",") if len(argv) == 4 else []):
        name, _, value = opt.partition("=")
        if not opt or opt in _IGNORED_OPTIONS or name.startswith("x-") or name == "comment":
            continue
        if opt == "rw":
            raise ConfigError("a humiofs mount is read-only: use ro, not rw, in its fstab line")
        if opt == "allow_other":
            out.append("--allow-other")
        elif name in ("name", "at", "log") and value:
            out += [f"--{name}", value]
        else:
            raise ConfigError(f"unknown mount option {opt!r} (humiofs takes allow_other, "
                              "name=NAME, at=TIME and log=FILE)")
    return out + ["--", argv[1]]


def _fstab_source(config: str) -> str:
    """The source as the fstab line has it, for the mount table: libmount compares the two to
    tell whether a line is mounted already (a second `mount -a` then leaves it alone).

    For type fuse.humiofs that is CONFIG. For the `PROG#CONFIG ... fuse` form mount.fuse3
    passes only CONFIG; it runs `/bin/sh -c "'PROG' 'CONFIG' 'MOUNTPOINT' -o ..."`, so PROG
    is read from that shell's command line when it names a path (a bare `humiofs#CONFIG`
    cannot be told from type fuse.humiofs: CONFIG then)."""
    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
            args = [os.fsdecode(a) for a in f.read().split(b"\0")]
        if len(args) < 3 or os.path.basename(args[0]) not in ("sh", "dash", "bash") \
                or args[1] != "-c":
            return config
        words = shlex.split(args[2])
    except (OSError, ValueError):
        return config
    if len(words) >= 3 and "/" in words[0] and words[1] == config:
        return f"{words[0]}#{config}"
    return config
