"""The node's identity: cluster_membership.uuid and the node id from BOOTSTRAP_HOST_ID or
global-data-snapshot.json (scanned in blocks, so a uuid may straddle a block boundary)."""
from __future__ import annotations

import json
import logging
import uuid as uuidmod
from pathlib import Path

import pytest

from humiofs.backup import identity
from humiofs.store.format import Identity

MiB = 1 << 20
UUID = "3b0c4f2e-6a3d-4c1f-9e2a-5d8b7c6a1f00"
OTHER = "9f0e1d2c-3b4a-4958-8776-655443322110"


def sample_uuid(node: Path) -> str:
    return (node / "cluster_membership.uuid").read_text().strip()


def test_node_id_from_snapshot_of_sample(sample_node: Path) -> None:
    uuid = sample_uuid(sample_node)
    assert identity.detect(sample_node, None) == Identity("1", uuid)
    snap = json.loads((sample_node / "global-data-snapshot.json").read_text())
    others = [h for h in snap["hosts"] if h["uuid"] != uuid]
    # Another host's uuid gives that host's id, not ours.
    assert identity.node_id_from_snapshot(sample_node / "global-data-snapshot.json",
                                          others[0]["uuid"]) == str(others[0]["vhost"])


def test_bootstrap_host_id_wins(sample_node: Path) -> None:
    assert identity.detect(sample_node, " 7 ") == Identity("7", sample_uuid(sample_node))


@pytest.mark.allow_warnings
def test_unknown_node_id_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "cluster_membership.uuid").write_text(UUID + "\n")
    assert identity.detect(tmp_path, None) == Identity("unknown", UUID)
    assert "BOOTSTRAP_HOST_ID" in caplog.text
    assert [r.levelno for r in caplog.records] == [logging.WARNING]


@pytest.mark.allow_warnings
def test_snapshot_without_our_uuid(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "cluster_membership.uuid").write_text(UUID)
    (tmp_path / "global-data-snapshot.json").write_text(
        json.dumps({"hosts": [{"vhost": 2, "uuid": OTHER}]}))
    assert identity.detect(tmp_path, None) == Identity("unknown", UUID)
    assert "BOOTSTRAP_HOST_ID" in caplog.text


@pytest.mark.allow_warnings
def test_no_uuid_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert identity.detect(tmp_path, "1") is None
    assert "cluster_membership.uuid" in caplog.text


@pytest.mark.allow_warnings
@pytest.mark.parametrize("raw", [b"", b"not a uuid / at all", b"\xff\xfe\x00"])
def test_garbage_uuid_file(tmp_path: Path, caplog: pytest.LogCaptureFixture, raw: bytes) -> None:
    (tmp_path / "cluster_membership.uuid").write_bytes(raw)
    assert identity.detect(tmp_path, "1") is None
    assert caplog.records and caplog.records[0].levelno == logging.WARNING


def test_missing_snapshot(tmp_path: Path) -> None:
    assert identity.node_id_from_snapshot(tmp_path / "absent.json", UUID) is None


# -- large snapshots -----------------------------------------------------------------------------

def big_snapshot(path: Path, uuid_at: int, node_id: int = 7, id_after: bool = False,
                 pretty: bool = False) -> Path:
    """A >1 MiB snapshot whose host entry for UUID has the uuid string start at `uuid_at`,
    with a decoy host (another uuid, another id) just before it."""
    nl = "\n      " if pretty else " "

    def head(pad: int) -> str:
        member = f'"vhost": {node_id},{nl}' if not id_after else ""
        return ('{"snapshotVersion": 12, "pad": "' + "x" * pad + '", "hosts": ['
                f'{{"vhost": 2,{nl}"uuid": "{OTHER}"}},{nl}{{{nl}{member}"uuid": "')

    pad = uuid_at - len(head(0))
    assert pad >= 0
    tail = (f'",{nl}"hostName": "h7"' + (f',{nl}"vhost": {node_id}' if id_after else "")
            + '}], "segments": "' + "y" * (MiB // 2) + '"}')
    text = head(pad) + UUID + tail
    assert text.index(UUID) == uuid_at
    json.loads(text)
    path.write_text(text)
    assert path.stat().st_size > MiB
    return path


@pytest.mark.parametrize("delta", [-len(UUID) - 1, -len(UUID), -20, -1, 0, 1, 4000])
@pytest.mark.parametrize("id_after", [False, True])
def test_uuid_straddles_block_boundary(tmp_path: Path, delta: int, id_after: bool) -> None:
    snap = big_snapshot(tmp_path / "s.json", MiB + delta, id_after=id_after)
    assert identity.node_id_from_snapshot(snap, UUID) == "7"


@pytest.mark.parametrize("delta", [-10, -20])
def test_id_member_straddles_block_boundary(tmp_path: Path, delta: int) -> None:
    # The `"vhost": 123456` member before the uuid is split by the block boundary.
    snap = big_snapshot(tmp_path / "s.json", MiB + delta + 40, node_id=123456, pretty=True)
    assert identity.node_id_from_snapshot(snap, UUID) == "123456"


def test_uuid_deep_in_a_large_snapshot(tmp_path: Path) -> None:
    snap = big_snapshot(tmp_path / "s.json", 3 * MiB + 12345)
    assert identity.node_id_from_snapshot(snap, UUID) == "7"
    assert identity.node_id_from_snapshot(snap, str(uuidmod.uuid4())) is None


def test_detect_with_big_snapshot(tmp_path: Path) -> None:
    big_snapshot(tmp_path / "global-data-snapshot.json", MiB - 5)
    (tmp_path / "cluster_membership.uuid").write_text(UUID)
    assert identity.detect(tmp_path, None) == Identity("7", UUID)
