"""Checking a store's files (`humiofs check`, docs/FORMAT.md 2 and 10.4): its layout, what
does not belong in it, and its key files; and the report check fills. The contents (the
generations, trees, packs and data) are check.py's.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

from humiofs.errors import IntegrityError, StoreError, refused
from humiofs.prune import RECORD_DIR, RECORD_NAME, SET_ASIDE_DIR, read_record
from humiofs.store import format, keys
from humiofs.store.backend import FILE, FOLDER
from humiofs.store.repository import PACK_NAME, Store

Key = tuple[str, str]
# Entries of a store's top folder: name -> (is a folder, required).
ROOT_LAYOUT = {"config": (False, True), "keys": (True, True), "packs": (True, True),
               "generations": (True, True), "tmp": (True, True), "lock": (False, False),
               "prune.lock": (False, False), RECORD_DIR: (True, False),
               SET_ASIDE_DIR: (True, False)}
_HEX2 = re.compile(r"^[0-9a-f]{2}$")
_KEY_NAME = re.compile(r"^[0-9a-f]{32}$")


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


class StoreFiles:
    """The checks of a store's files, for Checker (check.py), which holds the state."""

    store: Store
    passphrase: str
    report: Report
    gen_names: list[str]
    key_names: list[str]
    pack_sizes: dict[bytes, int]

    def _problem(self, key: Key, message: str) -> Key:
        if key not in self.report.problems:
            self.report.problems[key] = Problem(message)
        return key

    # -- layout ---------------------------------------------------------------------------

    def _layout(self) -> None:
        at = self.store.at
        present = {}
        for item in self.store.backend.list():
            name = item.name
            present[name] = item
            expected = ROOT_LAYOUT.get(name)
            if expected is None:
                self._stray(name, "is not part of a humiofs store")
            elif item.symlink:
                self._problem(("layout", name), f"{name} is a symlink, not part of a humiofs "
                              "store: move it out (backup and prune refuse to run while it is "
                              "there)")
            elif item.kind != (FOLDER if expected[0] else FILE):
                if expected[1] or name in ("lock", "prune.lock"):   # the store cannot be used without it
                    self._problem(("layout", name), f"{name} has the wrong type (a "
                                  f"{'folder' if expected[0] else 'file'} is expected)")
                else:
                    self._stray(name, "has the wrong type")
        # Object storage has no folders: one with nothing in it is not seen, and not missing.
        folders = self.store.backend.local_path is not None
        for name, (folder, required) in ROOT_LAYOUT.items():
            if folder and not folders:
                continue
            if required and name == "generations" and name not in present:
                self._problem(("layout", name), f"generations is missing from the store: the "
                              "store's generations are gone. Put the folder back from a copy "
                              f"of the store, or make an empty one (`mkdir -m 700 {at(name)}`)"
                              "; with packs and no generation, prune deletes nothing")
            elif required and name not in present:
                self._problem(("layout", name), f"{name} is missing from the store"
                              + (f" (recreate it: mkdir -m 700 {at(name)})"
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
                          f"{at(f'{SET_ASIDE_DIR}/{name}')} {at('generations')}/")
        if aside:
            self.report.warnings.append(
                f"{SET_ASIDE_DIR}/ holds {len(aside)} generation file(s) that could not be read, "
                f"set aside by prune --set-aside-damaged ({', '.join(aside)}); nothing reads "
                "them: delete them once you no longer want to look at them")
        try:
            leftovers = len(self.store.backend.list("tmp"))
        except OSError as exc:
            if err := refused(exc, self.store.at("tmp")):
                raise err from None
            leftovers = 0
        if leftovers:
            self.report.notes.append(f"{leftovers} file(s) in tmp/ left by an interrupted run "
                                     "(the next backup removes them)")
        self._packs_layout()

    def _files(self, sub: str, good: Callable[[str], bool]) -> list[str]:
        out: list[str] = []
        try:
            items = self.store.backend.list(sub)    # one removed since is left out
        except (FileNotFoundError, NotADirectoryError):
            return out
        for item in items:
            name = item.name.rpartition("/")[2]
            if sub == "generations" and good(name) and item.kind != FOLDER:
                out.append(name)    # a FIFO or symlink there: a damaged generation, as for all
            elif not good(name) or item.kind != FILE:
                self._stray(f"{sub}/{name}", "is not part of a humiofs store")
            else:
                out.append(name)
        return out

    def _packs_layout(self) -> None:
        backend = self.store.backend
        try:
            listed = {i.name.rpartition("/")[2]: i for i in backend.list("packs")}
        except (FileNotFoundError, NotADirectoryError):
            return
        prefixes = set(listed)
        for i in range(256 if backend.local_path is not None else 0):
            if f"{i:02x}" not in prefixes:
                self._problem(("layout", f"packs/{i:02x}"), f"packs/{i:02x} is missing "
                              "from the store (the writer needs it)")
        for prefix in sorted(prefixes):
            if listed[prefix].symlink:
                self._problem(("layout", f"packs/{prefix}"), f"packs/{prefix} is a symlink, not "
                              "part of a humiofs store: move it out (backup and prune refuse "
                              "to run while it is there)")
                continue
            if not _HEX2.match(prefix) or listed[prefix].kind != FOLDER:
                self._stray(f"packs/{prefix}", "is not part of a humiofs store")
                continue
            try:
                items = backend.list(f"packs/{prefix}")
            except (FileNotFoundError, NotADirectoryError):
                continue
            for st in items:
                where = st.name
                name = where.rpartition("/")[2]
                if not PACK_NAME.match(name) or st.kind != FILE:
                    self._stray(where, "is not part of a humiofs store")
                elif not name.startswith(prefix):
                    self._stray(where, f"is a pack in the wrong folder (it belongs in "
                                f"packs/{name[:2]}/; readers do not find it there)")
                else:
                    self.pack_sizes[bytes.fromhex(name)] = st.size

    def _stray(self, where: str, why: str) -> None:
        """A file or folder the store does not use: a warning, not damage (nothing reads it)."""
        self.report.warnings.append(f"{where} {why}; no backed-up file depends on it: "
                                    "move it out of the store")

    # -- key files -------------------------------------------------------------

    def _keys(self) -> None:
        if len(self.key_names) == 1:
            return          # opening the store has just unwrapped it (Argon2 is slow)
        for name in self.key_names:
            try:
                master = keys.unwrap(self.store.backend.read(f"keys/{name}", 1 << 16),
                                     self.store.store_id, self.passphrase)
            except (IntegrityError, OSError) as exc:
                where = self.store.at(f"keys/{name}")
                if isinstance(exc, OSError) and (err := refused(exc, where)):
                    raise err from None
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
                    f"changed, remove it (rm {self.store.at(f'keys/{name}')}); or run "
                    "`humiofs key change` with your key, which leaves one key file"
                    + (f" (keys/{others[0]} opens with this key)" if len(others) == 1 else ""))
