"""What a backup run is asked to do (BackupOptions) and what it did (BackupStats, TreeCounts)."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from humiofs.backup import scan
from humiofs.store.format import Ref

# BackupStats).
RelPath = bytes
PackId = bytes


@dataclass
class BackupStats:
    """What a run did; the one-line summary and the generation's stats come from here."""

    new: int = 0
    changed: int = 0
    unchanged: int = 0
    skipped: int = 0
    dirs: int = 0
    symlinks: int = 0
    specials: int = 0
    files: int = 0
    bytes: int = 0
    data_bytes: int = 0
    bytes_read: int = 0
    bytes_stored: int = 0
    trees_stored: int = 0
    live: int = 0           # files being written: read twice, stored as they were when opened
    healed: int = 0         # unchanged files and folders read again: their stored copy was lost
    vanished: int = 0       # entries deleted or renamed on the node while the run read them
    lost_packs: set[PackId] = field(default_factory=set)   # the missing packs they were in
    healed_paths: list[RelPath] = field(default_factory=list)   # the files of `healed`
    # Files of the parent generation, deleted from the node since, whose only stored copy is
    # in a pack the store lost: earlier generations cannot restore them.
    lost_deleted: list[RelPath] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    skipped_paths: list[RelPath] = field(default_factory=list)

    def generation_stats(self) -> dict[str, int]:
        return {"files": self.files, "dirs": self.dirs, "symlinks": self.symlinks,
                "specials": self.specials, "bytes": self.bytes, "data_bytes": self.data_bytes}


# Counts of what a tree holds, all levels below it: files, dirs, symlinks, specials, bytes,
# data bytes. A tree's encoding is deterministic, so a tree ref always has the same counts.
TreeCounts = tuple[int, int, int, int, int, int]


@dataclass
class BackupOptions:
    source: Path
    backup_name: str
    excludes: tuple[str, ...] = scan.DEFAULT_EXCLUDES
    host_id: str | None = None
    progress: bool | None = None
    # Continuous backup (watch.py): `clean(rel)` promises that the directory `rel` (relative to
    # the source, b"" for the source itself) and everything below it are unchanged since the
    # parent generation. Such a directory keeps its previous tree without being listed, if its
    # inode and mtime still match and `tree_counts` knows the counts of that tree.
    clean: Callable[[bytes], bool] | None = None
    tree_counts: dict[Ref, TreeCounts] | None = None
    # Checkpoints (FORMAT.md 7.4): with `checkpoints`, one is committed every
    # `checkpoint_s` seconds or `checkpoint_bytes` stored (0: not on that trigger), and on
    # SIGTERM/SIGINT, after which the run stops (Interrupted).
    checkpoints: bool = False
    checkpoint_s: int = 0
    checkpoint_bytes: int = 0
    # With checkpoints: when `should_stop` turns true, commit a checkpoint and stop
    # (Interrupted) instead of finishing with the previous generation's entries.
    checkpoint_on_stop: bool = False
