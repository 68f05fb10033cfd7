"""The mount's inode numbers: derived from what is shown, so an unchanged file keeps its number
across remounts and across generations (README, "Inode numbers").

Tools that back up the mount (restic, borg) tell an unchanged file by its path, size, mtime,
ctime and inode number; so do the kernel's caches, which keep a file's attributes and pages for
as long as its inode lives. So a number must follow the file's contents and attributes, never
the order of visits, and never stand for two different things in one mount. The rule, in 63 bits
(bits 61-62 tell the kinds apart, and the synthetic folders above the node trees have small
numbers below 2**32):

    folder     1 | 61 bits of H(view, path, generation)
    file       2 | 27 bits of H(view, parent path) | 34 bits of fingerprint(name, attributes, data)
    hard link  3 | 61 bits of H(view, the inode's shared fields)

H is BLAKE2b for folders and hard links, and a 64-bit fingerprint for files (see
fingerprint()). `view` is the store's `store_id` for NAME/, and the store_id with the generation
name for .generations/NAME/TIME/, so the two views never share a number. A file's number changes
exactly when something `stat` shows or its data changes (then the kernel must not serve what it
cached), and stays when a new generation leaves it alone. A folder gets a new number in every
generation (its listing may have changed; restic and borg do not compare folders' numbers).
Symlinks, FIFOs and device nodes are numbered as files; all names of one hard-linked inode share
one number.

Collisions: two files of one folder whose hashes meet get the next free number in name order;
two folder paths whose 27-bit keys meet take the next free key, in the order visited (only then
may a number depend on the order of visits); a folder or hard-link number already taken by
something else goes to the next free one. So two live entries never share a number, except the
names of one hard-linked inode.
"""
from __future__ import annotations

from hashlib import blake2b
from zlib import crc32

from humiofs.store.format import FILE, Entry, FileRow

TAG_DIR = 1 << 61
TAG_FILE = 2 << 61
TAG_LINK = 3 << 61
TAG_MASK = 3 << 61
SLOT_BITS = 34
KEY_BITS = 27
SLOT_MASK = (1 << SLOT_BITS) - 1
KEY_MASK = (1 << KEY_BITS) - 1
LOW_MASK = (1 << 61) - 1
_NO_RDEV = (0, 0)


def _h(*parts: bytes) -> int:
    """64 bits of BLAKE2b over the parts, each length-prefixed (no two splits hash alike)."""
    h = blake2b(digest_size=8)
    for part in parts:
        h.update(len(part).to_bytes(4, "little"))
        h.update(part)
    return int.from_bytes(h.digest(), "little")


def dir_inode(view: bytes, path: bytes, generation: bytes) -> int:
    """The number of the folder at `path` (b"" for the node root) in one generation."""
    return TAG_DIR | (_h(b"d", view, path, generation) & LOW_MASK)


def dir_key(view: bytes, path: bytes) -> int:
    """The 27-bit key of the folder path `path` its files' numbers start with."""
    return _h(b"k", view, path) & KEY_MASK


def file_inode(key: int, slot: int) -> int:
    return TAG_FILE | (key << SLOT_BITS) | slot


def key_of(inode: int) -> int:
    """The folder key of a file number."""
    return (inode >> SLOT_BITS) & KEY_MASK


def fingerprint(e: Entry, with_name: bool = True) -> int:
    """64 bits that change with anything stat shows of `e`, its name (`with_name`), or where
    its data is.

    Python's hash of a tuple of ints: the same in every process on a 64-bit platform (only str
    and bytes hashes are salted, so the bytes go in as CRC-32s), and at 0.3 us an entry, cheap
    enough for the first walk of a large node. A Python release that changed the tuple hash
    (the last one to was 3.8) would renumber the files once."""
    d = e.data
    return hash((crc32(e.name) if with_name else -1, e.type, e.mode, e.uid, e.gid, e.nlink,
                 e.size, e.mtime_ns, e.rdev, e.extents, 0 if d is None else crc32(d.oid),
                 0 if d is None else d.offset, crc32(e.target),
                 crc32(repr(e.xattrs).encode()) if e.xattrs else 0))


def row_fingerprint(r: FileRow) -> int:
    """fingerprint(r.entry()), read straight from the row's fields (one name, data in one
    extent, no xattrs, no target, no device), without building the Entry."""
    name, mode, uid, gid, mtime, _, _, size, _, oid, offset, _, start, length = r
    return hash((crc32(name), FILE, mode, uid, gid, 1, size, mtime, _NO_RDEV,
                 ((start, length),), crc32(oid), offset, 0, 0))


def link_inode(view: bytes, e: Entry) -> int:
    """The one number all names of a hard-linked inode share (e.link_key() is not None)."""
    return TAG_LINK | (_h(b"l", view, e.ino.to_bytes(8, "little", signed=True),
                          fingerprint(e, False).to_bytes(8, "little", signed=True)) & LOW_MASK)
