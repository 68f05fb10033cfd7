"""The master key: creation, wrapping under a passphrase with Argon2id, unwrapping, key change
(docs/FORMAT.md section 4). Holds no file paths; store.py decides where key files live.
"""
from __future__ import annotations

import base64
import json
import os
import threading
import time
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id

from humiofs.errors import ConfigError, IntegrityError

KEYFILE_VERSION = 1
MASTER_KEY_LEN = 32
_WRAP_AAD = b"humiofs key v1"
REFUSED_KEYS = frozenset({"developer"})


@dataclass(frozen=True)
class KdfParams:
    """Argon2id parameters; the defaults follow RFC 9106's second recommended option."""

    iterations: int = 3
    memory_kib: int = 65536
    lanes: int = 4

    def check(self) -> None:
        """Raises IntegrityError if the parameters are out of the bounds a reader accepts."""
        if not (2 <= self.iterations <= 64 and 19456 <= self.memory_kib <= 4194304
                and 1 <= self.lanes <= 64 and self.memory_kib >= 8 * self.lanes):
            raise IntegrityError("key file has out-of-range KDF parameters")


def canonical_passphrase(value: str) -> str:
    """The passphrase a BACKUP_KEY value stands for (FORMAT.md 4.4): without the whitespace at
    both ends, then without one pair of matching quotes around what is left. Every source
    applies it exactly once to its value (it is not idempotent: "'key'" becomes 'key')."""
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        value = value[1:-1]
    return value


@dataclass(frozen=True)
class Passphrase:
    """A canonical passphrase, where it was read from (for messages), and the other forms an
    earlier version of humiofs read from the same source, as (text, how it was read): a store
    created then may need one of them (FORMAT.md 4.4). Never shown: repr leaves the texts out."""

    text: str = field(repr=False)
    source: str = "the key given"
    legacy: tuple[tuple[str, str], ...] = field(default=(), repr=False)

    @classmethod
    def of(cls, key: str | Passphrase) -> Passphrase:
        return key if isinstance(key, Passphrase) else cls(key)

    def check_advice(self) -> str:
        """What a wrong-key message says first: how to check the key."""
        return (f"Check the key first: it was read from {self.source}, and every character of "
                "it counts (case, backslashes, blanks and quotes inside it) except the blanks "
                "around it and one pair of quotes around all of it")


def check_passphrase(passphrase: str) -> None:
    """Refuses passphrases that must never protect a store."""
    if not passphrase:
        raise ConfigError("BACKUP_KEY is empty")
    try:
        passphrase.encode("utf-8")
    except UnicodeEncodeError:
        # Bytes that are not UTF-8 reach a str only from the environment (surrogateescape).
        raise ConfigError("BACKUP_KEY is not UTF-8 text (set it in a UTF-8 env file or key "
                          "file, or fix the environment's value)") from None
    if passphrase in REFUSED_KEYS:
        raise ConfigError(f"BACKUP_KEY '{passphrase}' is Humio's published default; choose a secret key")


# cryptography's Argon2id (OpenSSL's, with lanes > 1) deadlocks when two threads run it at
# the same time (seen with cryptography 48); each derivation already uses several cores.
_KDF_LOCK = threading.Lock()


def _kek(passphrase: str, salt: bytes, params: KdfParams) -> bytes:
    kdf = Argon2id(salt=salt, length=32, iterations=params.iterations, lanes=params.lanes,
                   memory_cost=params.memory_kib)
    with _KDF_LOCK:
        return kdf.derive(passphrase.encode("utf-8"))


def new_master_key() -> bytes:
    return os.urandom(MASTER_KEY_LEN)


def wrap(master: bytes, store_id: bytes, passphrase: str,
         params: KdfParams | None = None) -> bytes:
    """A key file (JSON bytes) wrapping `master` under `passphrase`, with fresh salt and nonce."""
    params = params or KdfParams()
    params.check()
    salt, nonce = os.urandom(16), os.urandom(12)
    wrapped = AESGCM(_kek(passphrase, salt, params)).encrypt(nonce, master, _WRAP_AAD + store_id)
    doc = {
        "version": KEYFILE_VERSION,
        "store_id": store_id.hex(),
        "created_ms": int(time.time() * 1000),
        "kdf": {"name": "argon2id", "salt": base64.b64encode(salt).decode(),
                "iterations": params.iterations, "memory_kib": params.memory_kib,
                "lanes": params.lanes},
        "nonce": base64.b64encode(nonce).decode(),
        "wrapped": base64.b64encode(wrapped).decode(),
    }
    return json.dumps(doc, indent=1).encode() + b"\n"


class ForeignKeyFile(IntegrityError):
    """A well-formed key file made for another store id than the one it was opened for."""

    def __init__(self, message: str, store_id: bytes) -> None:
        super().__init__(message)
        self.store_id = store_id


def unwrap(keyfile: bytes, store_id: bytes, passphrase: str) -> bytes | None:
    """The master key if `passphrase` opens this key file, None if it does not.

    Raises ForeignKeyFile if the key file names another store id (checked before the KDF
    runs), IntegrityError if it is malformed.
    """
    try:
        doc = json.loads(keyfile)
        if doc["version"] != KEYFILE_VERSION:
            raise IntegrityError(f"key file has unsupported version {doc['version']}")
        own_id = bytes.fromhex(doc["store_id"])
        if len(own_id) != 16:
            raise IntegrityError("key file has a malformed store id")
        if own_id != store_id:
            raise ForeignKeyFile(f"key file belongs to another store (store id "
                                 f"{own_id.hex()})", own_id)
        kdf = doc["kdf"]
        if kdf["name"] != "argon2id":
            raise IntegrityError(f"key file names unknown KDF {kdf['name']!r}")
        params = KdfParams(int(kdf["iterations"]), int(kdf["memory_kib"]), int(kdf["lanes"]))
        salt = base64.b64decode(kdf["salt"], validate=True)
        nonce = base64.b64decode(doc["nonce"], validate=True)
        wrapped = base64.b64decode(doc["wrapped"], validate=True)
    except IntegrityError:
        raise
    except (ValueError, KeyError, TypeError) as exc:
        raise IntegrityError(f"key file is malformed: {exc}") from None
    params.check()
    if len(salt) < 16 or len(nonce) != 12:
        raise IntegrityError("key file has a malformed salt or nonce")
    try:
        master = AESGCM(_kek(passphrase, salt, params)).decrypt(nonce, wrapped,
                                                                _WRAP_AAD + store_id)
    except InvalidTag:
        return None
    if len(master) != MASTER_KEY_LEN:
        raise IntegrityError("key file holds a key of the wrong length")
    return master
