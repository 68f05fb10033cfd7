"""Which folder, file or hard link each inode number of the mount stands for: inodes.py's rule
applied to the folders as their listings are read, with its collision handling. Not
thread-safe: the model (tree.py) calls it with its lock held."""
from __future__ import annotations

import os

from humiofs.mount import inodes
from humiofs.mount.sources import Source
from humiofs.store.format import DIR, Entry, Generation, Ref

GLOBALDATA = b"globaldata"


class Folder:
    """A folder of a node tree (or a node root, or the synthetic globaldata folder).
    `index`: its position in its parent's listing (-1 for a node root). `key`: its path key,
    which the numbers of its files start with (inodes.py). `seeded`: the node root's globaldata
    folder, where the seed file is shown (the folder is synthetic if `ref` is None, else the
    node's own)."""

    __slots__ = ("inode", "parent", "index", "path", "rel", "source", "gen", "ref", "view",
                 "key", "is_root", "seeded")

    def __init__(self, inode: int, parent: int, index: int, path: str, rel: bytes,
                 source: Source, gen: Generation, ref: Ref | None, view: bytes, key: int,
                 is_root: bool = False, seeded: bool = False) -> None:
        self.inode, self.parent, self.index, self.path, self.rel = inode, parent, index, path, rel
        self.source, self.gen, self.ref, self.view, self.key = source, gen, ref, view, key
        self.is_root, self.seeded = is_root, seeded


class Numbering:
    """The registered folders, path keys and hard links of one mount. Grows with the folders
    listed (one Folder each) and the hard-linked names seen, not with the files."""

    def __init__(self) -> None:
        self.dirs: dict[int, Folder] = {}
        self.keys: dict[int, list[Folder]] = {}        # path key -> its folders, newest last
        self._key_of: dict[tuple[bytes, bytes], int] = {}   # (view, path) -> its path key
        self._key_path: dict[int, tuple[bytes, bytes]] = {}
        # A hard link's number -> (a folder, the index there, what tells the inode from others).
        self.links: dict[int, tuple[Folder, int, tuple[bytes, object]]] = {}

    def _path_key(self, view: bytes, rel: bytes) -> int:
        """The path key of the folder path `rel` in `view`; a key taken by another path goes
        to the next free one (inodes.py, collisions)."""
        key = self._key_of.get((view, rel))
        if key is None:
            key = inodes.dir_key(view, rel)
            while self._key_path.setdefault(key, (view, rel)) != (view, rel):
                key = (key + 1) & inodes.KEY_MASK
            self._key_of[(view, rel)] = key
        return key

    def new_folder(self, number: int, parent: int, index: int, path: str, rel: bytes,
                   src: Source, gen: Generation, ref: Ref | None, view: bytes, is_root: bool,
                   seeded: bool) -> Folder:
        """Registers a folder under `number`, or the next free number if that one stands for
        another folder; a folder registered before is returned as it is."""
        while True:
            d = self.dirs.get(number)
            if d is None:
                break
            if d.view == view and d.rel == rel and d.gen.name == gen.name and \
                    d.seeded == seeded:
                return d
            number = inodes.TAG_DIR | ((number + 1) & inodes.LOW_MASK)
        key = self._path_key(view, rel)
        d = self.dirs[number] = Folder(number, parent, index, path, rel, src, gen, ref, view,
                                      key, is_root, seeded)
        self.keys.setdefault(key, []).append(d)
        return d

    def children(self, d: Folder, entries: list[tuple[int, Entry, int]]) -> list[int]:
        """The inode numbers of the children of `d` that are not FileRows, given as (index in
        the listing, entry, file slot) (listing.py): registers its subfolders and hard links;
        anything else is a file of its slot."""
        gen_name = d.gen.name.encode()
        numbers: list[int] = []
        for i, e, slot in entries:
            if e.type == DIR:
                rel = e.name if not d.rel else d.rel + b"/" + e.name
                seeded = d.is_root and e.name == GLOBALDATA
                sub = self.new_folder(inodes.dir_inode(d.view, rel, gen_name),
                                      d.inode, i, f"{d.path}/{os.fsdecode(e.name)}", rel,
                                      d.source, d.gen, e.subtree, d.view, False, seeded)
                numbers.append(sub.inode)
            elif e.nlink > 1 and e.link_key() is not None:
                number = inodes.link_inode(d.view, e)
                same = (d.view, e.link_key())
                while self.links.setdefault(number, (d, i, same))[2] != same:
                    number = inodes.TAG_LINK | ((number + 1) & inodes.LOW_MASK)
                numbers.append(number)
            else:
                numbers.append(inodes.file_inode(d.key, slot))
        return numbers
