"""The test vectors of docs/FORMAT.md section 11 (tests/vectors/): the library reads the
vector store as expected.json says, the generator gives the same bytes again, and a reader
written from FORMAT.md alone, below, reads the same plaintexts, which shows that the document
is enough to implement a reader."""
from __future__ import annotations

import base64
import hashlib
import hmac
import importlib.util
import json
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from argon2.low_level import Type, hash_secret_raw
from conftest import clean_env, run_cli, write_env
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from humiofs import config
from humiofs.errors import EXIT_OK
from humiofs.store import generations
from humiofs.store.repository import Store

VECTORS = Path(__file__).parent / "vectors"
STORE = VECTORS / "vectornode"
EXPECTED = json.loads((VECTORS / "expected.json").read_text())


def _generator() -> Any:
    spec = importlib.util.spec_from_file_location("make_vectors", VECTORS / "make_vectors.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


# -- the library -----------------------------------------------------------------------------

def test_the_generator_gives_the_same_bytes_again(tmp_path: Path) -> None:
    subprocess.run([sys.executable, str(VECTORS / "make_vectors.py"), str(tmp_path)],
                   check=True, env=clean_env())
    assert _files(tmp_path / "vectornode") == _files(STORE)
    assert (tmp_path / "expected.json").read_bytes() == (VECTORS / "expected.json").read_bytes()


def test_the_library_reads_what_expected_json_says() -> None:
    described = _generator().describe(VECTORS)
    for member, value in described.items():
        assert value == EXPECTED[member], member
    store = Store.open(STORE, EXPECTED["passphrase"])
    try:
        assert generations.pick(store).generation.name == EXPECTED["latest"]
    finally:
        store.close()


def test_the_vector_store_checks_healthy(tmp_path: Path) -> None:
    backup = tmp_path / "backup"
    shutil.copytree(STORE, backup / "vectornode")
    for sub in ["tmp"] + [f"packs/{i:02x}" for i in range(256)]:
        (backup / "vectornode" / sub).mkdir(parents=True, exist_ok=True)
    env = write_env(tmp_path / "v.env", backup, name="vectornode", key=EXPECTED["passphrase"])
    r = run_cli("check", "--config", env, "--read-data")
    assert r.returncode == EXIT_OK, r.stdout + r.stderr


def test_the_library_reads_each_passphrase_form(tmp_path: Path) -> None:
    for n, form in enumerate(EXPECTED["passphrase_forms"]):
        if form["source"] == "env_file":
            env = tmp_path / f"{n}.env"
            env.write_text(form["text"] + "\n", encoding="utf-8")
            got = config.load({}, env_file=env, environ={}).backup_key
        elif form["source"] == "environment":
            got = config.load({}, environ={"BACKUP_KEY": form["text"]}).backup_key
        else:
            key_file = tmp_path / f"{n}.key"
            key_file.write_text(form["text"], encoding="utf-8")
            got = config.read_key_file(key_file)
        assert got == form["passphrase"], form


# -- a reader written from FORMAT.md alone ---------------------------------------------------
# It uses no humiofs code: only the section it follows is named in each comment.

CHUNK, TAG = 65536, 16
STORED_CHUNK = CHUNK + TAG
KINDS = {"data": 1, "tree": 2, "generation": 3, "lock": 4}


class SpecError(Exception):
    pass


def b64(text: str) -> bytes:                                       # 4.2: RFC 4648 §4, padded
    if not re.fullmatch(r"[A-Za-z0-9+/]*={0,2}", text) or len(text) % 4:
        raise SpecError("not base64")
    return base64.b64decode(text)


# 4.4: whitespace, step 2
WHITESPACE = ("\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680" + "".join(
    chr(c) for c in range(0x2000, 0x200B)) + "\u2028\u2029\u202f\u205f\u3000")
LINE_BREAKS = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"


def canonical(value: str) -> str:                                  # 4.4, steps 2 and 3
    value = value.strip(WHITESPACE)
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        value = value[1:-1]
    return value


def env_file_key(text: str) -> str | None:                         # 4.4, env file
    key = None
    for line in re.split("\r\n|[" + LINE_BREAKS + "]", text):
        line = line.strip(WHITESPACE)
        if not line or line.startswith("#"):
            continue
        m = re.fullmatch(r"(?:export[" + WHITESPACE + r"]+)?([A-Za-z_][A-Za-z0-9_]*)(?:=(.*))?",
                         line, re.S)
        if not m:
            raise SpecError("env file refused")
        if m[1] == "BACKUP_KEY" and m[2] is not None:
            key = canonical(m[2])
    return key


def key_file_key(text: str) -> str:                                # 4.4, key file
    return canonical(text.split("\n", 1)[0].rstrip("\r").removeprefix("\ufeff"))


def open_blob(master: bytes, kind: int, oid: bytes, stored: bytes, n: int) -> bytes:
    """5: chunked AES-256-GCM under the object key of 4.3."""
    chunks = max(1, -(-n // CHUNK))
    if len(stored) != n + TAG * chunks:
        raise SpecError("stored length does not match the plaintext length")
    aead = AESGCM(hmac.digest(master, b"humiofs object v1" + oid + b"\x01", "sha256"))
    out = []
    for i in range(chunks):
        piece = stored[i * STORED_CHUNK:(i + 1) * STORED_CHUNK]
        aad = b"HFS1" + bytes((kind,)) + oid + struct.pack(">QB", i, i == chunks - 1)
        out.append(aead.decrypt(i.to_bytes(12, "big"), piece, aad))
    return b"".join(out)


class SpecReader:
    def __init__(self, store: Path, passphrase: str) -> None:
        self.store = store
        cfg = json.loads((store / "config").read_bytes())                      # 4.1
        if cfg["format"] != "humiofs-store" or cfg["version"] != 1:
            raise SpecError("not a store this reader knows")
        self.config = cfg
        self.store_id = bytes.fromhex(cfg["store_id"])
        self.master = self.kek = b""
        for path in sorted((store / "keys").iterdir()):                        # 4.2
            doc = json.loads(path.read_bytes())
            kdf = doc["kdf"]
            if doc["version"] != 1 or kdf["name"] != "argon2id" or \
                    bytes.fromhex(doc["store_id"]) != self.store_id:
                continue
            t, m, p = kdf["iterations"], kdf["memory_kib"], kdf["lanes"]
            if not (2 <= t <= 64 and 19456 <= m <= 4194304 and 1 <= p <= 64 and m >= 8 * p):
                continue
            kek = hash_secret_raw(passphrase.encode("utf-8"), b64(kdf["salt"]), t, m, p, 32,
                                  Type.ID, 0x13)
            try:
                master = AESGCM(kek).decrypt(b64(doc["nonce"]), b64(doc["wrapped"]),
                                             b"humiofs key v1" + self.store_id)
            except InvalidTag:
                continue
            if len(master) == 32:
                self.master, self.kek, self.key_name = master, kek, path.name
                break
        if not self.master:
            raise SpecError("the passphrase opens no key file")

    def blob(self, ref: bytes, kind: int) -> bytes:
        pack, oid, offset, stored_len, plain_len = struct.unpack(">16s16sQQQ", ref)  # 6.1
        with open(self.store / "packs" / pack.hex()[:2] / pack.hex(), "rb") as f:  # 6
            if f.read(8) != b"HUMIOFP\x01" or offset < 8:
                raise SpecError("not a pack")
            f.seek(offset)
            stored = f.read(stored_len)
        return open_blob(self.master, kind, oid, stored, plain_len)

    def generation(self, name: str) -> tuple[dict[str, Any], dict[str, Any]]:
        data = (self.store / "generations" / name).read_bytes()                 # 7.2
        if data[:8] != b"HUMIOFG\x01":
            raise SpecError("not a generation")
        oid, stored = data[8:24], data[24:]
        s = len(stored)
        c = max(1, -(-s // STORED_CHUNK))
        n = s - TAG * c
        if s < TAG or max(1, -(-n // CHUNK)) != c:
            raise SpecError("generation is truncated")
        plain = open_blob(self.master, KINDS["generation"], oid, stored, n)
        doc = json.loads(plain)
        if doc["version"] != 1 or doc["name"] != name or doc["time_ms"] != int(name[:13]):
            raise SpecError("generation does not belong to its file")
        return doc, {"name": name, "file_size": len(data), "object_id": oid.hex(),
                     "object_key_hex": hmac.digest(self.master, b"humiofs object v1" + oid
                                                   + b"\x01", "sha256").hex(),
                     "plain_len": n, "plaintext": plain.decode("utf-8")}

    def generation_names(self) -> list[str]:                                   # 2, 7.2 order
        return sorted(n for n in os.listdir(self.store / "generations")
                      if re.fullmatch(r"[0-9]{13}-[0-9a-f]{16}", n))


def parse_tree(t: bytes) -> list[dict[str, Any]]:
    """7.1 and 7.1.1, with the checks a reader MUST make."""
    if t[:2] != b"HT" or t[2] not in (1, 2):
        raise SpecError("not a tree")
    version = t[2]
    (count,) = struct.unpack_from(">I", t, 3)
    pos = 7
    entries: list[dict[str, Any]] = []
    prev = b""

    def take(n: int) -> bytes:
        nonlocal pos
        if pos + n > len(t):
            raise SpecError("tree is truncated")
        pos += n
        return t[pos - n:pos]

    for _ in range(count):
        (name_len,) = struct.unpack(">H", take(2))
        name = take(name_len)
        if not 1 <= len(name) <= 255 or name in (b".", b"..") or b"/" in name or \
                b"\0" in name or name <= prev:
            raise SpecError("bad name")
        prev = name
        e: dict[str, Any] = {"name_hex": name.hex(), "xattrs": []}
        if version == 1:
            (e["type"], e["mode"], e["uid"], e["gid"], e["mtime_ns"], e["ctime_ns"], e["ino"],
             e["size"]) = struct.unpack(">BIIIqqQQ", take(45))
            e["nlink"] = 1
            if e["type"] not in (1, 2, 3):
                raise SpecError("bad type")
        else:
            (e["type"], e["mode"], e["uid"], e["gid"], e["nlink"], msec, mnsec, csec, cnsec,
             e["ino"], e["size"]) = struct.unpack(">BIIIIqIqIQQ", take(57))
            if mnsec >= 10**9 or cnsec >= 10**9:
                raise SpecError("bad time")
            e["mtime_ns"], e["ctime_ns"] = msec * 10**9 + mnsec, csec * 10**9 + cnsec
            (nx,) = struct.unpack(">H", take(2))
            for _ in range(nx):
                xname = take(take(1)[0])
                (vlen,) = struct.unpack(">I", take(4))
                e["xattrs"].append([xname.hex(), take(vlen).hex()])
            names = [bytes.fromhex(x) for x, _ in e["xattrs"]]
            if names != sorted(set(names)) or any(not x or b"\0" in x for x in names):
                raise SpecError("bad xattrs")
        if e["mode"] > 0o7777:
            raise SpecError("bad mode")
        if e["type"] == 1:
            has = take(1)[0]
            if has > 1:
                raise SpecError("bad data flag")
            ref = take(56) if has else None
            (nx,) = struct.unpack(">I", take(4))
            extents = [list(struct.unpack(">QQ", take(16))) for _ in range(nx)]
            end = 0
            for off, length in extents:
                if length == 0 or off < end or off + length > e["size"]:
                    raise SpecError("bad extents")
                end = off + length
            total = sum(length for _, length in extents)
            if (ref is None) != (total == 0) or \
                    (ref is not None and struct.unpack(">Q", ref[48:])[0] != total):
                raise SpecError("extents do not match the data")
            e["data"], e["extents"] = ref.hex() if ref else None, extents
        elif e["type"] == 2:
            e["subtree"] = take(56).hex()
        elif e["type"] == 3:
            (tlen,) = struct.unpack(">H", take(2))
            target = take(tlen)
            if not target or b"\0" in target:
                raise SpecError("bad target")
            e["target_hex"] = target.hex()
        elif e["type"] in (5, 6):
            e["rdev"] = list(struct.unpack(">II", take(8)))
        elif e["type"] != 4:
            raise SpecError("bad type")
        entries.append(e)
    if pos != len(t):
        raise SpecError("tree has trailing bytes")
    return entries


def read_as_the_spec_says(store: Path, passphrase: str) -> dict[str, Any]:
    """What expected.json lists, from the store, by FORMAT.md's words."""
    r = SpecReader(store, passphrase)
    out: dict[str, Any] = {
        "passphrase_utf8_hex": passphrase.encode().hex(), "config": r.config,
        "key_file": {"name": r.key_name, "kek_hex": r.kek.hex(), "master_key_hex": r.master.hex(),
                     "kdf": json.loads((store / "keys" / r.key_name).read_bytes())["kdf"]},
        "generations": [], "trees": {}, "blobs": {}, "files": {}}

    def walk(ref: str, prefix: str, gen: str) -> None:
        plain = r.blob(bytes.fromhex(ref), KINDS["tree"])
        entries = parse_tree(plain)
        out["trees"][ref] = {"version": plain[2], "plaintext_hex": plain.hex(),
                             "entries": entries}
        for e in entries:
            path = prefix + bytes.fromhex(e["name_hex"]).decode("ascii", "backslashreplace")
            if e["type"] == 2:
                walk(e["subtree"], path + "/", gen)
            elif e["type"] == 1:
                data = r.blob(bytes.fromhex(e["data"]), KINDS["data"]) if e["data"] else b""
                if e["data"]:
                    out["blobs"][e["data"]] = {"plain_len": len(data),
                                               "sha256": hashlib.sha256(data).hexdigest()}
                whole, pos = bytearray(e["size"]), 0            # holes read as zeros
                for off, length in e["extents"]:
                    whole[off:off + length] = data[pos:pos + length]
                    pos += length
                out["files"].setdefault(gen, {})[path] = {
                    "size": e["size"], "extents": e["extents"],
                    "sha256": hashlib.sha256(whole).hexdigest()}

    for name in r.generation_names():
        try:
            doc, listed = r.generation(name)
        except (SpecError, InvalidTag):
            continue
        out["generations"].append(listed)
        out["latest"] = name                    # 7.2: the last one that authenticates
        walk(doc["root"]["tree"], "", name)
    lock = json.loads((store / "lock").read_bytes())                            # 8
    host = b64(lock["host"])
    out["lock"] = {"pid": lock["pid"], "since_ms": lock["since_ms"], "host": open_blob(
        r.master, KINDS["lock"], host[:16], host[16:], len(host) - 32).decode()}
    return out


def test_a_reader_written_from_format_md_reads_the_same() -> None:
    got = read_as_the_spec_says(STORE, EXPECTED["passphrase"])
    assert got["passphrase_utf8_hex"] == EXPECTED["passphrase_utf8_hex"]
    for member in ("config", "key_file", "generations", "latest", "trees", "blobs", "files",
                   "lock"):
        assert got[member] == EXPECTED[member], member
    data = EXPECTED["data"]["a.txt"]
    assert bytes.fromhex(data["hex"]) == b"hello, humiofs\n"


def test_a_reader_written_from_format_md_reads_each_passphrase_form() -> None:
    for form in EXPECTED["passphrase_forms"]:
        if form["source"] == "env_file":
            got = env_file_key(form["text"] + "\n")
        elif form["source"] == "environment":
            got = canonical(form["text"])
        else:
            got = key_file_key(form["text"])
        assert got == form["passphrase"], form


def test_a_reader_written_from_format_md_refuses_a_wrong_passphrase() -> None:
    with pytest.raises(SpecError):
        SpecReader(STORE, EXPECTED["passphrase"] + " ")
