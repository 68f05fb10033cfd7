"""Byte layouts (docs/FORMAT.md 3, 6.1, 7): golden vectors written by hand from the spec, and
a decoder that rejects every malformed tree or generation with IntegrityError."""
from __future__ import annotations

import json
import struct
from dataclasses import replace

import pytest

from humiofs.errors import IntegrityError
from humiofs.store import format
from humiofs.store.format import (
    DIR,
    FILE,
    SYMLINK,
    Entry,
    FileRow,
    Generation,
    Identity,
    Ref,
    RootAttrs,
    decode_generation,
    decode_tree,
    decode_tree_rows,
    encode_generation,
    encode_tree,
)

PACK = bytes(range(16))
OID = bytes(range(16, 32))
DATA_REF = Ref(PACK, OID, 8, 4196 + 16, 4196)
SUB_REF = Ref(bytes(range(32, 48)), bytes(range(48, 64)), 123456789, 300 + 16, 300)

# FORMAT.md 6.1, field by field: pack id, object id, offset, stored length, plaintext length.
DATA_REF_HEX = ("000102030405060708090a0b0c0d0e0f"
                "101112131415161718191a1b1c1d1e1f"
                "0000000000000008"
                "0000000000001074"
                "0000000000001064")


def test_ref_golden() -> None:
    assert DATA_REF.encode().hex() == DATA_REF_HEX
    assert len(DATA_REF.encode()) == format.REF_LEN == 56
    assert Ref.decode(bytes.fromhex(DATA_REF_HEX)) == DATA_REF
    assert Ref.from_hex(DATA_REF.hex()) == DATA_REF


def test_ref_rejects_header_offset_and_bad_lengths() -> None:
    raw = bytearray(DATA_REF.encode())
    raw[32:40] = struct.pack(">Q", 7)
    with pytest.raises(IntegrityError):
        Ref.decode(bytes(raw))
    with pytest.raises(IntegrityError):
        Ref.decode(DATA_REF.encode()[:-1])
    with pytest.raises(IntegrityError):
        Ref.from_hex("zz" * 56)


# -- hand-built tree bytes (FORMAT.md 7.1) -------------------------------------------------------

# The version the helpers below build; the version 1 tests set it to 1 (see v1 below).
VERSION = 2


def raw_time(ns: int) -> bytes:
    """A version 2 time: signed seconds, then nanoseconds (a POSIX timespec)."""
    sec, nsec = divmod(ns, 10**9)
    return struct.pack(">q", sec) + struct.pack(">I", nsec)


def raw_xattrs(xattrs: list[tuple[bytes, bytes]]) -> bytes:
    out = struct.pack(">H", len(xattrs))
    for name, value in xattrs:
        out += struct.pack(">B", len(name)) + name + struct.pack(">I", len(value)) + value
    return out


def raw_head(name: bytes, etype: int, mode: int = 0o644, uid: int = 1000, gid: int = 1001,
             mtime: int = 1_700_000_000_123_456_789, ctime: int = 1_700_000_001_000_000_000,
             ino: int = 4242, size: int = 0, nlink: int | None = None,
             xattrs: list[tuple[bytes, bytes]] | None = None, version: int | None = None
             ) -> bytes:
    head = (struct.pack(">H", len(name)) + name + struct.pack(">B", etype)
            + struct.pack(">I", mode) + struct.pack(">I", uid) + struct.pack(">I", gid))
    if (version or VERSION) == 1:
        return (head + struct.pack(">q", mtime) + struct.pack(">q", ctime)
                + struct.pack(">Q", ino) + struct.pack(">Q", size))
    if nlink is None:
        nlink = 2 if etype == DIR else 1
    return (head + struct.pack(">I", nlink) + raw_time(mtime) + raw_time(ctime)
            + struct.pack(">Q", ino) + struct.pack(">Q", size) + raw_xattrs(xattrs or []))


def raw_file(name: bytes, extents: list[tuple[int, int]], ref: Ref | None, size: int,
             **kw: object) -> bytes:
    body = b"\x00" if ref is None else b"\x01" + ref.encode()
    body += struct.pack(">I", len(extents))
    for off, length in extents:
        body += struct.pack(">Q", off) + struct.pack(">Q", length)
    return raw_head(name, FILE, size=size, **kw) + body  # type: ignore[arg-type]


def raw_dir(name: bytes, ref: Ref, **kw: object) -> bytes:
    return raw_head(name, DIR, **kw) + ref.encode()  # type: ignore[arg-type]


def raw_symlink(name: bytes, target: bytes, **kw: object) -> bytes:
    return (raw_head(name, SYMLINK, **kw)  # type: ignore[arg-type]
            + struct.pack(">H", len(target)) + target)


def raw_tree(*entries: bytes, version: int | None = None, count: int | None = None,
             magic: bytes = b"HT") -> bytes:
    n = len(entries) if count is None else count
    return (magic + struct.pack(">B", version or VERSION) + struct.pack(">I", n)
            + b"".join(entries))


def small_ref(plain_len: int) -> Ref:
    return Ref(PACK, OID, 8, plain_len + 16, plain_len)


GOLDEN_ENTRIES = [
    Entry(b"a.seg", FILE, 0o644, 1000, 1001, 1_700_000_000_123_456_789,
          1_700_000_001_000_000_000, 4242, 10000, data=DATA_REF,
          extents=((0, 4096), (8192, 100))),
    Entry(b"dir", DIR, 0o755, 0, 0, 5, 6, 7, 0, subtree=SUB_REF, nlink=2),
    Entry(b"empty", FILE, 0o600, 1, 2, 3, 4, 5, 0),
    Entry(b"hole", FILE, 0o640, 1, 2, 3, 4, 6, 1 << 20),
    Entry(b"link", SYMLINK, 0o777, 0, 0, -1_000_000_000, 8, 9, 16, target=b"humiodata.2024-x"),
    Entry("notes-ü.txt".encode(), FILE, 0o644, 0, 0, 1, 1, 1, 3, data=small_ref(3),
          extents=((0, 3),)),
]

def golden_tree(version: int | None = None) -> bytes:
    v = version
    return raw_tree(
        raw_file(b"a.seg", [(0, 4096), (8192, 100)], DATA_REF, 10000, version=v),
        raw_dir(b"dir", SUB_REF, mode=0o755, uid=0, gid=0, mtime=5, ctime=6, ino=7, size=0,
                version=v),
        raw_file(b"empty", [], None, 0, mode=0o600, uid=1, gid=2, mtime=3, ctime=4, ino=5,
                 version=v),
        raw_file(b"hole", [], None, 1 << 20, mode=0o640, uid=1, gid=2, mtime=3, ctime=4, ino=6,
                 version=v),
        raw_symlink(b"link", b"humiodata.2024-x", mode=0o777, uid=0, gid=0,
                    mtime=-1_000_000_000, ctime=8, ino=9, size=16, version=v),
        raw_file("notes-ü.txt".encode(), [(0, 3)], small_ref(3), 3, mode=0o644, uid=0, gid=0,
                 mtime=1, ctime=1, ino=1, version=v),
        version=v)


GOLDEN_TREE = golden_tree()

# Version 2 only: far-future and pre-1970 times, hard links, special files, xattrs.
Y2300_NS = 10_413_792_000 * 10**9 + 7          # 2300-01-01T00:00:00.000000007Z
Y1901_NS = -2_177_452_800 * 10**9 + 999_999_999  # 1901-01-01T00:00:00.999999999Z
XATTRS = ((b"security.selinux", b"system_u:object_r:var_t:s0\0"), (b"user.empty", b""),
          (b"user.k", bytes(range(256))))
GOLDEN_V2_ENTRIES = [
    Entry(b"dev", format.CHR, 0o600, 0, 6, Y1901_NS, Y2300_NS, 11, 0, rdev=(1, 3)),
    Entry(b"disk", format.BLK, 0o660, 0, 6, 0, 0, 12, 0, rdev=(259, 65536), nlink=2),
    Entry(b"far", FILE, 0o644, 0, 0, Y2300_NS, Y2300_NS, 13, 3, data=small_ref(3),
          extents=((0, 3),), nlink=3, xattrs=XATTRS),
    Entry(b"pipe", format.FIFO, 0o640, 5, 5, -1, 1, 14, 0),
    Entry(b"sub", DIR, 0o755, 0, 0, 1, 1, 15, 0, subtree=SUB_REF, nlink=7,
          xattrs=XATTRS[:1]),
]
GOLDEN_V2_TREE = raw_tree(
    raw_head(b"dev", format.CHR, mode=0o600, uid=0, gid=6, mtime=Y1901_NS, ctime=Y2300_NS,
             ino=11) + struct.pack(">II", 1, 3),
    raw_head(b"disk", format.BLK, mode=0o660, uid=0, gid=6, mtime=0, ctime=0, ino=12,
             nlink=2) + struct.pack(">II", 259, 65536),
    raw_file(b"far", [(0, 3)], small_ref(3), 3, mode=0o644, uid=0, gid=0, mtime=Y2300_NS,
             ctime=Y2300_NS, ino=13, nlink=3, xattrs=list(XATTRS)),
    raw_head(b"pipe", format.FIFO, mode=0o640, uid=5, gid=5, mtime=-1, ctime=1, ino=14),
    raw_dir(b"sub", SUB_REF, mode=0o755, uid=0, gid=0, mtime=1, ctime=1, ino=15, nlink=7,
            xattrs=list(XATTRS[:1])),
)


def test_tree_golden_encode() -> None:
    assert encode_tree(GOLDEN_ENTRIES) == GOLDEN_TREE
    assert encode_tree(GOLDEN_V2_ENTRIES) == GOLDEN_V2_TREE


def test_tree_golden_prefix_literal() -> None:
    # The first entry's head as literal hex, in case raw_head itself drifted from the spec:
    # "HT", version 2, count 6 | name_len 5, "a.seg", type 1, mode 0o644, uid 1000, gid 1001,
    # nlink 1, mtime 1700000000 s 123456789 ns.
    assert GOLDEN_TREE[:43].hex() == ("4854" "02" "00000006"
                                      "0005" "612e736567" "01" "000001a4" "000003e8" "000003e9"
                                      "00000001" "000000006553f100" "075bcd15")
    # A pre-1970 time: -0.000000001 s is second -1 and nanosecond 999999999.
    pipe = GOLDEN_V2_TREE.index(b"pipe") + 4 + 1 + 12 + 4
    assert GOLDEN_V2_TREE[pipe:pipe + 12].hex() == "ffffffffffffffff" "3b9ac9ff"


def test_tree_golden_decode() -> None:
    assert decode_tree(GOLDEN_TREE) == GOLDEN_ENTRIES
    assert decode_tree(GOLDEN_V2_TREE) == GOLDEN_V2_ENTRIES


def test_decoded_entries_are_frozen_entries() -> None:
    # The decoder builds entries its own fast way (format._NewEntry): what comes out must be
    # exactly what the constructor gives, immutable and hashable alike.
    for decoded, built in zip(decode_tree(GOLDEN_V2_TREE), GOLDEN_V2_ENTRIES, strict=True):
        assert type(decoded) is Entry and decoded == built and hash(decoded) == hash(built)
        assert decoded.data is None or type(decoded.data) is Ref
        assert decoded.subtree is None or type(decoded.subtree) is Ref
        with pytest.raises(AttributeError):
            decoded.name = b"other"  # type: ignore[misc]
        assert replace(decoded, mode=0o600).mode == 0o600


def test_tree_rows_are_the_decoded_entries() -> None:
    """decode_tree_rows: the entries decode_tree gives, the common file (data in one extent,
    one name, no xattrs) as a FileRow whose entry() is that very Entry."""
    plain = Entry(b"plain", FILE, 0o640, 7, 8, -5, 6, 9, 3, data=small_ref(3), extents=((0, 3),))
    tagged = replace(plain, name=b"tagged", xattrs=XATTRS)
    linked = replace(plain, name=b"twice", nlink=2)
    trees = [GOLDEN_TREE, golden_tree(1), GOLDEN_V2_TREE, encode_tree([plain, tagged, linked])]
    for data in trees:
        rows = decode_tree_rows(data)
        built = [r.entry() if isinstance(r, FileRow) else r for r in rows]
        assert built == decode_tree(data)
        for r, e in zip(rows, built, strict=True):
            assert isinstance(r, FileRow) == (e.type == FILE and len(e.extents) == 1 and
                                              e.nlink == 1 and not e.xattrs), e
            assert type(e) is Entry and (e.data is None or type(e.data) is Ref)
    assert [type(r) for r in decode_tree_rows(trees[-1])] == [FileRow, Entry, Entry]
    assert [type(r) for r in decode_tree_rows(GOLDEN_TREE)] == [Entry] * 5 + [FileRow]


@pytest.mark.parametrize("body", [
    ([(0, 3)], small_ref(4), 3),        # the data longer than its extent
    ([(0, 4)], small_ref(4), 3),        # the extent past the end of the file
    ([(0, 3)], Ref(PACK, OID, 7, 19, 3), 3),   # the data inside a pack header
])
def test_tree_rows_check_the_common_file(body: tuple[list[tuple[int, int]], Ref, int]) -> None:
    data = raw_tree(raw_file(b"a", *body))
    for decode in (decode_tree, decode_tree_rows):
        with pytest.raises(IntegrityError):
            decode(data)


def test_tree_version_1_still_reads() -> None:
    # Stores written before version 2 hold version 1 trees (FORMAT.md 7.1.1).
    v1 = golden_tree(version=1)
    assert v1[2] == 1
    assert decode_tree(v1) == [replace(e, nlink=1) for e in GOLDEN_ENTRIES]
    assert [e.nlink for e in decode_tree(v1)] == [1] * 6
    with pytest.raises(IntegrityError, match="unknown type"):
        decode_tree(raw_tree(raw_head(b"p", format.FIFO, version=1), version=1))


@pytest.mark.parametrize("ns", [Y2300_NS, Y1901_NS, 2**63 + 5, -(2**63) - 5, 0, -1,
                                 (2**63 - 1) * 10**9 + 999_999_999])
def test_times_round_trip(ns: int) -> None:
    e = Entry(b"x", FILE, 0o644, 0, 0, ns, ns, 1, 0)
    assert decode_tree(encode_tree([e])) == [e]


def test_time_beyond_the_format_is_a_value_error() -> None:
    e = Entry(b"x", FILE, 0o644, 0, 0, 2**63 * 10**9, 0, 1, 0)
    with pytest.raises(ValueError):
        encode_tree([e])


def test_rejects_bad_nanoseconds_and_xattrs() -> None:
    bad = bytearray(raw_tree(f(b"a")))
    at = 7 + 2 + 1 + 1 + 12 + 4 + 8
    bad[at:at + 4] = struct.pack(">I", 10**9)
    with pytest.raises(IntegrityError, match="time"):
        decode_tree(bytes(bad))
    for xattrs in ([(b"user.b", b""), (b"user.a", b"")], [(b"user.a", b""), (b"user.a", b"")],
                   [(b"", b"v")], [(b"user.\0", b"")], [(b"user.big", b"x" * 65537)]):
        with pytest.raises(IntegrityError, match="attribute"):
            decode_tree(raw_tree(raw_file(b"a", [], None, 0, xattrs=xattrs)))


def test_link_key() -> None:
    far = GOLDEN_V2_ENTRIES[2]
    assert far.link_key() is not None
    assert GOLDEN_V2_ENTRIES[0].link_key() is None        # nlink 1
    assert GOLDEN_V2_ENTRIES[4].link_key() is None        # a folder
    assert replace(far, name=b"other").link_key() == far.link_key()
    assert replace(far, mtime_ns=1).link_key() != far.link_key()


def test_tree_empty() -> None:
    assert encode_tree([]) == b"HT\x02\x00\x00\x00\x00"
    assert decode_tree(b"HT\x02\x00\x00\x00\x00") == []
    assert decode_tree(b"HT\x01\x00\x00\x00\x00") == []


def test_tree_deterministic() -> None:
    assert encode_tree(list(GOLDEN_ENTRIES)) == encode_tree(list(GOLDEN_ENTRIES))


def test_entry_data_bytes() -> None:
    assert GOLDEN_ENTRIES[0].data_bytes == 4196
    assert GOLDEN_ENTRIES[3].data_bytes == 0


# -- rejections --------------------------------------------------------------------------------

def f(name: bytes) -> bytes:
    return raw_file(name, [(0, 3)], small_ref(3), 3)


@pytest.mark.parametrize("names", [[b"b", b"a"], [b"a", b"a"], [b"a", b"B"]])
def test_rejects_unsorted_or_duplicate(names: list[bytes]) -> None:
    with pytest.raises(IntegrityError, match="sorted"):
        decode_tree(raw_tree(*(f(n) for n in names)))


@pytest.mark.parametrize("name", [b".", b"..", b"a/b", b"/etc", b"../x", b"a\0b", b"",
                                  b"x" * 256])
def test_rejects_unsafe_names(name: bytes) -> None:
    with pytest.raises(IntegrityError):
        decode_tree(raw_tree(f(name)))


def test_accepts_longest_and_odd_names() -> None:
    entries = decode_tree(raw_tree(f(b"..."), f(b".x"), f(b"x" * 255), f(b"\xff\xfe")))
    assert [e.name for e in entries] == [b"...", b".x", b"x" * 255, b"\xff\xfe"]


# An entry after the one tested: the decoder reads a file with data in one extent in a single
# unpack when the tree is long enough for it (format._FILE_1), so each case is tried both ways.
TAILS = [(), (raw_file(b"z", [], None, 0),)]


@pytest.mark.parametrize("extents,size,plain", [
    ([(0, 10), (5, 10)], 100, 20),        # overlap
    ([(50, 10), (0, 10)], 100, 20),       # out of order
    ([(0, 10), (10, 0)], 100, 10),        # empty extent
    ([(95, 10)], 100, 10),                # beyond the size
    ([(5, 0)], 100, 0),                   # the one extent empty
    ([(0, 10)], 100, 11),                 # sum != plaintext length
    ([(0, 10), (20, 10)], 100, 10),       # sum != plaintext length
    ([(2**64 - 1, 1)], 2**63, 1),         # offset overflow
])
@pytest.mark.parametrize("tail", TAILS)
def test_rejects_bad_extents(extents: list[tuple[int, int]], size: int, plain: int,
                             tail: tuple[bytes, ...]) -> None:
    with pytest.raises(IntegrityError):
        decode_tree(raw_tree(raw_file(b"a", extents, small_ref(plain), size), *tail))


@pytest.mark.parametrize("tail", TAILS)
def test_rejects_extents_without_data_and_data_without_extents(tail: tuple[bytes, ...]) -> None:
    with pytest.raises(IntegrityError):
        decode_tree(raw_tree(raw_file(b"a", [(0, 10)], None, 100), *tail))
    with pytest.raises(IntegrityError):
        decode_tree(raw_tree(raw_file(b"a", [], small_ref(0), 100), *tail))


@pytest.mark.parametrize("tail", TAILS)
def test_files_with_one_or_more_extents_read_alike(tail: tuple[bytes, ...]) -> None:
    one = Entry(b"a", FILE, 0o644, 1000, 1001, 1_700_000_000_123_456_789,
                1_700_000_001_000_000_000, 4242, 100, data=small_ref(10), extents=((5, 10),))
    two = replace(one, name=b"b", data=small_ref(20), extents=((0, 10), (50, 10)))
    for e in (one, two):
        tree = raw_tree(raw_file(e.name, list(e.extents), e.data, e.size), *tail)
        assert decode_tree(tree)[0] == e


def test_rejects_trailing_bytes() -> None:
    with pytest.raises(IntegrityError, match="trailing"):
        decode_tree(GOLDEN_TREE + b"\0")


def test_rejects_every_truncation() -> None:
    for tree in (GOLDEN_TREE, GOLDEN_V2_TREE, golden_tree(version=1)):
        for n in range(len(tree)):
            with pytest.raises(IntegrityError):
                decode_tree(tree[:n])


def test_rejects_count_beyond_entries() -> None:
    with pytest.raises(IntegrityError):
        decode_tree(raw_tree(f(b"a"), count=2))


def test_rejects_unknown_type() -> None:
    for etype in (0, 7, 255):
        entry = raw_head(b"a", etype) + b"\0" * 8
        with pytest.raises(IntegrityError, match="unknown type"):
            decode_tree(raw_tree(entry))


def test_rejects_version_and_magic() -> None:
    with pytest.raises(IntegrityError, match="version"):
        decode_tree(raw_tree(f(b"a"), version=3))
    with pytest.raises(IntegrityError):
        decode_tree(raw_tree(f(b"a"), magic=b"TH"))


def test_rejects_bad_mode_flag_and_symlink_target() -> None:
    with pytest.raises(IntegrityError):
        decode_tree(raw_tree(raw_head(b"a", DIR, mode=0o10000) + SUB_REF.encode()))
    bad_flag = bytearray(raw_file(b"a", [(0, 3)], small_ref(3), 3))
    bad_flag[len(raw_head(b"a", FILE, size=3))] = 2
    with pytest.raises(IntegrityError):
        decode_tree(raw_tree(bytes(bad_flag)))
    for target in (b"", b"a\0b"):
        with pytest.raises(IntegrityError):
            decode_tree(raw_tree(raw_symlink(b"l", target)))


@pytest.mark.parametrize("tail", TAILS)
def test_rejects_ref_into_header(tail: tuple[bytes, ...]) -> None:
    with pytest.raises(IntegrityError):
        decode_tree(raw_tree(raw_dir(b"d", Ref(PACK, OID, 0, 16, 0))))
    with pytest.raises(IntegrityError, match="pack header"):
        decode_tree(raw_tree(raw_file(b"a", [(0, 10)], Ref(PACK, OID, 7, 26, 10), 10), *tail))


# -- file headers ------------------------------------------------------------------------------

def test_header() -> None:
    assert format.header(format.TYPE_PACK, 1) == b"HUMIOFP\x01"
    assert format.header(format.TYPE_GENERATION, 1) == b"HUMIOFG\x01"
    format.check_header(b"HUMIOFP\x01rest", format.TYPE_PACK, 1, "x")
    for bad in (b"HUMIOFG\x01", b"HUMIOXP\x01", b"HUMIOFP\x02", b"HUMIO"):
        with pytest.raises(IntegrityError, match="pack 12"):
            format.check_header(bad, format.TYPE_PACK, 1, "pack 12")


# -- generations (FORMAT.md 7.2) -----------------------------------------------------------------

NAME = "1764000000000-0123456789abcdef"


def generation(name: str = NAME) -> Generation:
    return Generation(name=name, time_ms=1764000000000, backup_name="node1", host="h",
                      directory="/data/humio-data",
                      root=RootAttrs(0o755, 0, 0, 123, SUB_REF),
                      identity=Identity("1", "cd613e30-d8f1-4adf-91b7-584a2265b1f5"),
                      stats={"files": 1, "dirs": 2, "symlinks": 3, "bytes": 4, "data_bytes": 5})


def test_generation_round_trip_and_layout() -> None:
    raw = encode_generation(generation())
    doc = json.loads(raw)
    assert doc == {
        "version": 1, "name": NAME, "time_ms": 1764000000000, "backup_name": "node1",
        "host": "h", "directory": "/data/humio-data",
        "root": {"mode": 0o755, "uid": 0, "gid": 0, "mtime_ns": 123, "tree": SUB_REF.hex()},
        "identity": {"node_id": "1", "uuid": "cd613e30-d8f1-4adf-91b7-584a2265b1f5"},
        "stats": {"files": 1, "dirs": 2, "symlinks": 3, "bytes": 4, "data_bytes": 5}}
    assert len(doc["root"]["tree"]) == 112
    assert decode_generation(raw, NAME) == generation()


def test_generation_root_xattrs_and_times() -> None:
    gen = generation()
    root = RootAttrs(0o700, 0, 0, Y2300_NS, SUB_REF, XATTRS)
    gen = Generation(gen.name, gen.time_ms, gen.backup_name, gen.host, gen.directory, root,
                     None, {})
    raw = encode_generation(gen)
    assert json.loads(raw)["root"]["xattrs"][0] == [b"security.selinux".hex(),
                                                    "c3lzdGVtX3U6b2JqZWN0X3I6dmFyX3Q6czAA"]
    assert decode_generation(raw, NAME) == gen
    # Generations of humiofs 0.1 have no xattrs member.
    doc = json.loads(raw)
    del doc["root"]["xattrs"]
    assert decode_generation(json.dumps(doc).encode(), NAME).root.xattrs == ()
    doc["root"]["xattrs"] = [["75736572", "not base64!"]]
    with pytest.raises(IntegrityError):
        decode_generation(json.dumps(doc).encode(), NAME)


def test_generation_name_mismatch() -> None:
    other = "1764000000001-0123456789abcdef"
    with pytest.raises(IntegrityError, match="belong"):
        decode_generation(encode_generation(generation()), other)


def test_generation_ignores_unknown_members() -> None:
    doc = json.loads(encode_generation(generation()))
    doc["future"] = {"x": 1}
    assert decode_generation(json.dumps(doc).encode(), NAME) == generation()


@pytest.mark.parametrize("mutate", [
    lambda d: d.update(version=2),
    lambda d: d.pop("root"),
    lambda d: d["root"].update(tree="00"),
    lambda d: d["root"].update(mode="x"),
    lambda d: d.update(stats=[1]),
])
def test_generation_rejects_malformed(mutate: object) -> None:
    doc = json.loads(encode_generation(generation()))
    mutate(doc)  # type: ignore[operator]
    with pytest.raises(IntegrityError):
        decode_generation(json.dumps(doc).encode(), NAME)


@pytest.mark.parametrize("raw", [b"", b"not json", b"[1, 2]", b"\xff\xfe", b"null"])
def test_generation_rejects_garbage(raw: bytes) -> None:
    with pytest.raises(IntegrityError):
        decode_generation(raw, NAME)


def test_generation_drops_unsafe_identity() -> None:
    doc = json.loads(encode_generation(generation()))
    doc["identity"]["node_id"] = "../../etc"
    assert decode_generation(json.dumps(doc).encode(), NAME).identity is None


def test_generation_time() -> None:
    assert format.generation_time(NAME) == 1764000000000
    for bad in ("176400000000-0123456789abcdef", NAME + "x", "x" + NAME, "config"):
        with pytest.raises(IntegrityError):
            format.generation_time(bad)


def test_identity_seed_name() -> None:
    assert Identity("3", "u-1").seed_name == b"cluster_membership-3-u-1.uuid"
