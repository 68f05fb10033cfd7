"""A backup run's counts and warnings, and what it keeps of the parent generation when an
entry is skipped or vanishes, or its previous copy is in a pack the store lost."""
from __future__ import annotations

import logging

from humiofs.backup.options import BackupStats, RelPath
from humiofs.errors import NoSuchObject, StoreError, show
from humiofs.store import crypto, format
from humiofs.store.format import DIR, FILE, SYMLINK, Entry, Ref
from humiofs.store.repository import Store, list_packs

log = logging.getLogger(__name__)


class Ledger:
    """Counts into `stats` and warns about entries that could not be stored as usual; reads
    the parent generation's trees from `store` and notes which of its packs are gone."""

    def __init__(self, store: Store, stats: BackupStats) -> None:
        self.store = store
        self.stats = stats
        # The packs in the store (id -> size), listed when a ref is first reused: a ref into a
        # pack that is gone (or too short for it) is never carried into the new generation.
        self._present: dict[bytes, int] | None = None
        self._reread_dirs: list[bytes] = []     # folders whose stored listing was unreadable

    def previous_tree(self, ref: Ref | None, rel: bytes) -> tuple[bytes | None, dict[bytes, Entry]]:
        if ref is None:
            return None, {}
        try:
            plain = self.store.read_blob(ref, crypto.KIND_TREE)
            return plain, {e.name: e for e in format.decode_tree(plain)}
        except StoreError as exc:
            # Its files are counted as read again (not as new) as they come: see walk.Walker._file_entry.
            self._reread_dirs.append(rel)
            if isinstance(exc, NoSuchObject):
                self.stats.lost_packs.add(ref.pack)
            self.warn(f"previous backup of {_show(rel)}/ is unreadable ({exc}); reading it anew "
                       "(the backup needs about its size of free space on the backup disk)")
            return None, {}

    def rereading(self, rel: bytes) -> bool:
        """True if `rel` is below a folder whose stored listing could not be read."""
        return any(not d or rel.startswith(d + b"/") for d in self._reread_dirs)

    def stored(self, ref: Ref) -> bool:
        """True if the pack of `ref` is in the store and long enough to hold the blob."""
        if self._present is None:
            self._present = {pid: item.size for pid, item in list_packs(self.store).items()}
        size = self._present.get(ref.pack)
        return size is not None and ref.offset + ref.stored_len <= size

    def lost(self, rel: bytes, old: Entry | None) -> Entry | None:
        """`old`, unless its data is in a pack the store lost: then None, with a warning that
        the file is read again from the source (which stores it anew, healing the store)."""
        if old is None or old.type != FILE or old.data is None or self.stored(old.data):
            return old
        self.stats.healed += 1
        self.stats.lost_packs.add(old.data.pack)
        self.stats.healed_paths.append(rel)
        return None

    def gone(self, rel: bytes, gone: Entry) -> None:
        """Notes the files of `gone`, deleted from the node since the parent generation (a
        folder: everything below it), whose only stored copy is in a pack the store lost."""
        if gone.type == FILE and gone.data is not None and not self.stored(gone.data):
            self.stats.lost_deleted.append(rel)
            self.stats.lost_packs.add(gone.data.pack)
        elif gone.type == DIR and gone.subtree is not None:
            try:
                entries = self.store.read_tree(gone.subtree)
            except StoreError:
                return          # check reports a folder listing that cannot be read
            for e in entries:
                self.gone(rel + b"/" + e.name, e)

    def report_lost(self) -> None:
        """One warning for the files read again after a lost pack, one for deleted files
        whose only copy was in one (a warning per file would bury everything else)."""
        s = self.stats
        packs = ", ".join(sorted(p.hex() for p in s.lost_packs)[:3]) + (
            ", ..." if len(s.lost_packs) > 3 else "")
        if s.healed_paths:
            self.warn(f"{len(s.healed_paths)} file(s) read again from the node: their stored "
                       f"copy is in a pack missing from the store or cut short ({packs}): "
                       + _some(s.healed_paths))
        if s.lost_deleted:
            self.warn(f"the store lost the only copy of {len(s.lost_deleted)} file(s) deleted "
                       f"from the node since the last backup ({packs}): the earlier generations "
                       "that hold them cannot restore them (humiofs check names them): "
                       + _some(s.lost_deleted))


    def count_file(self, entry: Entry) -> None:
        self.stats.files += 1
        self.stats.bytes += entry.size
        self.stats.data_bytes += entry.data_bytes

    def keep_old(self, old: Entry | None) -> Entry | None:
        if old is None:
            return None
        if old.type == DIR:
            self.stats.dirs += 1
        elif old.type == SYMLINK:
            self.stats.symlinks += 1
        elif old.type != FILE:
            self.stats.specials += 1
        return old

    def skip(self, rel: bytes, why: str, old: Entry | None, counted: bool = True
              ) -> Entry | None:
        """Counts and reports an entry that could not be read; returns what the previous
        generation had for it (kept as it was), or None. A kept file is counted into the
        stats here unless `counted` is False (the caller counts it)."""
        self.stats.skipped += 1
        self.stats.skipped_paths.append(rel)
        if old is not None and old.type == FILE and old.data is not None \
                and not self.stored(old.data):
            self.stats.lost_packs.add(old.data.pack)
            self.warn(f"{_show(rel)}: {why}; its previous copy is in pack "
                       f"{old.data.pack.hex()}, which is missing from the store: not in this "
                       "generation")
            return None
        if old is None:
            self.warn(f"{_show(rel)}: {why}; not in this generation")
            return None
        self.warn(f"{_show(rel)}: {why}; keeping the copy from the previous generation")
        kept = self.keep_old(old)
        if kept is not None and kept.type == FILE and counted:
            self.count_file(kept)
        return kept

    def vanished(self, rel: bytes) -> Entry | None:
        """An entry deleted or renamed on the node between the listing of its folder and its
        read: not in this generation, with a warning (under its new name, if it was renamed,
        it may be missing from this generation too: the next run stores it)."""
        self.stats.vanished += 1
        self.stats.skipped_paths.append(rel)
        self.warn(f"{_show(rel)}: vanished while the backup read it (deleted or renamed on "
                   "the node); not in this generation. The next run stores it if it is still "
                   "there")
        return None

    def warn(self, message: str) -> None:
        self.stats.warnings.append(message)
        log.warning("%s", message)


def _some(paths: list[RelPath], shown: int = 5) -> str:
    """The first few of `paths`, for a one-line message."""
    out = ", ".join(_show(p) for p in paths[:shown])
    return out + (f" and {len(paths) - shown} more" if len(paths) > shown else "")



_show = show
