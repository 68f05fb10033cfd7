"""Chunked AEAD (docs/FORMAT.md 4.3 and 5): round trips, chunk boundaries, every kind of
tampering, and a golden vector computed independently of humiofs.store.crypto."""
from __future__ import annotations

import hmac
import os

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

from humiofs.errors import IntegrityError
from humiofs.store import crypto
from humiofs.store.crypto import CHUNK, KIND_DATA, KIND_GENERATION, KIND_TREE, TAG, ObjectCipher

MASTER = bytes(range(32))
OID = bytes(range(0xA0, 0xB0))
SIZES = [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK]


def plaintext(n: int) -> bytes:
    # Distinct chunks, so that swapping two chunks changes the plaintext.
    return bytes((i * 7 + i // CHUNK) & 0xFF for i in range(n))


def cipher(kind: int = KIND_DATA, oid: bytes = OID, master: bytes = MASTER) -> ObjectCipher:
    return ObjectCipher(master, kind, oid)


def stored_chunks(stored: bytes) -> list[bytes]:
    step = CHUNK + TAG
    return [stored[i:i + step] for i in range(0, len(stored), step)]


# -- independent reference implementation of FORMAT.md 4.3 and 5 ------------------------------

def ref_object_key(master: bytes, oid: bytes) -> bytes:
    return HKDFExpand(hashes.SHA256(), 32, b"humiofs object v1" + oid).derive(master)


def ref_seal(master: bytes, kind: int, oid: bytes, data: bytes) -> bytes:
    aead = AESGCM(ref_object_key(master, oid))
    pieces = [data[i:i + CHUNK] for i in range(0, len(data), CHUNK)] or [b""]
    out = []
    for i, piece in enumerate(pieces):
        last = 1 if i == len(pieces) - 1 else 0
        aad = b"HFS1" + bytes([kind]) + oid + i.to_bytes(8, "big") + bytes([last])
        assert len(aad) == 30
        out.append(aead.encrypt(i.to_bytes(12, "big"), piece, aad))
    return b"".join(out)


# -- golden vectors ----------------------------------------------------------------------------

GOLDEN_PLAIN = b"humiofs golden vector: chunk 0 of 1"
# Computed once with the reference functions above (HKDFExpand + AESGCM), pasted here so that a
# change to the key derivation, nonce or associated data breaks this test.
GOLDEN_STORED = bytes.fromhex(
    "f0241b4800d09d01a96678567a1f124bad0840757282fc667742e98a2e966983"
    "8538bcb5ceab4a18cc8cfb3f903e7d428211d9")


def test_golden_vector_hardcoded() -> None:
    assert ref_seal(MASTER, KIND_DATA, OID, GOLDEN_PLAIN) == GOLDEN_STORED
    assert cipher().seal(GOLDEN_PLAIN) == GOLDEN_STORED
    assert cipher().open(GOLDEN_STORED, len(GOLDEN_PLAIN)) == GOLDEN_PLAIN


def test_object_key_is_hkdf_expand() -> None:
    # HKDF-Expand with L=32 is one HMAC block: check the shortcut the spec describes.
    want = hmac.digest(MASTER, b"humiofs object v1" + OID + b"\x01", "sha256")
    assert ref_object_key(MASTER, OID) == want


@pytest.mark.parametrize("kind", [KIND_DATA, KIND_TREE, KIND_GENERATION])
@pytest.mark.parametrize("n", [0, CHUNK + 5, 2 * CHUNK])
def test_multi_chunk_matches_reference(kind: int, n: int) -> None:
    data = plaintext(n)
    assert cipher(kind).seal(data) == ref_seal(MASTER, kind, OID, data)


# -- round trips and lengths -------------------------------------------------------------------

@pytest.mark.parametrize("n", SIZES)
def test_round_trip(n: int) -> None:
    data = plaintext(n)
    stored = cipher().seal(data)
    chunks = max(1, -(-n // CHUNK))
    assert crypto.chunk_count(n) == chunks
    assert len(stored) == crypto.stored_len(n) == n + TAG * chunks
    assert cipher().open(stored, n) == data


def test_chunk_counts_at_boundaries() -> None:
    assert [crypto.chunk_count(n) for n in SIZES] == [1, 1, 1, 1, 2, 3]


def test_iter_open_reads_from_any_chunk() -> None:
    data = plaintext(3 * CHUNK + 100)
    stored = cipher().seal(data)
    step = CHUNK + TAG
    # Chunk 2 alone, then chunks 2..3 (the last), each decrypted without the others.
    only2 = list(cipher().iter_open(stored[2 * step:3 * step], 2, len(data)))
    assert only2 == [data[2 * CHUNK:3 * CHUNK]]
    tail = b"".join(cipher().iter_open(stored[2 * step:], 2, len(data)))
    assert tail == data[2 * CHUNK:]


def test_distinct_object_ids_give_distinct_ciphertext() -> None:
    data = plaintext(1000)
    a = cipher(oid=os.urandom(16)).seal(data)
    b = cipher(oid=os.urandom(16)).seal(data)
    # The ciphertext itself differs, not only the tags.
    assert a[:-TAG] != b[:-TAG]


def test_new_object_ids_are_random() -> None:
    ids = {crypto.new_object_id() for _ in range(100)}
    assert len(ids) == 100 and all(len(i) == 16 for i in ids)


def test_object_id_length_checked() -> None:
    with pytest.raises(IntegrityError):
        ObjectCipher(MASTER, KIND_DATA, b"short")


# -- tampering ---------------------------------------------------------------------------------

N = 3 * CHUNK + 100  # four chunks, the last one short


@pytest.fixture(scope="module")
def sealed() -> tuple[bytes, bytes]:
    data = plaintext(N)
    return data, cipher().seal(data)


def test_swapped_chunks(sealed: tuple[bytes, bytes]) -> None:
    _, stored = sealed
    c = stored_chunks(stored)
    c[0], c[1] = c[1], c[0]
    with pytest.raises(IntegrityError):
        cipher().open(b"".join(c), N)


def test_repeated_chunk(sealed: tuple[bytes, bytes]) -> None:
    _, stored = sealed
    c = stored_chunks(stored)
    c[1] = c[0]
    with pytest.raises(IntegrityError):
        cipher().open(b"".join(c), N)


def test_dropped_last_chunk(sealed: tuple[bytes, bytes]) -> None:
    _, stored = sealed
    c = stored_chunks(stored)
    dropped = b"".join(c[:-1])
    with pytest.raises(IntegrityError):
        cipher().open(dropped, N)


def test_last_flag_enforced(sealed: tuple[bytes, bytes]) -> None:
    # Dropping the last chunk and claiming a shorter plaintext: the new final chunk was sealed
    # with last = 0 and must not authenticate as the last one.
    _, stored = sealed
    c = stored_chunks(stored)
    with pytest.raises(IntegrityError):
        cipher().open(b"".join(c[:-1]), 3 * CHUNK)
    with pytest.raises(IntegrityError):
        list(cipher().iter_open(c[2], 2, 3 * CHUNK))
    # And a final chunk read as if more followed fails too.
    with pytest.raises(IntegrityError):
        list(cipher().iter_open(c[3], 3, N + CHUNK))


@pytest.mark.parametrize("cut", [1, TAG, CHUNK + TAG])
def test_truncated(sealed: tuple[bytes, bytes], cut: int) -> None:
    _, stored = sealed
    with pytest.raises(IntegrityError):
        cipher().open(stored[:-cut], N)


def test_extended(sealed: tuple[bytes, bytes]) -> None:
    _, stored = sealed
    with pytest.raises(IntegrityError):
        cipher().open(stored + b"\0", N)


@pytest.mark.parametrize("pos", [0, 100, CHUNK, CHUNK + TAG - 1, CHUNK + TAG, N + 4 * TAG - 1])
def test_flipped_byte(sealed: tuple[bytes, bytes], pos: int) -> None:
    _, stored = sealed
    bad = bytearray(stored)
    bad[pos] ^= 0x01
    with pytest.raises(IntegrityError):
        cipher().open(bytes(bad), N)


def test_zeroed_chunk_is_not_a_hole(sealed: tuple[bytes, bytes]) -> None:
    _, stored = sealed
    bad = bytearray(stored)
    bad[CHUNK + TAG:2 * (CHUNK + TAG)] = bytes(CHUNK + TAG)
    with pytest.raises(IntegrityError):
        cipher().open(bytes(bad), N)


@pytest.mark.parametrize("kind", [KIND_TREE, KIND_GENERATION])
def test_wrong_kind(sealed: tuple[bytes, bytes], kind: int) -> None:
    _, stored = sealed
    with pytest.raises(IntegrityError):
        cipher(kind=kind).open(stored, N)


def test_wrong_object_id(sealed: tuple[bytes, bytes]) -> None:
    _, stored = sealed
    with pytest.raises(IntegrityError):
        cipher(oid=bytes(16)).open(stored, N)


def test_wrong_master_key(sealed: tuple[bytes, bytes]) -> None:
    _, stored = sealed
    with pytest.raises(IntegrityError):
        cipher(master=bytes(32)).open(stored, N)


def test_error_names_the_chunk(sealed: tuple[bytes, bytes]) -> None:
    _, stored = sealed
    bad = bytearray(stored)
    bad[2 * (CHUNK + TAG) + 5] ^= 0x80
    with pytest.raises(IntegrityError, match="chunk 2"):
        cipher().open(bytes(bad), N)
