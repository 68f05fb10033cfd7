"""Verifying a store (`humiofs check`): its layout, key files, generations, trees and packs,
and with `read_data` every chunk of the file data. Each problem is reported with the node
files and the generations it affects (docs/FORMAT.md section 10.4).
"""
from __future__ import annotations

import logging
import os
import random
import re
from collections.abc import Callable

from humiofs.check_layout import Key, Problem, Report, StoreFiles
from humiofs.errors import IntegrityError, StoreError, refused
from humiofs.progress import human_bytes
from humiofs.store import crypto, format, journal
from humiofs.store.format import DIR, FILE, Generation, Ref
from humiofs.store.generations import NO_GENERATION_OPENS, complete_name, format_time, load_listed
from humiofs.store.repository import Store
from humiofs.store.storemeta import pack_name

__all__ = ["Checker", "Problem", "Report", "describe", "parse_subset"]

log = logging.getLogger(__name__)

_READ_BATCH = 64


def parse_subset(text: str) -> Callable[[bytes], bool]:
    """The packs `--read-data-subset` selects: `N/M` (pack id mod M = N-1) or `P%` (random)."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if m:
        n, mod = int(m.group(1)), int(m.group(2))
        if not 1 <= n <= mod:
            raise ValueError("N/M needs 1 <= N <= M")
        return lambda pid: int.from_bytes(pid, "big") % mod == n - 1
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*%\s*", text)
    if m:
        pct = float(m.group(1))
        if not 0 < pct <= 100:
            raise ValueError("P% needs 0 < P <= 100")
        rng = random.Random(os.urandom(16))
        chosen: dict[bytes, bool] = {}
        return lambda pid: chosen.setdefault(pid, rng.random() * 100 < pct)
    raise ValueError("use N/M (such as 1/5) or P% (such as 10%)")


class Checker(StoreFiles):
    """One check of an opened store. `subset` limits `read_data` to some packs."""

    def __init__(self, store: Store, passphrase: str, read_data: bool = False,
                 subset: Callable[[bytes], bool] | None = None) -> None:
        self.store = store
        self.passphrase = passphrase
        self.read_data = read_data or subset is not None
        self.subset = subset
        self.report = Report(read_data=self.read_data)
        self.gen_names: list[str] = []
        self.key_names: list[str] = []
        self.pack_sizes: dict[bytes, int] = {}
        self._pack_ok: dict[bytes, Key | None] = {}     # exists and header, or the problem
        self._probed: set[bytes] = set()               # packs whose probe chunk authenticated
        self._reach: dict[bytes, int] = {}             # furthest end of a ref into each pack
        # Blobs checked: the sound ones as offsets per pack (a ref object per file of the
        # node would be most of check's memory on a node of a million files), the others
        # with their problem.
        self._sound: dict[bytes, set[int]] = {}
        self._refs: dict[Ref, Key] = {}
        self._trees: dict[Ref, list[tuple[bytes, bool, Key]]] = {}
        self._to_read: set[Ref] = set()
        self._bad_data: set[Ref] = set()
        # Problems hit by folder listings, and by file data: the advice differs.
        self._tree_keys: set[Key] = set()
        self._data_keys: set[Key] = set()
        self._none_opens = False     # generation files, and none authenticates

    # -- problems -------------------------------------------------------------------------

    def rolled_back(self, message: str) -> None:
        """Reports that generations this host committed or saw are gone (localstate)."""
        self._problem(("rollback", ""), message)
        # Prune removes nothing while the store stands rolled back (maint_cli.cmd_prune).
        self.report.notes = [re.sub(r"\(prune removes them[^()]*\)",
                                    "(prune cannot remove them yet: it deletes nothing while "
                                    "the store stands rolled back)", n)
                             for n in self.report.notes]

    # -- the run --------------------------------------------------------------------------

    def run(self) -> Report:
        self._layout()
        self._keys()
        gens = self._generations()
        self._walk(gens)
        self.report.trees = len(self._trees)
        if self.read_data and self._to_read:
            self._read_data()
            if self._bad_data:            # a second walk finds the files of the bad blobs
                self._trees.clear()
                self._walk(gens)
        self._truncation_messages()
        self._pack_advice()
        self._unreferenced()
        return self.report

    def _generations(self) -> list[Generation]:
        gens = []
        failed: dict[str, StoreError] = {}
        gone = set()
        for name in self.gen_names:
            try:
                gen = load_listed(self.store, name)
                if gen is None:         # superseded or pruned since the listing: not damage
                    gone.add(name)
                    continue
                gens.append(gen)
            except StoreError as exc:
                failed[name] = exc
        if failed and not gens:
            # Another store's key files, or every generation damaged: setting them aside would
            # let prune delete every pack, so that is not the advice (backup says the same).
            first, why = next(iter(failed.items()))
            key = self._problem(("generation", ""), f"no generation of the store can be read "
                                f"(generation {first}: {why}). {NO_GENERATION_OPENS}")
            self.report.problems[key].generations.update(failed)
            self._none_opens = True
            failed = {}
        for name, why in failed.items():
            key = self._problem(("generation", name), f"generation {name} "
                                f"({format_time(format.generation_time(name))}) cannot be "
                                f"read ({why}); that state of the node is lost, other "
                                "generations do not depend on it. Prune deletes no pack "
                                "while it is in generations/: `humiofs prune "
                                "--set-aside-damaged` moves it to damaged/")
            self.report.problems[key].generations.add(name)
        self.gen_names = [n for n in self.gen_names if n not in gone]
        self._missing_bases(gens)
        self.report.generations = len(gens)
        # Rollback detection compares complete generations (FORMAT.md 9.1): a checkpoint
        # stands for its base.
        self.report.newest = max((n for g in gens if (n := complete_name(g)) is not None),
                                 default=None)
        return gens

    def _missing_bases(self, gens: list[Generation]) -> None:
        """A checkpoint whose base generation is gone, with no complete generation after it:
        the last complete restore point of the backup is lost (FORMAT.md 7.4)."""
        names = set(self.gen_names)
        newest_complete = max((g.name for g in gens if not g.checkpoint), default="")
        for g in gens:
            if g.checkpoint and g.base is not None and g.base not in names \
                    and g.name > newest_complete:
                key = self._problem(
                    ("base", g.base), f"generation {g.base} "
                    f"({format_time(format.generation_time(g.base))}) is missing from the "
                    "store, and checkpoints based on it remain: it was the last complete "
                    "restore point of this backup. Restore offers only what the checkpoints "
                    "hold (`humiofs restore --at <checkpoint name>`); the next backup makes a "
                    "complete generation again")
                self.report.problems[key].generations.add(g.name)

    # -- trees and refs -------------------------------------------------------------------

    def _walk(self, gens: list[Generation]) -> None:
        for gen in gens:
            for rel, folder, key in self._tree(gen.root.tree):
                p = self.report.problems[key]
                shown = os.fsdecode(rel) if rel else "."
                p.paths.add(shown + "/ (the whole folder)" if folder else shown)
                p.generations.add(gen.name)

    def _tree(self, ref: Ref) -> list[tuple[bytes, bool, Key]]:
        """Problems below the tree at `ref`: (path relative to it, whole folder, problem)."""
        known = self._trees.get(ref)
        if known is not None:
            return known
        out: list[tuple[bytes, bool, Key]] = []
        key = self._ref(ref, crypto.KIND_TREE)
        entries: list[format.Entry] = []
        if key is None:
            try:
                entries = self.store.read_tree(ref)
            except StoreError as exc:
                key = self._auth_problem(ref.pack, exc)
        if key is not None:
            self._tree_keys.add(key)
            out.append((b"", True, key))
        for e in entries:
            if e.type == FILE and e.data is not None:
                k = self._ref(e.data, crypto.KIND_DATA)
                if k is None and e.data in self._bad_data:
                    k = self._auth_problem(e.data.pack, None)
                if k is not None:
                    self._data_keys.add(k)
                    out.append((e.name, False, k))
            elif e.type == DIR and e.subtree is not None:
                out.extend((e.name + b"/" + rel if rel else e.name, folder, k)
                           for rel, folder, k in self._tree(e.subtree))
        self._trees[ref] = out
        return out

    def _pack(self, pid: bytes) -> Key | None:
        if pid in self._pack_ok:
            return self._pack_ok[pid]
        h = pid.hex()
        key: Key | None = None
        if pid not in self.pack_sizes:
            key = self._problem(("missing", h), f"pack {h} is missing")
        else:
            try:
                head = self.store.backend.read(pack_name(pid), format.HEADER_LEN)
                format.check_header(head, format.TYPE_PACK, format.PACK_VERSION, f"pack {h}")
            except FileNotFoundError:
                key = self._problem(("missing", h), f"pack {h} is missing")
            except (OSError, IntegrityError) as exc:
                # No permission is this user's to fix, not damage (README, exit 7).
                where = self.store.at(pack_name(pid))
                if isinstance(exc, OSError) and (err := refused(exc, where)):
                    raise err from None
                key = self._problem(("header", h), f"pack {h} is not a readable humiofs pack "
                                    f"({exc})")
        self._pack_ok[pid] = key
        self.report.packs += 1
        return key

    def _ref(self, ref: Ref, kind: int) -> Key | None:
        """The structural problem of one blob: pack missing or damaged, blob out of bounds,
        or (one chunk per pack, or every blob of a pack that failed once) authentication."""
        sound = self._sound.get(ref.pack)
        if sound is not None and ref.offset in sound:
            return None
        if ref in self._refs:
            return self._refs[ref]
        key = self._pack(ref.pack)
        h = ref.pack.hex()
        if key is None:
            end = ref.offset + ref.stored_len
            self._reach[ref.pack] = max(self._reach.get(ref.pack, 0), end)
            if ref.stored_len != crypto.stored_len(ref.plain_len):
                key = self._problem(("ref", h), f"a reference into pack {h} is inconsistent")
            elif end > self.pack_sizes[ref.pack]:
                key = self._problem(("truncated", h), f"pack {h} is truncated")
            elif ref.pack not in self._probed:
                # One chunk per pack catches a pack replaced or swapped by another file,
                # without reading the data; a pack that fails is probed blob by blob.
                last = crypto.chunk_count(ref.plain_len) - 1
                try:
                    self.store.read_chunks(ref, kind, last, last)
                    self._probed.add(ref.pack)
                except StoreError as exc:
                    key = self._auth_problem(ref.pack, exc)
        if key is None and kind == crypto.KIND_DATA:
            self.report.blobs += 1
            if self.read_data and (self.subset is None or self.subset(ref.pack)):
                self._to_read.add(ref)
        if key is None:
            if sound is None:
                sound = self._sound[ref.pack] = set()
            sound.add(ref.offset)
        else:
            self._refs[ref] = key
        return key

    def _auth_problem(self, pid: bytes, exc: Exception | None) -> Key:
        h = pid.hex()
        if exc is not None:
            log.debug("pack %s: %s", h, exc)
        return self._problem(("auth", h), f"pack {h} fails authentication (bytes were "
                             "changed, or the file was replaced by another one)")

    def _read_data(self) -> None:
        """Authenticates every chunk of the selected data blobs, pack by pack in file order."""
        by_pack: dict[bytes, list[Ref]] = {}
        for ref in self._to_read:
            by_pack.setdefault(ref.pack, []).append(ref)
        for pid in sorted(by_pack):
            self.report.packs_read += 1
            for ref in sorted(by_pack[pid], key=lambda r: r.offset):
                n = crypto.chunk_count(ref.plain_len)
                try:
                    for first in range(0, n, _READ_BATCH):
                        last = min(n, first + _READ_BATCH) - 1
                        self.store.read_chunks(ref, crypto.KIND_DATA, first, last)
                    self.report.bytes_read += ref.plain_len
                except StoreError as exc:
                    log.debug("blob at %d of pack %s: %s", ref.offset, pid.hex(), exc)
                    self._bad_data.add(ref)

    def _truncation_messages(self) -> None:
        for (kind, h), p in self.report.problems.items():
            if kind == "truncated":
                pid = bytes.fromhex(h)
                p.message = (f"pack {h} is truncated: it has {self.pack_sizes[pid]} bytes, "
                             f"its blobs reach to byte {self._reach[pid]}")

    def _pack_advice(self) -> None:
        """What to do about a pack whose bytes were changed in place: one that holds file data
        goes out of the store (else a backup keeps referring to it for unchanged files); one
        that holds folder listings stays (a backup reads a folder whose listing fails anew,
        and moving it out would cost the other folders it lists in earlier generations)."""
        for key, p in self.report.problems.items():
            if key[0] not in ("auth", "header", "ref"):
                continue
            pid = bytes.fromhex(key[1])
            if key[0] == "header" and self.pack_sizes.get(pid, 0) < format.HEADER_LEN:
                p.message = (f"pack {key[1]} is cut short ({self.pack_sizes.get(pid, 0)} bytes, "
                             "not even a pack header): the next backup reads its files again "
                             "from the node; leave it where it is")
                continue
            if key in self._data_keys:
                p.message += ("; it holds file data: move the pack file out of the store (keep "
                              "it), then run a backup, which reads those files again")
                if key in self._tree_keys:
                    p.message += (" (the folders listed in it are read again too)")
            elif key in self._tree_keys:
                p.message += ("; it holds folder listings: leave it in the store and run a "
                              "backup, which reads those folders again from the node (moving "
                              "it out would lose the other folders it lists in earlier "
                              "generations). That backup needs about those folders' size of "
                              "free space on the backup disk, and prune cannot free any while "
                              "a listing is damaged: if the disk is too full, free space "
                              "outside the store, or move the pack out of the store (losing "
                              "only the folders it lists in earlier generations), after which "
                              "prune works again")

    def _unreferenced(self) -> None:
        unused = [pid for pid in self.pack_sizes if pid not in self._pack_ok]
        for pid in unused:
            self._pack(pid)     # a malformed pack is damage even if nothing refers to it
        # The packs a backup run has listed in its journal are its own (FORMAT.md 8).
        of_runs: set[bytes] = set()
        try:
            for name in journal.journal_names(self.store.backend):
                of_runs.update(journal.read(self.store.backend, name)[0])
        except OSError as exc:
            if err := refused(exc, str(exc.filename or self.store.at("tmp"))):
                raise err from None
        runs = [p for p in unused if p in of_runs]
        other = [p for p in unused if p not in of_runs]
        if runs:
            total = sum(self.pack_sizes[p] for p in runs)
            self.report.notes.append(
                f"{len(runs)} pack(s), {human_bytes(total)}, of a backup that is running or "
                "did not finish (it, or the next backup, removes them)")
        if other and not self.gen_names and not self.report.problems:
            # Packs and no generation file: prune refuses (FORMAT.md 10.2), and this is damage
            # unless every pack is a running or interrupted backup's (noted above).
            self._problem(("generation", "none"), f"the store has {len(self.pack_sizes)} "
                          "pack(s) but no generation: its generations are missing. Put "
                          f"{self.store.at('generations')} back from a copy of the store "
                          "(an rsync or snapshot of BACKUP_DIR). Nothing will be deleted: "
                          "prune deletes no pack while the store has no generation")
            return
        if other:
            total = sum(self.pack_sizes[p] for p in other)
            unreadable = [k for k in self.report.problems if k[0] == "generation"]
            if self._none_opens:
                how = ("prune deletes nothing while no generation of the store can be read")
            elif unreadable:
                how = ("prune removes them only once the generation file(s) that cannot be read "
                       "are out of generations/: `humiofs prune --set-aside-damaged --grace 0` "
                       "sets them aside and deletes them")
            elif self._tree_keys:
                how = ("prune deletes no pack while a folder listing cannot be read; a backup "
                       "reads those folders again, and prune removes them once the generations "
                       "that list them are dropped")
            else:
                how = ("prune removes them: it records them, and deletes them an hour later, at "
                       "once with --grace 0; while a backup runs, those newer than the newest "
                       "generation wait for it to finish")
            self.report.notes.append(
                f"{len(other)} unreferenced pack(s), {human_bytes(total)} ({how})")


def describe(report: Report, latest: str | None, all_paths: bool = False,
             max_paths: int = 10) -> list[str]:
    """The problem lines of a report, for people."""
    lines = []
    for p in report.problems.values():
        line = f"problem: {p.message}"
        if p.paths:
            gens = sorted(p.generations)
            when = format_time(format.generation_time(gens[0]))
            if len(gens) > 1:
                when += f" .. {format_time(format.generation_time(gens[-1]))}"
            tail = ", including the latest" if latest in p.generations else ""
            line += (f"; affects {len(p.paths)} node path(s) in {len(gens)} generation(s) "
                     f"({when}{tail}):")
        lines.append(line)
        paths = sorted(p.paths)
        shown = paths if all_paths else paths[:max_paths]
        lines.extend(f"    {path}" for path in shown)
        if len(paths) > len(shown):
            lines.append(f"    ... and {len(paths) - len(shown)} more (-v lists them all)")
    return lines
