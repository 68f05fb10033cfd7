#!/usr/bin/env python3
"""Writes the test vectors of docs/FORMAT.md (section 11): a tiny store, `vectornode/`, and
`expected.json`, what each of its objects decrypts to.

Every value that a writer draws at random (store id, key id, salt, nonce, master key, pack
ids, object ids, generation suffixes) is fixed here instead: `fixed(label, n)` is the first
`n` bytes of SHA-256("humiofs test vector: " + label). The library writes the objects, with
these values handed to it in place of the OS CSPRNG (`draws`), so the vectors are what
humiofs writes. Running this again gives the same bytes; tests/test_vectors.py checks that,
decodes the store with the library, and decodes it again with a reader written from
FORMAT.md alone.

    .venv/bin/python tests/vectors/make_vectors.py [OUTPUT_DIR]   (default: tests/vectors)
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import itertools
import json
import shutil
import struct
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

from humiofs.store import crypto, format, keys
from humiofs.store.format import (
    BLK,
    CHR,
    DIR,
    FIFO,
    FILE,
    SYMLINK,
    Entry,
    Generation,
    Identity,
    Ref,
    RootAttrs,
)
from humiofs.store.repository import Store

PASSPHRASE = "humiofs test vector ключ"
# The cheapest Argon2id parameters a reader accepts (FORMAT.md 4.2), so the vectors open fast.
KDF = keys.KdfParams(iterations=2, memory_kib=19456, lanes=1)
STORE_NAME = "vectornode"
CREATED_MS = 1764000000000
GEN_TIMES = (1764000000000, 1764000060000)


# How BACKUP_KEY values read (FORMAT.md 4.4): (source, the value as the source holds it, the
# canonical passphrase). Written by hand from FORMAT.md, not computed: the tests check that
# the library agrees.
PASSPHRASE_FORMS = [
    ("env_file", 'BACKUP_KEY=my key', "my key"),
    ("env_file", 'BACKUP_KEY=" my key "', " my key "),
    ("env_file", "  export BACKUP_KEY='my key'  ", "my key"),
    ("env_file", "BACKUP_KEY=C:\\keys\\prod", "C:\\keys\\prod"),
    ("env_file", "BACKUP_KEY=\"'quoted'\"", "'quoted'"),
    ("env_file", "BACKUP_KEY=a=b # not a comment", "a=b # not a comment"),
    ("env_file", "BACKUP_KEY=\"open", "\"open"),
    ("env_file", "BACKUP_KEY=\u00a0key\u3000", "key"),
    ("environment", "\tmy key\n", "my key"),
    ("environment", '"my key"', "my key"),
    ("key_file", "my key \r\nsecond line\n", "my key"),
    ("key_file", "\"my key\"\n", "my key"),
    ("key_file", "key\u2028still the first line\n", "key\u2028still the first line"),
    ("key_file", "\ufeffkey\n", "key"),
    ("key_file", "\ufeff \"key\" \n", "key"),
]


def fixed(label: str, n: int) -> bytes:
    """The value standing in for `n` random bytes: SHA-256 of the label, cut to `n`."""
    return hashlib.sha256(b"humiofs test vector: " + label.encode()).digest()[:n]


@contextmanager
def draws(*values: bytes) -> Iterator[None]:
    """Hands `values` to the library, in order, in place of os.urandom; fails if it draws
    more, fewer or other sizes. 8-byte draws (temporary names under tmp/, which no reader
    sees) get a counter."""
    queue = list(values)
    counter = itertools.count()

    def urandom(n: int) -> bytes:
        if n == 8:
            return next(counter).to_bytes(8, "big")
        if not queue:
            raise AssertionError(f"unexpected draw of {n} random bytes")
        value = queue.pop(0)
        if len(value) != n:
            raise AssertionError(f"a draw of {n} bytes, but {len(value)} were planned")
        return value

    with mock.patch("os.urandom", urandom):
        yield
    if queue:
        raise AssertionError(f"{len(queue)} planned draws were not made")


def pattern(n: int, seed: int) -> bytes:
    """Test data: byte i is (i * 7 + seed) mod 251."""
    return bytes((i * 7 + seed) % 251 for i in range(n))


class Writer:
    """Writes blobs into packs and generations, with fixed ids."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.blob_no = 0

    def pack(self, label: str, blobs: list[tuple[int, bytes]]) -> list[Ref]:
        """One pack holding `blobs` (kind, plaintext) back to back."""
        oids = []
        for _ in blobs:
            self.blob_no += 1
            oids.append(fixed(f"object {self.blob_no}", 16))
        with draws(fixed(f"pack {label}", 16), *oids):
            pw = self.store.new_pack()
            refs = [pw.add(kind, plain) for kind, plain in blobs]
            pw.finish()
        return refs

    def generation(self, gen: Generation, label: str) -> None:
        with draws(fixed(f"generation object {label}", 16)):
            self.store.commit_generation(gen)


def tree_v1(entries: list[tuple[bytes, int, int, int, int, int, int, int, int, bytes]]) -> bytes:
    """A version 1 tree (FORMAT.md 7.1.1), which humiofs no longer writes: entries of
    (name, type, mode, uid, gid, mtime_ns, ctime_ns, ino, size, body)."""
    out = [b"HT", bytes((1,)), struct.pack(">I", len(entries))]
    for name, etype, mode, uid, gid, mtime, ctime, ino, size, body in entries:
        out.append(struct.pack(">H", len(name)) + name)
        out.append(struct.pack(">BIIIqqQQ", etype, mode, uid, gid, mtime, ctime, ino, size))
        out.append(body)
    return b"".join(out)


def file_body(ref: Ref | None, extents: list[tuple[int, int]]) -> bytes:
    head = b"\0" if ref is None else b"\1" + ref.encode()
    return head + struct.pack(">I", len(extents)) + b"".join(
        struct.pack(">QQ", o, n) for o, n in extents)


T0 = 1735787045_123456789       # 2025-01-02T03:04:05.123456789Z


def build(out: Path) -> dict[str, object]:
    """Writes the store under `out`; returns what expected.json describes beyond the store."""
    path = out / STORE_NAME
    if path.exists():
        shutil.rmtree(path)
    for sub in ("keys", "generations", "tmp"):
        (path / sub).mkdir(parents=True)
    for i in range(256):
        (path / "packs" / f"{i:02x}").mkdir(parents=True)
    store_id, master = fixed("store id", 16), fixed("master key", 32)
    config = {"format": "humiofs-store", "version": 1, "store_id": store_id.hex(),
              "created_ms": CREATED_MS}
    (path / "config").write_bytes(json.dumps(config).encode() + b"\n")    # as Store.create
    with draws(fixed("salt", 16), fixed("nonce", 12)), \
            mock.patch("time.time", return_value=CREATED_MS / 1000):
        keyfile = keys.wrap(master, store_id, PASSPHRASE, KDF)
    key_name = fixed("key id", 16).hex()
    (path / "keys" / key_name).write_bytes(keyfile)
    store = Store(path, store_id, master, PASSPHRASE)
    w = Writer(store)

    # Data: one pack of small blobs, and a sparse file's two extents as one blob of two chunks.
    hello, again = b"hello, humiofs\n", b"hello again\n"
    latin, linked, nested, v1data = (b"a name that is not UTF-8\n", b"two names, one inode\n",
                                     b"in a subfolder\n", b"from a version 1 tree\n")
    sparse = pattern(70005, 1)
    r_hello, r_latin, r_linked, r_nested, r_v1 = w.pack("data 1", [
        (crypto.KIND_DATA, x) for x in (hello, latin, linked, nested, v1data)])
    (r_sparse,) = w.pack("data 2", [(crypto.KIND_DATA, sparse)])

    # Trees of generation 1: the root and dir/ are version 2 trees, old/ a version 1 tree.
    dir_tree = format.encode_tree([
        Entry(b"link-up", SYMLINK, 0o777, 1000, 1000, T0, T0, 21, 8, target=b"../a.txt"),
        Entry(b"nested.txt", FILE, 0o600, 1000, 1000, T0, T0, 22, len(nested), r_nested,
              ((0, len(nested)),), xattrs=((b"user.comment", b"vector"),
                                           (b"user.empty", b""))),
    ])
    old_tree = tree_v1([
        (b"v1file", FILE, 0o644, 0, 0, T0, T0, 31, len(v1data),
         file_body(r_v1, [(0, len(v1data))])),
        (b"v1link", SYMLINK, 0o777, 0, 0, -1, -1, 32, 6,
         struct.pack(">H", 6) + b"v1file"),
    ])
    r_dir, r_old = w.pack("trees 1", [(crypto.KIND_TREE, dir_tree), (crypto.KIND_TREE, old_tree)])
    common = [
        Entry(b"dev-null", CHR, 0o666, 0, 0, T0, T0, 13, 0, nlink=1, rdev=(1, 3)),
        Entry(b"dir", DIR, 0o2750, 1000, 1000, T0, T0, 14, 0, subtree=r_dir, nlink=2),
        Entry(b"disk", BLK, 0o660, 0, 6, T0, T0, 15, 0, rdev=(8, 0)),
        Entry(b"empty", FILE, 0o644, 0, 0, -500_000_000, 0, 16, 0),
        Entry(b"fifo", FIFO, 0o600, 0, 0, T0, T0, 17, 0),
        Entry(b"hard1", FILE, 0o640, 0, 0, T0, T0, 18, len(linked), r_linked,
              ((0, len(linked)),), nlink=2),
        Entry(b"hard2", FILE, 0o640, 0, 0, T0, T0, 18, len(linked), r_linked,
              ((0, len(linked)),), nlink=2),
        Entry(b"old", DIR, 0o755, 0, 0, T0, T0, 19, 0, subtree=r_old, nlink=2),
        Entry(b"sparse.bin", FILE, 0o644, 0, 0, T0, T0, 20, 300000, r_sparse,
              ((0, 5), (196608, 70000))),
    ]
    a1 = Entry(b"a.txt", FILE, 0o644, 0, 0, T0, T0, 11, len(hello), r_hello,
               ((0, len(hello)),))
    cafe = Entry(b"caf\xe9", FILE, 0o644, 0, 0, T0, T0, 12, len(latin), r_latin,
                 ((0, len(latin)),))
    root1 = format.encode_tree(sorted([a1, cafe] + common, key=lambda e: e.name))
    (r_root1,) = w.pack("trees 2", [(crypto.KIND_TREE, root1)])

    # Generation 2: a.txt changed, caf\xe9 deleted; every other entry and subtree reused.
    (r_again,) = w.pack("data 3", [(crypto.KIND_DATA, again)])
    a2 = Entry(b"a.txt", FILE, 0o644, 0, 0, T0 + 60 * 10**9, T0 + 60 * 10**9, 11, len(again),
               r_again, ((0, len(again)),))
    root2 = format.encode_tree(sorted([a2] + common, key=lambda e: e.name))
    (r_root2,) = w.pack("trees 3", [(crypto.KIND_TREE, root2)])

    root_xattrs = ((b"user.root", b"\x00\x01\xff"),)
    for n, (t, root, ident, label) in enumerate([
            (GEN_TIMES[0], r_root1, Identity("1", "0a1b2c3d-vector"), "1"),
            (GEN_TIMES[1], r_root2, None, "2")]):
        name = f"{t:013d}-{fixed(f'generation suffix {label}', 8).hex()}"
        n_files = 8 if n == 0 else 7     # by name: hard1 and hard2 count twice
        stats = {"files": n_files, "dirs": 2, "symlinks": 2, "specials": 3,
                 "bytes": sum(len(x) for x in ((hello, latin) if n == 0 else (again,)))
                 + len(linked) + len(nested) + len(v1data) + 300000,
                 "data_bytes": sum(len(x) for x in ((hello, latin) if n == 0 else (again,)))
                 + len(linked) + len(nested) + len(v1data) + len(sparse)}
        w.generation(Generation(name, t, "vectornode", "vector-host", "/data/humio-data",
                                RootAttrs(0o755, 0, 0, T0, root, root_xattrs), ident, stats),
                     label)

    # The writer lock's record (FORMAT.md 8), with the host name sealed as a blob of kind 4.
    lock_oid = fixed("lock host object", 16)
    sealed = store.cipher(crypto.KIND_LOCK_HOST, lock_oid).seal(b"vector-host")
    lock = {"version": 1, "pid": 4242, "since_ms": GEN_TIMES[1] - 1000,
            "host": base64.b64encode(lock_oid + sealed).decode()}
    (path / "lock").write_bytes(json.dumps(lock).encode() + b"\n")

    # git keeps no empty folders: leave out tmp/ and the empty packs/<xx>/.
    shutil.rmtree(path / "tmp")
    for d in (path / "packs").iterdir():
        if not any(d.iterdir()):
            d.rmdir()
    files = {"a.txt": hello, "caf\\xe9": latin, "hard1": linked, "dir/nested.txt": nested,
             "old/v1file": v1data}
    return {
        "data": {name: {"sha256": hashlib.sha256(x).hexdigest(), "hex": x.hex()}
                 for name, x in files.items()},
        "sparse": {"blob_sha256": hashlib.sha256(sparse).hexdigest(),
                   "pattern": "byte i of the blob is (i * 7 + 1) mod 251"},
    }


def describe(out: Path) -> dict[str, object]:
    """expected.json: every object of the store and what it decrypts to, read back with the
    library (tests/test_vectors.py reads it once more, independently)."""
    path = out / STORE_NAME
    store = Store.open(path, PASSPHRASE)
    key_name = sorted(p.name for p in (path / "keys").iterdir())[0]
    keydoc = json.loads((path / "keys" / key_name).read_bytes())
    gens = []
    trees: dict[str, object] = {}
    blobs: dict[str, object] = {}
    files: dict[str, dict[str, object]] = {}

    def walk(ref: Ref, prefix: str, gen: str) -> None:
        plain = store.read_blob(ref, crypto.KIND_TREE)
        entries = format.decode_tree(plain)
        trees[ref.hex()] = {"version": plain[2], "plaintext_hex": plain.hex(),
                            "entries": [entry_json(e) for e in entries]}
        for e in entries:
            shown = prefix + e.name.decode("ascii", "backslashreplace")
            if e.type == DIR:
                assert e.subtree is not None
                walk(e.subtree, shown + "/", gen)
            elif e.type == FILE:
                data = b"".join(store.iter_blob(e.data, crypto.KIND_DATA)) if e.data else b""
                if e.data is not None:
                    blobs[e.data.hex()] = {"plain_len": len(data),
                                           "sha256": hashlib.sha256(data).hexdigest()}
                whole = bytearray(e.size)
                pos = 0
                for off, n in e.extents:
                    whole[off:off + n] = data[pos:pos + n]
                    pos += n
                files.setdefault(gen, {})[shown] = {
                    "size": e.size, "extents": [list(x) for x in e.extents],
                    "sha256": hashlib.sha256(whole).hexdigest()}

    for name in store.list_generations():
        raw = (path / "generations" / name).read_bytes()
        oid, sealed = raw[8:24], raw[24:]
        plain = store.cipher(crypto.KIND_GENERATION, oid).open(sealed, len(sealed) - 16)
        gen = store.load_generation(name)
        gens.append({"name": name, "file_size": len(raw), "object_id": oid.hex(),
                     "object_key_hex": hmac.digest(store._master, b"humiofs object v1" + oid
                                                   + b"\x01", "sha256").hex(),
                     "plain_len": len(plain), "plaintext": plain.decode()})
        walk(gen.root.tree, "", name)
    lock = json.loads((path / "lock").read_bytes())
    host = base64.b64decode(lock["host"])
    lock_plain = store.cipher(crypto.KIND_LOCK_HOST, host[:16]).open(
        host[16:], len(host) - 32).decode()
    store.close()
    return {
        "passphrase_forms": [{"source": src, "text": text, "passphrase": canonical}
                             for src, text, canonical in PASSPHRASE_FORMS],
        "passphrase": PASSPHRASE,
        "passphrase_utf8_hex": PASSPHRASE.encode().hex(),
        "config": json.loads((path / "config").read_bytes()),
        "key_file": {"name": key_name, "kek_hex": keys._kek(PASSPHRASE, base64.b64decode(keydoc["kdf"]["salt"]),
                                         KDF).hex(), "master_key_hex": store._master.hex(),
                     "kdf": keydoc["kdf"]},
        "generations": gens,
        "latest": gens[-1]["name"],
        "trees": trees,
        "blobs": blobs,
        "files": files,
        "lock": {"pid": lock["pid"], "since_ms": lock["since_ms"], "host": lock_plain},
    }


def entry_json(e: Entry) -> dict[str, object]:
    """An entry as expected.json lists it (names, targets and xattrs in hex)."""
    d: dict[str, object] = {
        "name_hex": e.name.hex(), "type": e.type, "mode": e.mode, "uid": e.uid, "gid": e.gid,
        "nlink": e.nlink, "mtime_ns": e.mtime_ns, "ctime_ns": e.ctime_ns, "ino": e.ino,
        "size": e.size, "xattrs": [[n.hex(), v.hex()] for n, v in e.xattrs]}
    if e.type == FILE:
        d["data"] = e.data.hex() if e.data else None
        d["extents"] = [list(x) for x in e.extents]
    elif e.type == DIR:
        d["subtree"] = e.subtree.hex() if e.subtree else None
    elif e.type == SYMLINK:
        d["target_hex"] = e.target.hex()
    elif e.type in (CHR, BLK):
        d["rdev"] = list(e.rdev)
    return d


def main(argv: list[str]) -> int:
    out = Path(argv[1]) if len(argv) > 1 else Path(__file__).resolve().parent
    extra = build(out)
    doc = describe(out)
    doc.update(extra)
    (out / "expected.json").write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
