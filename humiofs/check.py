"""Verifying a store (`humiofs check`): its layout, key files, generations, trees and packs,
and with `read_data` every chunk of the file data. Each problem is reported with the node
files and the generations it affects (docs/FORMAT.md section 10.4).
"""
from __future__ import annotations

import logging
import os
import random
import re
import stat
from collections.abc import Callable
from dataclasses import dataclass, field

from humiofs.errors import IntegrityError, StoreError
from humiofs.progress import human_bytes
from humiofs.prune import RECORD_DIR, RECORD_NAME, SET_ASIDE_DIR, read_record
from humiofs.store import crypto, format, journal, keys
from humiofs.store.durable import read_store_file
from humiofs.store.format import DIR, FILE, Generation, Ref
from humiofs.store.generations import NO_GENERATION_OPENS, complete_name, format_time, load_listed
from humiofs.store.repository import PACK_NAME, Store

log = logging.getLogger(__name__)

Key = tuple[str, str]
# Entries of a store's top folder: name -> (is a folder, required).
ROOT_LAYOUT = {"config": (False, True), "keys": (True, True), "packs": (True, True),
               "generations": (True, True), "tmp": (True, True), "lock": (False, False),
               "prune.lock": (False, False), RECORD_DIR: (True, False),
               SET_ASIDE_DIR: (True, False)}
_HEX2 = re.compile(r"^[0-9a-f]{2}$")
_KEY_NAME = re.compile(r"^[0-9a-f]{32}$")
_READ_BATCH = 64


@dataclass
class Problem:
    """One kind of damage and what it affects."""

    message: str
    paths: set[str] = field(default_factory=set)
    generations: set[str] = field(default_factory=set)


@dataclass
class Report:
    problems: dict[Key, Problem] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    # Things that are not damage but want a look (a file the store does not use); each starts
    # with the path it is about.
    warnings: list[str] = field(default_factory=list)
    read_data: bool = False
    generations: int = 0
    trees: int = 0
    blobs: int = 0
    packs: int = 0
    packs_read: int = 0
    bytes_read: int = 0
    newest: str | None = None       # the newest generation that authenticates

    @property
    def healthy(self) -> bool:
        return not self.problems


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


class Checker:
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

    def _problem(self, key: Key, message: str) -> Key:
        if key not in self.report.problems:
            self.report.problems[key] = Problem(message)
        return key

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

    # -- layout ---------------------------------------------------------------------------

    def _layout(self) -> None:
        root = self.store.path
        present = {}
        for name in os.listdir(root):
            present[name] = os.lstat(root / name)
            expected = ROOT_LAYOUT.get(name)
            if expected is None:
                self._stray(name, "is not part of a humiofs store")
            elif stat.S_ISLNK(present[name].st_mode):
                self._problem(("layout", name), f"{name} is a symlink, not part of a humiofs "
                              "store: move it out (backup and prune refuse to run while it is "
                              "there)")
            elif not (stat.S_ISDIR if expected[0] else stat.S_ISREG)(present[name].st_mode):
                if expected[1] or name in ("lock", "prune.lock"):   # the store cannot be used without it
                    self._problem(("layout", name), f"{name} has the wrong type (a "
                                  f"{'folder' if expected[0] else 'file'} is expected)")
                else:
                    self._stray(name, "has the wrong type")
        for name, (_, required) in ROOT_LAYOUT.items():
            if required and name == "generations" and name not in present:
                self._problem(("layout", name), f"generations is missing from the store: the "
                              "store's generations are gone. Put the folder back from a copy "
                              f"of the store, or make an empty one (`mkdir -m 700 {root / name}`)"
                              "; with packs and no generation, prune deletes nothing")
            elif required and name not in present:
                self._problem(("layout", name), f"{name} is missing from the store"
                              + (f" (recreate it: mkdir -m 700 {root / name})"
                                 if ROOT_LAYOUT[name][0] else ""))
        # Generations are listed before packs: a writer makes its packs durable before the
        # generation that names them, so every pack a listed generation needs is seen below.
        self.gen_names = self._files("generations", lambda n: bool(format.GENERATION_NAME.match(n)))
        self.key_names = self._files("keys", lambda n: bool(_KEY_NAME.match(n)))
        for name in self._files(RECORD_DIR, lambda n: bool(RECORD_NAME.match(n))):
            try:
                read_record(self.store, name)
            except (ValueError, OSError) as exc:
                self.report.warnings.append(f"{RECORD_DIR}/{name} is a damaged prune record "
                                            f"({exc}); the next prune removes it")
        aside = []
        for name in self._files(SET_ASIDE_DIR, lambda n: bool(format.GENERATION_NAME.match(n))):
            try:
                self.store.load_generation(name, SET_ASIDE_DIR)
            except StoreError:
                aside.append(name)
                continue
            # An intact generation there would hide a rollback and lose its packs to prune
            # (FORMAT.md 10.4): it is not damage set aside.
            self._problem(("aside", name), f"{SET_ASIDE_DIR}/{name} reads back: it is an intact "
                          "generation, not one set aside as damaged, and while it is there "
                          "prune may delete the packs it needs. Move it back: mv "
                          f"{root / SET_ASIDE_DIR / name} {root / 'generations'}/")
        if aside:
            self.report.warnings.append(
                f"{SET_ASIDE_DIR}/ holds {len(aside)} generation file(s) that could not be read, "
                f"set aside by prune --set-aside-damaged ({', '.join(aside)}); nothing reads "
                "them: delete them once you no longer want to look at them")
        try:
            leftovers = len(os.listdir(root / "tmp"))
        except OSError:
            leftovers = 0
        if leftovers:
            self.report.notes.append(f"{leftovers} file(s) in tmp/ left by an interrupted run "
                                     "(the next backup removes them)")
        self._packs_layout()

    def _files(self, sub: str, good: Callable[[str], bool]) -> list[str]:
        out: list[str] = []
        try:
            names = sorted(os.listdir(self.store.path / sub))
        except (FileNotFoundError, NotADirectoryError):
            return out
        for name in names:
            try:
                st = os.lstat(self.store.path / sub / name)
            except FileNotFoundError:
                continue        # removed since the listing (a superseded checkpoint)
            if sub == "generations" and good(name) and not stat.S_ISDIR(st.st_mode):
                out.append(name)    # a FIFO or symlink there: a damaged generation, as for all
            elif not good(name) or not stat.S_ISREG(st.st_mode):
                self._stray(f"{sub}/{name}", "is not part of a humiofs store")
            else:
                out.append(name)
        return out

    def _packs_layout(self) -> None:
        pdir = self.store.path / "packs"
        try:
            prefixes = set(os.listdir(pdir))
        except (FileNotFoundError, NotADirectoryError):
            return
        for i in range(256):
            if f"{i:02x}" not in prefixes:
                self._problem(("layout", f"packs/{i:02x}"), f"packs/{i:02x} is missing "
                              "from the store (the writer needs it)")
        for prefix in sorted(prefixes):
            if os.path.islink(pdir / prefix):
                self._problem(("layout", f"packs/{prefix}"), f"packs/{prefix} is a symlink, not "
                              "part of a humiofs store: move it out (backup and prune refuse "
                              "to run while it is there)")
                continue
            if not _HEX2.match(prefix) or not os.path.isdir(pdir / prefix):
                self._stray(f"packs/{prefix}", "is not part of a humiofs store")
                continue
            for name in sorted(os.listdir(pdir / prefix)):
                st = os.lstat(pdir / prefix / name)
                where = f"packs/{prefix}/{name}"
                if not PACK_NAME.match(name) or not stat.S_ISREG(st.st_mode):
                    self._stray(where, "is not part of a humiofs store")
                elif not name.startswith(prefix):
                    self._stray(where, f"is a pack in the wrong folder (it belongs in "
                                f"packs/{name[:2]}/; readers do not find it there)")
                else:
                    self.pack_sizes[bytes.fromhex(name)] = st.st_size

    def _stray(self, where: str, why: str) -> None:
        """A file or folder the store does not use: a warning, not damage (nothing reads it)."""
        self.report.warnings.append(f"{where} {why}; no backed-up file depends on it: "
                                    "move it out of the store")

    # -- keys and generations -------------------------------------------------------------

    def _keys(self) -> None:
        kdir = self.store.path / "keys"
        if len(self.key_names) == 1:
            return          # opening the store has just unwrapped it (Argon2 is slow)
        for name in self.key_names:
            try:
                master = keys.unwrap(read_store_file(kdir / name, 1 << 16), self.store.store_id,
                                     self.passphrase)
            except (IntegrityError, OSError) as exc:
                self._problem(("key", name), f"key file keys/{name} is damaged ({exc}); the "
                              "store opens with another key file, so no data is lost")
                continue
            if master is None:
                # Well formed and for this store: most likely another passphrase's (a key
                # change that was interrupted leaves the old and the new one, both valid).
                others = [n for n in self.key_names if n != name]
                self.report.warnings.append(
                    f"keys/{name} does not open with this key, but another key file does: it is "
                    "another passphrase's (left by an interrupted key change, or added), or "
                    "damaged. Whoever knows that passphrase can open the store. If the key was "
                    f"changed, remove it (rm {self.store.path / 'keys' / name}); or run "
                    "`humiofs key change` with your key, which leaves one key file"
                    + (f" (keys/{others[0]} opens with this key)" if len(others) == 1 else ""))

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
                head = read_store_file(self.store.pack_path(pid), format.HEADER_LEN)
                format.check_header(head, format.TYPE_PACK, format.PACK_VERSION, f"pack {h}")
            except FileNotFoundError:
                key = self._problem(("missing", h), f"pack {h} is missing")
            except (OSError, IntegrityError) as exc:
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
        tmp = self.store.path / "tmp"
        try:
            for name in os.listdir(tmp):
                if journal.JOURNAL_NAME.match(name):
                    of_runs.update(journal.read(tmp / name)[0])
        except OSError:
            pass
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
                          f"{self.store.path / 'generations'} back from a copy of the store "
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
