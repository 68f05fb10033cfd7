"""Byte layouts of the store objects (docs/FORMAT.md sections 3, 6.1 and 7).

Pure encode/decode: no I/O and no cryptography. Decoders treat their input as untrusted and raise
IntegrityError on anything malformed.
"""
from __future__ import annotations

import base64
import binascii
import json
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

from humiofs.errors import IntegrityError

MAGIC = b"HUMIOF"
TYPE_PACK = b"P"
TYPE_GENERATION = b"G"
PACK_VERSION = 1
GENERATION_VERSION = 1            # the file header's version (section 7.2)
# The plaintext's version: 1 for a complete generation (every humiofs reads it), 2 only for a
# checkpoint (section 7.4), which readers that know only version 1 refuse as damaged.
GENERATION_PLAIN_VERSIONS = (1, 2)
TREE_VERSION = 2
HEADER_LEN = 8

FILE = 1
DIR = 2
SYMLINK = 3
FIFO = 4
CHR = 5
BLK = 6
# Types whose entries carry no subtree, target or data of their own.
SPECIALS = (FIFO, CHR, BLK)
# Types whose entries may be names of one inode (hard links, section 7.1).
LINKABLE = (FILE, FIFO, CHR, BLK)

NAME_MAX = 255
XATTR_NAME_MAX = 255
XATTR_VALUE_MAX = 65536
NSEC = 1_000_000_000

REF_LEN = 56
_REF = struct.Struct(">16s16sQQQ")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_MAX_EXTENTS = 1 << 24
_ENTRY_HEAD_V1 = struct.Struct(">BIIIqqQQ")
_ENTRY_HEAD = struct.Struct(">BIIIIqIqIQQ")
_ENTRY_HEAD_X = struct.Struct(">BIIIIqIqIQQH")      # with the xattr count after it
_FILE_1 = struct.Struct(">B16s16sQQQIQQ")         # a file body with data in one extent
_DEVICE = struct.Struct(">II")
_EXTENT = struct.Struct(">QQ")
_TREE_HEAD = struct.Struct(">2sBI")
GENERATION_NAME = re.compile(r"^(\d{13})-([0-9a-f]{16})$")
LAST_GENERATION_MS = 10**13     # a generation name holds its time in 13 digits


def header(file_type: bytes, version: int) -> bytes:
    """The 8-byte header that starts every binary store file."""
    return MAGIC + file_type + bytes((version,))


def check_header(data: bytes, file_type: bytes, version: int, what: str) -> None:
    """Raises IntegrityError unless `data` starts with the expected header."""
    if len(data) < HEADER_LEN or data[:6] != MAGIC or data[6:7] != file_type:
        raise IntegrityError(f"{what}: not a humiofs {file_type.decode()} file")
    if data[7] != version:
        raise IntegrityError(f"{what}: unsupported format version {data[7]}")


@dataclass(frozen=True, slots=True)
class Ref:
    """Where a blob is: its pack, offset and lengths, and the object id its key derives from."""

    pack: bytes
    oid: bytes
    offset: int
    stored_len: int
    plain_len: int

    def encode(self) -> bytes:
        return _REF.pack(self.pack, self.oid, self.offset, self.stored_len, self.plain_len)

    @classmethod
    def decode(cls, data: bytes | memoryview) -> Ref:
        if len(data) != REF_LEN:
            raise IntegrityError("ref has the wrong length")
        pack, oid, offset, slen, plen = _REF.unpack(data)
        if offset < HEADER_LEN:
            raise IntegrityError("ref points into a pack header")
        return cls(pack, oid, offset, slen, plen)

    def hex(self) -> str:
        return self.encode().hex()

    @classmethod
    def from_hex(cls, text: str) -> Ref:
        try:
            return cls.decode(bytes.fromhex(text))
        except ValueError:
            raise IntegrityError("ref is not valid hex") from None


Xattrs = tuple[tuple[bytes, bytes], ...]


@dataclass(frozen=True, slots=True)
class Entry:
    """One directory entry of a tree (FORMAT.md 7.1). `name`, `target` and the xattr names and
    values are raw bytes; times are nanoseconds since the epoch, of any size and sign."""

    name: bytes
    type: int
    mode: int
    uid: int
    gid: int
    mtime_ns: int
    ctime_ns: int
    ino: int
    size: int
    data: Ref | None = None
    extents: tuple[tuple[int, int], ...] = ()
    subtree: Ref | None = None
    target: bytes = b""
    nlink: int = 1
    rdev: tuple[int, int] = (0, 0)   # (major, minor) of a device
    xattrs: Xattrs = ()

    @property
    def data_bytes(self) -> int:
        """Bytes of real data (what `du` counts): the sum of the extent lengths."""
        extents = self.extents
        if len(extents) == 1:       # most files: no hole
            return extents[0][1]
        return sum(length for _, length in extents)

    def link_key(self) -> tuple[object, ...] | None:
        """What names of one inode share (FORMAT.md 7.1, hard links), or None if this entry is
        not one of several names of an inode. Equal keys within a generation: one inode."""
        if self.nlink < 2 or self.type not in LINKABLE:
            return None
        return (self.ino, self.type, self.data, self.extents, self.rdev, self.size, self.mode,
                self.uid, self.gid, self.mtime_ns, self.nlink, self.xattrs)


def split_ns(ns: int) -> tuple[int, int]:
    """(seconds, nanoseconds) of a time in ns, as a POSIX timespec (nsec always >= 0)."""
    return divmod(ns, NSEC)


def check_name(name: bytes) -> None:
    """Raises IntegrityError unless `name` is a safe single path component."""
    if not 0 < len(name) <= NAME_MAX or name in (b".", b"..") or b"/" in name or b"\0" in name:
        raise IntegrityError(f"unsafe name in tree: {name!r}")


def check_xattrs(xattrs: Xattrs) -> None:
    """Raises ValueError unless `xattrs` follows FORMAT.md 7.1 (sorted, bounded names and
    values)."""
    prev = b""
    for name, value in xattrs:
        if not 0 < len(name) <= XATTR_NAME_MAX or b"\0" in name or name <= prev:
            raise ValueError(f"invalid extended attribute name {name!r}")
        if len(value) > XATTR_VALUE_MAX:
            raise ValueError(f"extended attribute {name!r} is too large")
        prev = name


def encode_xattrs(xattrs: Xattrs) -> bytes:
    out = [_U16.pack(len(xattrs))]
    for name, value in xattrs:
        out.append(bytes((len(name),)))
        out.append(name)
        out.append(_U32.pack(len(value)))
        out.append(value)
    return b"".join(out)


def encode_tree(entries: list[Entry]) -> bytes:
    """The deterministic version 2 tree plaintext of `entries` (which must be sorted by name).

    Raises ValueError (OverflowError for a time past year 292 billion) for an entry that
    cannot be encoded; the writer checks each entry with `encode_tree([entry])` first.
    """
    out = [_TREE_HEAD.pack(b"HT", TREE_VERSION, len(entries))]
    for e in entries:
        out.append(_U16.pack(len(e.name)))
        out.append(e.name)
        m_sec, m_nsec = divmod(e.mtime_ns, NSEC)
        c_sec, c_nsec = divmod(e.ctime_ns, NSEC)
        try:
            out.append(_ENTRY_HEAD.pack(e.type, e.mode, e.uid, e.gid, e.nlink, m_sec, m_nsec,
                                        c_sec, c_nsec, e.ino, e.size))
        except struct.error as exc:
            raise ValueError(f"{e.name!r}: a value is out of range ({exc})") from None
        out.append(encode_xattrs(e.xattrs) if e.xattrs else b"\0\0")
        if e.type == FILE:
            if len(e.extents) > _MAX_EXTENTS:
                raise ValueError(f"{e.name!r}: more than {_MAX_EXTENTS} extents")
            if e.data is None:
                out.append(b"\0")
            else:
                out.append(b"\1")
                out.append(e.data.encode())
            out.append(struct.pack(">I", len(e.extents)))
            out.extend(_EXTENT.pack(off, length) for off, length in e.extents)
        elif e.type == DIR:
            assert e.subtree is not None, "a directory entry needs its subtree"
            out.append(e.subtree.encode())
        elif e.type == SYMLINK:
            out.append(_U16.pack(len(e.target)))
            out.append(e.target)
        elif e.type in (CHR, BLK):
            out.append(_DEVICE.pack(*e.rdev))
        elif e.type != FIFO:
            raise ValueError(f"unknown entry type {e.type}")
    return b"".join(out)


def _check_extents(extents: tuple[tuple[int, int], ...], size: int, data: Ref | None) -> None:
    end = 0
    total = 0
    for off, length in extents:
        if length <= 0 or off < end or off + length > size:
            raise IntegrityError("tree has a malformed extent list")
        end = off + length
        total += length
    if (data is None) != (total == 0) or (data is not None and data.plain_len != total):
        raise IntegrityError("tree extents do not match the file's data")


def decode_tree(data: bytes) -> list[Entry]:
    """Entries of a tree plaintext; raises IntegrityError if anything is malformed."""
    try:
        return _decode_tree(data, False)  # type: ignore[return-value]
    except (struct.error, IndexError):
        raise IntegrityError("tree is truncated") from None


class FileRow(NamedTuple):
    """A file entry of the most common kind, flat: data in one extent, no extended attributes,
    one name (nlink 1). Holds everything its Entry would (see entry()); what a listing needs
    of it (attributes, inode number) reads straight from the fields."""

    name: bytes
    mode: int
    uid: int
    gid: int
    mtime_ns: int
    ctime_ns: int
    ino: int
    size: int
    pack: bytes           # the data's Ref: pack, oid, offset, stored_len (plain_len: length)
    oid: bytes
    offset: int
    stored_len: int
    start: int            # the one extent: (start, length)
    length: int

    def entry(self) -> Entry:
        """The Entry this row stands for, equal to what decode_tree gives."""
        return Entry(self.name, FILE, self.mode, self.uid, self.gid, self.mtime_ns,
                     self.ctime_ns, self.ino, self.size,
                     Ref(self.pack, self.oid, self.offset, self.stored_len, self.length),
                     ((self.start, self.length),))


def decode_tree_rows(data: bytes) -> list[Entry | FileRow]:
    """decode_tree for a listing read whole at once (the mount's): the same checks and the
    same entries, but the common file (see FileRow) comes as a FileRow, which costs a third
    of an Entry to build. Raises IntegrityError if anything is malformed."""
    try:
        return _decode_tree(data, True)
    except (struct.error, IndexError):
        raise IntegrityError("tree is truncated") from None


class _NewEntry:
    """Entry's slots without the frozen guard: the decoder fills one and then makes it an Entry
    (`__class__` assignment; the layouts are the same). A frozen dataclass sets each of its 16
    fields through object.__setattr__, which made up most of the time of decoding a listing
    (about 4 us of 7 an entry); this way an entry costs a fifth of that. What comes out is a
    plain, frozen Entry, equal to one built the usual way."""

    __slots__ = Entry.__slots__

    def __init__(self, name: bytes, type: int, mode: int, uid: int, gid: int, mtime_ns: int,
                 ctime_ns: int, ino: int, size: int, data: Ref | None,
                 extents: tuple[tuple[int, int], ...], subtree: Ref | None, target: bytes,
                 nlink: int, rdev: tuple[int, int], xattrs: Xattrs) -> None:
        self.name, self.type, self.mode, self.uid, self.gid = name, type, mode, uid, gid
        self.mtime_ns, self.ctime_ns, self.ino, self.size = mtime_ns, ctime_ns, ino, size
        self.data, self.extents, self.subtree, self.target = data, extents, subtree, target
        self.nlink, self.rdev, self.xattrs = nlink, rdev, xattrs
        self.__class__ = Entry  # type: ignore[assignment]


class _NewRef:
    """Ref's slots without the frozen guard (see _NewEntry)."""

    __slots__ = Ref.__slots__

    def __init__(self, pack: bytes, oid: bytes, offset: int, stored_len: int,
                 plain_len: int) -> None:
        self.pack, self.oid, self.offset = pack, oid, offset
        self.stored_len, self.plain_len = stored_len, plain_len
        self.__class__ = Ref  # type: ignore[assignment]


def _ref_at(data: bytes, pos: int) -> Ref:
    """The ref at `pos` of a tree (struct.error if the tree ends first)."""
    pack, oid, offset, slen, plen = _REF.unpack_from(data, pos)
    if offset < HEADER_LEN:
        raise IntegrityError("ref points into a pack header")
    return _NewRef(pack, oid, offset, slen, plen)  # type: ignore[return-value]


def _decode_tree(data: bytes, rows: bool) -> list[Entry | FileRow]:
    # Written for speed (a no-change backup decodes every directory of the node, and the
    # mount's first walk every listing): plain unpack_from calls on a running position, the
    # common cases (a file of one extent, a name of plain bytes) checked inline, and entries
    # built through _NewEntry. struct.error (or IndexError, from reading the data flag byte) on
    # a short buffer means truncation.
    magic, version, count = _TREE_HEAD.unpack_from(data, 0)
    if magic != b"HT":
        raise IntegrityError("not a tree")
    if version not in (1, TREE_VERSION):
        raise IntegrityError(f"unsupported tree version {version}")
    v1 = version == 1
    pos = _TREE_HEAD.size
    n_data = len(data)
    entries: list[Entry | FileRow] = []
    append = entries.append
    new_row = tuple.__new__
    if v1:
        head_unpack, head_size = _ENTRY_HEAD_V1.unpack_from, _ENTRY_HEAD_V1.size
    else:
        head_unpack, head_size = _ENTRY_HEAD_X.unpack_from, _ENTRY_HEAD_X.size
    u16, u32 = _U16.unpack_from, _U32.unpack_from
    file_1, file_1_size = _FILE_1.unpack_from, _FILE_1.size
    # _NewEntry(...) is an Entry once built (see there).
    new: Callable[..., Entry] = _NewEntry  # type: ignore[assignment]
    new_ref: Callable[..., Ref] = _NewRef  # type: ignore[assignment]
    no_rdev = (0, 0)
    prev = b""
    xattrs: Xattrs = ()
    for _ in range(count):
        (name_len,) = u16(data, pos)
        pos += 2
        name = data[pos:pos + name_len]
        pos += name_len
        if len(name) != name_len:
            raise IntegrityError("tree is truncated")
        if not name_len or name_len > NAME_MAX or b"/" in name or b"\0" in name or \
                name == b".." or name == b".":
            check_name(name)
        if name <= prev:
            raise IntegrityError("tree entries are not strictly sorted")
        prev = name
        if v1:
            etype, mode, uid, gid, mtime, ctime, ino, size = head_unpack(data, pos)
            pos += head_size
            nlink = 1     # folders too: 1 is "not counted" (FORMAT.md 7.1.1)
            if etype > SYMLINK:
                raise IntegrityError(f"tree entry has unknown type {etype}")
        else:
            (etype, mode, uid, gid, nlink, m_sec, m_nsec, c_sec, c_nsec, ino,
             size, n_x) = head_unpack(data, pos)
            pos += head_size
            if m_nsec >= NSEC or c_nsec >= NSEC:
                raise IntegrityError("tree entry has an invalid time")
            mtime = m_sec * NSEC + m_nsec
            ctime = c_sec * NSEC + c_nsec
            if n_x:
                xattrs, pos = _decode_xattrs(data, pos, n_x)
            elif xattrs:
                xattrs = ()
        if mode > 0o7777:
            raise IntegrityError("tree entry has an invalid mode")
        if etype == FILE:
            has = data[pos]
            if has == 1 and pos + file_1_size <= n_data:
                # The common case in one unpack, checked here: data in one extent, inside the
                # file and as long as the data. Any other count: read again below.
                (_, pack, oid, roff, slen, plen, n, off, length) = file_1(data, pos)
                if n == 1:
                    pos += file_1_size
                    if roff < HEADER_LEN:
                        raise IntegrityError("ref points into a pack header")
                    if length <= 0 or off + length > size:
                        raise IntegrityError("tree has a malformed extent list")
                    if plen != length:
                        raise IntegrityError("tree extents do not match the file's data")
                    if rows and nlink == 1 and not xattrs:
                        append(new_row(FileRow, (name, mode, uid, gid, mtime, ctime, ino, size,
                                                 pack, oid, roff, slen, off, length)))
                        continue
                    append(new(name, etype, mode, uid, gid, mtime, ctime, ino,
                               size, new_ref(pack, oid, roff, slen, plen), ((off, length),),
                               None, b"", nlink, no_rdev, xattrs))
                    continue
            pos += 1
            if has > 1:
                raise IntegrityError("tree entry has an invalid data flag")
            ref = None
            if has:
                ref = _ref_at(data, pos)
                pos += REF_LEN
            (n,) = u32(data, pos)
            pos += 4
            if n > _MAX_EXTENTS:
                raise IntegrityError("tree entry has too many extents")
            end = pos + n * _EXTENT.size
            if end > n_data:
                raise IntegrityError("tree is truncated")
            extents = tuple(_EXTENT.iter_unpack(data[pos:end])) if n else ()
            pos = end
            _check_extents(extents, size, ref)
            append(new(name, etype, mode, uid, gid, mtime, ctime, ino, size, ref,
                       extents, None, b"", nlink, no_rdev, xattrs))
        elif etype == DIR:
            sub = _ref_at(data, pos)
            pos += REF_LEN
            append(new(name, etype, mode, uid, gid, mtime, ctime, ino, size, None,
                       (), sub, b"", nlink, no_rdev, xattrs))
        elif etype == SYMLINK:
            (tlen,) = u16(data, pos)
            pos += 2
            target = data[pos:pos + tlen]
            pos += tlen
            if len(target) != tlen or not target or b"\0" in target:
                raise IntegrityError("tree has an invalid symlink target")
            append(new(name, etype, mode, uid, gid, mtime, ctime, ino, size, None,
                       (), None, target, nlink, no_rdev, xattrs))
        elif etype == FIFO:
            append(new(name, etype, mode, uid, gid, mtime, ctime, ino, size, None,
                       (), None, b"", nlink, no_rdev, xattrs))
        elif etype in (CHR, BLK):
            rdev = _DEVICE.unpack_from(data, pos)
            pos += _DEVICE.size
            append(new(name, etype, mode, uid, gid, mtime, ctime, ino, size, None,
                       (), None, b"", nlink, rdev, xattrs))
        else:
            raise IntegrityError(f"tree entry has unknown type {etype}")
    if pos != n_data:
        raise IntegrityError("tree has trailing bytes")
    return entries


def _decode_xattrs(data: bytes, pos: int, count: int) -> tuple[Xattrs, int]:
    out = []
    for _ in range(count):
        n = data[pos]
        name = data[pos + 1:pos + 1 + n]
        pos += 1 + n
        (vlen,) = _U32.unpack_from(data, pos)
        pos += 4
        value = data[pos:pos + vlen]
        pos += vlen
        if len(value) != vlen:
            raise IntegrityError("tree is truncated")
        out.append((name, value))
    xattrs = tuple(out)
    try:
        check_xattrs(xattrs)
    except ValueError as exc:
        raise IntegrityError(f"tree entry has {exc}") from None
    return xattrs, pos


@dataclass(frozen=True, slots=True)
class RootAttrs:
    """Attributes of the node directory itself, which no tree entry describes."""

    mode: int
    uid: int
    gid: int
    mtime_ns: int
    tree: Ref
    xattrs: Xattrs = ()


@dataclass(frozen=True, slots=True)
class Identity:
    """The node's id and the contents of its cluster_membership.uuid."""

    node_id: str
    uuid: str

    @property
    def seed_name(self) -> bytes:
        """Name of the seed file the mount presents under globaldata/."""
        return f"cluster_membership-{self.node_id}-{self.uuid}.uuid".encode()


@dataclass(frozen=True)
class Generation:
    """A committed generation: the state of a node at one time."""

    name: str
    time_ms: int
    backup_name: str
    host: str
    directory: str
    root: RootAttrs
    identity: Identity | None
    stats: dict[str, int] = field(default_factory=dict)
    # A checkpoint (FORMAT.md 7.4): partial, never the latest. `base` names the newest
    # complete generation its chain of runs started from (None: a first backup).
    checkpoint: bool = False
    base: str | None = None


def generation_time(name: str) -> int:
    """Commit time (Unix ms) from a generation file name; IntegrityError if it is not one."""
    m = GENERATION_NAME.match(name)
    if not m:
        raise IntegrityError(f"not a generation name: {name!r}")
    return int(m.group(1))


def encode_generation(gen: Generation) -> bytes:
    root: dict[str, object] = {
        "mode": gen.root.mode, "uid": gen.root.uid, "gid": gen.root.gid,
        "mtime_ns": gen.root.mtime_ns, "tree": gen.root.tree.hex()}
    if gen.root.xattrs:
        root["xattrs"] = [[n.hex(), base64.b64encode(v).decode()] for n, v in gen.root.xattrs]
    doc: dict[str, object] = {
        "version": 2 if gen.checkpoint else 1,
        "name": gen.name,
        "time_ms": gen.time_ms,
        "backup_name": gen.backup_name,
        "host": gen.host,
        "directory": gen.directory,
        "root": root,
        "identity": None if gen.identity is None else {
            "node_id": gen.identity.node_id, "uuid": gen.identity.uuid},
        "stats": gen.stats,
    }
    if gen.checkpoint:
        doc["checkpoint"] = {"base": gen.base}
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


_SAFE_ID = re.compile(r"^[0-9A-Za-z._-]{1,100}$")


def decode_generation(data: bytes, file_name: str) -> Generation:
    """Parses a generation plaintext and checks it belongs to the file `file_name`."""
    try:
        doc = json.loads(data)
        if type(doc["version"]) is not int or doc["version"] not in GENERATION_PLAIN_VERSIONS:
            raise IntegrityError(f"generation {file_name}: unsupported version {doc['version']}")
        if doc["name"] != file_name:
            raise IntegrityError(f"generation {file_name}: contents belong to {doc['name']!r}")
        r = doc["root"]
        xattrs = tuple((bytes.fromhex(n), base64.b64decode(v, validate=True))
                       for n, v in r.get("xattrs", ()))
        check_xattrs(xattrs)
        root = RootAttrs(int(r["mode"]) & 0o7777, int(r["uid"]), int(r["gid"]),
                         int(r["mtime_ns"]), Ref.from_hex(r["tree"]), xattrs)
        ident = doc.get("identity")
        identity = None
        if ident is not None:
            node_id, uuid = str(ident["node_id"]), str(ident["uuid"])
            if _SAFE_ID.match(node_id) and _SAFE_ID.match(uuid):
                identity = Identity(node_id, uuid)
        stats = {str(k): int(v) for k, v in dict(doc.get("stats", {})).items()}
        checkpoint, base = False, None
        if doc["version"] == 2:
            cp = doc.get("checkpoint")
            if not isinstance(cp, dict):
                raise IntegrityError(f"generation {file_name} is malformed: a version 2 "
                                     "generation without its checkpoint")
            checkpoint = True
            base = cp.get("base")
            if base is not None and not GENERATION_NAME.match(str(base)):
                raise IntegrityError(f"generation {file_name} is malformed: bad checkpoint base")
        return Generation(file_name, int(doc["time_ms"]), str(doc["backup_name"]),
                          str(doc.get("host", "")), str(doc.get("directory", "")),
                          root, identity, stats, checkpoint, base)
    except IntegrityError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError, binascii.Error) as exc:
        raise IntegrityError(f"generation {file_name} is malformed: {exc}") from None
