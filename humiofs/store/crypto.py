"""Chunked AEAD over byte strings (docs/FORMAT.md sections 4.3 and 5).

Knows nothing of paths, packs or files: it turns a blob's plaintext into stored bytes and back,
and derives the per-object keys. Every chunk is authenticated before any byte of it is returned.
"""
from __future__ import annotations

import hmac
import os
import struct
from collections.abc import Iterator

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from humiofs.errors import IntegrityError

CHUNK = 65536
TAG = 16
STORED_CHUNK = CHUNK + TAG
OBJECT_ID_LEN = 16

KIND_DATA = 1
KIND_TREE = 2
KIND_GENERATION = 3
KIND_LOCK_HOST = 4      # the host name of the writer holding the lock (FORMAT.md 8)

_AAD_PREFIX = b"HFS1"
_OBJECT_INFO = b"humiofs object v1"


def new_object_id() -> bytes:
    """A fresh random object id; every blob written gets its own."""
    return os.urandom(OBJECT_ID_LEN)


def chunk_count(plain_len: int) -> int:
    """Number of chunks of a blob with this plaintext length (an empty blob has one)."""
    return max(1, -(-plain_len // CHUNK))


def stored_len(plain_len: int) -> int:
    """Stored (ciphertext) length of a blob with this plaintext length."""
    return plain_len + TAG * chunk_count(plain_len)


def _nonce(index: int) -> bytes:
    return b"\0\0\0\0" + struct.pack(">Q", index)


def _aad(kind: int, oid: bytes, index: int, last: bool) -> bytes:
    return _AAD_PREFIX + bytes((kind,)) + oid + struct.pack(">QB", index, 1 if last else 0)


class ObjectCipher:
    """Encrypts or decrypts the chunks of one blob under its own derived key."""

    __slots__ = ("kind", "oid", "_aead")

    def __init__(self, master_key: bytes, kind: int, oid: bytes) -> None:
        if len(oid) != OBJECT_ID_LEN:
            raise IntegrityError("object id has the wrong length")
        # HKDF-Expand with L = 32 is exactly one HMAC-SHA256 block (RFC 5869, section 2.3).
        key = hmac.digest(master_key, _OBJECT_INFO + oid + b"\x01", "sha256")
        self.kind = kind
        self.oid = oid
        self._aead = AESGCM(key)

    def encrypt_chunk(self, index: int, plaintext: bytes | memoryview, last: bool) -> bytes:
        """Ciphertext and tag of chunk `index`."""
        return self._aead.encrypt(_nonce(index), plaintext, _aad(self.kind, self.oid, index, last))

    def encrypt_chunk_into(
        self, index: int, plaintext: bytes | bytearray | memoryview, last: bool, out: memoryview
    ) -> int:
        """Writes ciphertext and tag of chunk `index` into `out`; returns the bytes written."""
        aad = _aad(self.kind, self.oid, index, last)
        return self._aead.encrypt_into(_nonce(index), plaintext, aad,
                                       out[:len(plaintext) + TAG])

    def decrypt_chunk(self, index: int, stored: bytes | memoryview, last: bool) -> bytes:
        """Plaintext of chunk `index`; raises IntegrityError unless it authenticates."""
        try:
            return self._aead.decrypt(_nonce(index), stored, _aad(self.kind, self.oid, index, last))
        except InvalidTag:
            raise IntegrityError(f"chunk {index} failed authentication") from None

    def decrypt_chunk_into(self, index: int, stored: bytes | memoryview, last: bool,
                           out: memoryview) -> int:
        """Writes the plaintext of chunk `index` into `out`; returns its length. Raises
        IntegrityError unless it authenticates, and `out` must then be thrown away: it may
        hold unauthenticated bytes."""
        n = len(stored) - TAG
        try:
            self._aead.decrypt_into(_nonce(index), stored, _aad(self.kind, self.oid, index, last),
                                    out[:n])
        except (InvalidTag, ValueError):
            raise IntegrityError(f"chunk {index} failed authentication") from None
        return n

    def seal(self, plaintext: bytes) -> bytes:
        """Stored bytes of a whole blob held in memory."""
        n = chunk_count(len(plaintext))
        view = memoryview(plaintext)
        out = bytearray(stored_len(len(plaintext)))
        pos = 0
        for i in range(n):
            piece = view[i * CHUNK:(i + 1) * CHUNK]
            pos += self.encrypt_chunk_into(i, piece, i == n - 1, memoryview(out)[pos:])
        return bytes(out)

    def open(self, stored: bytes | memoryview, plain_len: int) -> bytes:
        """Plaintext of a whole blob; checks the length, every tag and the last-chunk flag."""
        if len(stored) != stored_len(plain_len):
            raise IntegrityError("blob is truncated or has the wrong length")
        return b"".join(self.iter_open(stored, 0, plain_len))

    def iter_open(
        self, stored: bytes | memoryview, first: int, plain_len: int
    ) -> Iterator[bytes]:
        """Decrypts consecutive chunks starting at chunk `first` from `stored`."""
        view = memoryview(stored)
        last_index = chunk_count(plain_len) - 1
        pos = 0
        index = first
        while pos < len(view):
            size = min(STORED_CHUNK, len(view) - pos)
            yield self.decrypt_chunk(index, view[pos:pos + size], index == last_index)
            pos += size
            index += 1
