"""The master key wrap (docs/FORMAT.md 4.2): round trip, wrong passphrase, tampered key files,
KDF bounds checked before the KDF runs, refused passphrases."""
from __future__ import annotations

import base64
import json
import time
from pathlib import Path

import pytest

from humiofs.errors import ConfigError, IntegrityError, StoreMetadataDamaged, WrongKey
from humiofs.store import keys
from humiofs.store.keys import KdfParams
from humiofs.store.repository import Store

FAST = KdfParams(iterations=2, memory_kib=19456, lanes=1)
MASTER = bytes(range(32))
STORE_ID = bytes(range(100, 116))
PASS = "correct horse battery staple"


@pytest.fixture(scope="module")
def keyfile() -> bytes:
    return keys.wrap(MASTER, STORE_ID, PASS, FAST)


def edited(keyfile: bytes, **changes: object) -> bytes:
    doc = json.loads(keyfile)
    for path, value in changes.items():
        node = doc
        *parents, leaf = path.split("__")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return json.dumps(doc).encode()


def test_round_trip(keyfile: bytes) -> None:
    assert keys.unwrap(keyfile, STORE_ID, PASS) == MASTER


def test_layout(keyfile: bytes) -> None:
    doc = json.loads(keyfile)
    assert doc["version"] == 1 and doc["store_id"] == STORE_ID.hex()
    assert doc["kdf"]["name"] == "argon2id"
    kdf = doc["kdf"]
    assert (kdf["iterations"], kdf["memory_kib"], kdf["lanes"]) == (2, 19456, 1)
    assert len(base64.b64decode(doc["kdf"]["salt"])) == 16
    assert len(base64.b64decode(doc["nonce"])) == 12
    assert len(base64.b64decode(doc["wrapped"])) == 48
    assert MASTER.hex() not in keyfile.decode() and PASS not in keyfile.decode()


def test_fresh_salt_and_nonce(keyfile: bytes) -> None:
    again = json.loads(keys.wrap(MASTER, STORE_ID, PASS, FAST))
    first = json.loads(keyfile)
    assert again["kdf"]["salt"] != first["kdf"]["salt"]
    assert again["nonce"] != first["nonce"]
    assert again["wrapped"] != first["wrapped"]


@pytest.mark.parametrize("wrong", ["correct horse battery stapl", "Correct horse battery staple",
                                   PASS + " "])
def test_wrong_passphrase(keyfile: bytes, wrong: str) -> None:
    assert keys.unwrap(keyfile, STORE_ID, wrong) is None


def test_other_store_id(keyfile: bytes) -> None:
    with pytest.raises(IntegrityError, match="another store"):
        keys.unwrap(keyfile, bytes(16), PASS)


def test_store_id_bound_into_wrap(keyfile: bytes) -> None:
    # A key file moved to another store with its store_id edited to match does not open:
    # the store id is part of the associated data.
    other = bytes(16)
    assert keys.unwrap(edited(keyfile, store_id=other.hex()), other, PASS) is None


@pytest.mark.parametrize("field", ["wrapped", "nonce", "kdf__salt"])
def test_tampered_fields(keyfile: bytes, field: str) -> None:
    doc = json.loads(keyfile)
    node = doc["kdf"] if field.startswith("kdf__") else doc
    leaf = field.removeprefix("kdf__")
    raw = bytearray(base64.b64decode(node[leaf]))
    raw[0] ^= 1
    node[leaf] = base64.b64encode(bytes(raw)).decode()
    assert keys.unwrap(json.dumps(doc).encode(), STORE_ID, PASS) is None


@pytest.mark.parametrize("changes", [
    {"kdf__memory_kib": 2**40},
    {"kdf__memory_kib": 4194304 + 1},
    {"kdf__memory_kib": 19455},
    {"kdf__iterations": 65},
    {"kdf__iterations": 1},
    {"kdf__iterations": 10**9},
    {"kdf__lanes": 0},
    {"kdf__lanes": 65},
])
def test_kdf_bounds_checked_before_running(keyfile: bytes, changes: dict[str, int]) -> None:
    bad = edited(keyfile, **changes)
    start = time.monotonic()
    with pytest.raises(IntegrityError, match="KDF"):
        keys.unwrap(bad, STORE_ID, PASS)
    assert time.monotonic() - start < 0.5


@pytest.mark.parametrize("changes", [
    {"version": 2},
    {"kdf__name": "scrypt"},
    {"nonce": "!!notbase64"},
    {"nonce": base64.b64encode(b"short").decode()},
    {"kdf__salt": base64.b64encode(b"short").decode()},
    {"kdf__iterations": "many"},
])
def test_malformed_key_files(keyfile: bytes, changes: dict[str, object]) -> None:
    with pytest.raises(IntegrityError):
        keys.unwrap(edited(keyfile, **changes), STORE_ID, PASS)


@pytest.mark.parametrize("raw", [b"", b"{", b"[]", b'{"version": 1}', b"\xff"])
def test_garbage_key_files(raw: bytes) -> None:
    with pytest.raises(IntegrityError):
        keys.unwrap(raw, STORE_ID, PASS)


def test_wrap_refuses_out_of_range_params() -> None:
    with pytest.raises(IntegrityError):
        keys.wrap(MASTER, STORE_ID, PASS, KdfParams(1, 19456, 1))


def test_default_params_in_bounds() -> None:
    KdfParams().check()


@pytest.mark.parametrize("bad", ["developer", ""])
def test_refused_passphrases(bad: str) -> None:
    with pytest.raises(ConfigError):
        keys.check_passphrase(bad)


@pytest.mark.parametrize("bad", ["developer", ""])
def test_store_create_refuses(tmp_path: Path, bad: str) -> None:
    with pytest.raises(ConfigError):
        Store.create(tmp_path / "s", bad, FAST)
    assert list(tmp_path.iterdir()) == []


def test_change_key_refuses_developer(tmp_path: Path) -> None:
    store = Store.create(tmp_path / "s", PASS, FAST)
    with pytest.raises(ConfigError):
        store.change_key("developer", FAST)
    assert Store.open(tmp_path / "s", PASS).store_id == store.store_id


def test_change_key_rewraps_same_master(tmp_path: Path) -> None:
    store = Store.create(tmp_path / "s", PASS, FAST)
    with store.lock():
        store.change_key("new passphrase", FAST)
    assert len(list((tmp_path / "s" / "keys").iterdir())) == 1
    reopened = Store.open(tmp_path / "s", "new passphrase")
    # Same master key: a blob sealed before the change opens after it.
    oid = bytes(16)
    sealed = store.cipher(1, oid).seal(b"payload")
    assert reopened.cipher(1, oid).open(sealed, 7) == b"payload"


def test_either_key_file_opens_after_interrupted_change(tmp_path: Path) -> None:
    # A crash between writing the new key file and deleting the old one leaves both.
    store = Store.create(tmp_path / "s", PASS, FAST)
    key_dir = tmp_path / "s" / "keys"
    (old,) = key_dir.iterdir()
    saved = old.read_bytes()
    store.change_key("new passphrase", FAST)
    old.write_bytes(saved)
    assert len(list(key_dir.iterdir())) == 2
    assert Store.open(tmp_path / "s", PASS).store_id == store.store_id
    assert Store.open(tmp_path / "s", "new passphrase").store_id == store.store_id
    with pytest.raises(WrongKey):
        Store.open(tmp_path / "s", "neither")
    # Two valid key files are a legitimate state: check warns and says which to remove.
    from humiofs.check import Checker
    for key in (PASS, "new passphrase"):
        report = Checker(Store.open(tmp_path / "s", key), key).run()
        assert report.healthy and not report.problems
        (warning,) = [w for w in report.warnings if w.startswith("keys/")]
        assert "interrupted key change" in warning and "rm " in warning


def test_changed_store_id_in_config_fails_to_open(tmp_path: Path) -> None:
    """A changed config is damage, not a wrong key: the key still opens the key file under
    the store id the key file holds, so the message says which id config must hold."""
    store = Store.create(tmp_path / "s", PASS, FAST)
    config = tmp_path / "s" / "config"
    doc = json.loads(config.read_text())
    doc["store_id"] = bytes(16).hex()
    config.write_text(json.dumps(doc))
    with pytest.raises(StoreMetadataDamaged, match=f"back to {store.store_id.hex()}"):
        Store.open(tmp_path / "s", PASS)
    # With another key as well, it is still not called a wrong key.
    with pytest.raises(StoreMetadataDamaged, match="belongs to the store"):
        Store.open(tmp_path / "s", "neither this")


def test_unwrap_from_several_threads_at_once() -> None:
    """Argon2id from two threads at once deadlocked inside OpenSSL; keys serializes it."""
    import threading
    store_id = bytes(16)
    master = bytes(range(32))
    blob = keys.wrap(master, store_id, "pass phrase", keys.KdfParams())
    results: list[bytes | None] = []

    def work() -> None:
        for _ in range(2):
            results.append(keys.unwrap(blob, store_id, "pass phrase"))

    threads = [threading.Thread(target=work, daemon=True) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "key unwrapping deadlocked"
    assert results == [master] * 6


@pytest.mark.allow_warnings
def test_foreign_key_files_are_told_from_a_changed_config(tmp_path: Path) -> None:
    """keys/ copied from another store with the same key: the key opens them, but their master
    key opens none of the store's generations, so the message says the key files are foreign,
    never that config is damaged; a config edited to their store id lets the store open, and
    then a backup refuses (exit 5) to commit a generation under the other master key."""
    import shutil

    import storetools
    from conftest import run_cli, write_env

    node = tmp_path / "node"
    node.mkdir()
    (node / "segment").write_bytes(b"x" * 5000)
    (tmp_path / "b").mkdir()
    a = Store.create(tmp_path / "b" / "a", PASS, FAST)
    b = Store.create(tmp_path / "b" / "other", PASS, FAST)
    storetools.backup(a, node)
    gens = a.list_generations()
    # A config that changed (and nothing else) is still named as such, now after checking.
    config = a.path / "config"
    saved = config.read_text()
    config.write_text(saved.replace(a.store_id.hex(), bytes(16).hex()))
    with pytest.raises(StoreMetadataDamaged, match=f"back to {a.store_id.hex()}.*not affected"):
        Store.open(a.path, PASS)
    config.write_text(saved)

    shutil.rmtree(a.path / "keys")
    shutil.copytree(b.path / "keys", a.path / "keys")
    with pytest.raises(StoreMetadataDamaged, match="belong to another store") as err:
        Store.open(a.path, PASS)
    assert "config is damaged" not in str(err.value) and "not affected" not in str(err.value)
    # The wrong advice followed anyway: the store opens, with the other store's master key.
    config.write_text(saved.replace(a.store_id.hex(), b.store_id.hex()))
    env = write_env(tmp_path / "env", a.path.parent, name="a", directory=node, key=PASS)
    r = run_cli("backup", "--config", env, "--no-progress")
    assert r.returncode == 5, r.stderr
    assert "mix two master keys" in r.stderr and "Traceback" not in r.stderr
    assert a.list_generations() == gens


def test_key_change_to_the_same_key_says_nothing_else_changed(tmp_path: Path) -> None:
    from conftest import run_cli, write_env

    (tmp_path / "b").mkdir()
    Store.create(tmp_path / "b" / "s", PASS, FAST)
    env = write_env(tmp_path / "env", tmp_path / "b", name="s", key=PASS)
    (tmp_path / "same").write_text(PASS + "\n")
    r = run_cli("key", "change", "-c", env, "--new-key-file", tmp_path / "same")
    assert r.returncode == 0, r.stderr
    assert "already opened" in r.stdout and "no longer opens" not in r.stdout
    assert Store.open(tmp_path / "b" / "s", PASS)
