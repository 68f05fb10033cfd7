"""Rules of docs/FORMAT.md that readers do not check, so only the writer can keep them: a
symlink's size, the extents a reader accepts, the 13 digits of a generation name, and the
generation's counts when `backup --watch` reuses a folder's tree without reading it."""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from storetools import create_store, pack_files, wait_not_racy

from humiofs.backup import readfile
from humiofs.backup.writer import Backup, BackupOptions
from humiofs.errors import EXIT_USAGE, StoreError
from humiofs.store import format
from humiofs.store.format import FILE, SYMLINK, Entry, Ref


def test_a_symlinks_size_is_the_length_of_the_target_stored(tmp_path: Path) -> None:
    os.symlink("a-much-longer-target", tmp_path / "link")
    st = os.lstat(tmp_path / "link")
    # The link was replaced by a shorter one between the writer's lstat and its readlink.
    entry = readfile.make_entry(b"link", st, SYMLINK, target=b"short")
    assert entry.size == 5
    assert format.decode_tree(format.encode_tree([entry]))[0].size == 5


def test_no_tree_with_more_extents_than_a_reader_accepts(monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    monkeypatch.setattr(format, "_MAX_EXTENTS", 2)      # 2**24 would take gigabytes here
    ref = Ref(b"p" * 16, b"o" * 16, 8, 3 + 16, 3)
    ok = Entry(b"f", FILE, 0o644, 0, 0, 0, 0, 1, 10, ref, ((0, 1), (4, 2)))
    assert format.decode_tree(format.encode_tree([ok])) == [ok]
    many = Entry(b"f", FILE, 0o644, 0, 0, 0, 0, 1, 10, ref, ((0, 1), (4, 1), (8, 1)))
    with pytest.raises(ValueError, match="extents"):
        format.encode_tree([many])       # the writer leaves such a file out with a warning


def test_no_generation_name_past_13_digits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                           ) -> None:
    node = tmp_path / "node"
    node.mkdir()
    (node / "f").write_bytes(b"data")
    (node / "cluster_membership.uuid").write_text("3b0c4f2e-6a3d")
    store = create_store(tmp_path / "backups" / "node1")
    monkeypatch.setattr(time, "time", lambda: 10.0 ** 10)      # 2286-11-20T17:46:40Z
    with store.lock(), pytest.raises(StoreError, match="system clock") as caught:
        Backup(store, BackupOptions(source=node, backup_name="node1", host_id="1",
                                    progress=False)).run(None)
    assert caught.value.exit_code == EXIT_USAGE
    assert store.list_generations() == [] and pack_files(store.path) == set()


def test_a_reused_folder_keeps_its_counts(tmp_path: Path) -> None:
    node = tmp_path / "node"
    (node / "sub").mkdir(parents=True)
    (node / "cluster_membership.uuid").write_text("3b0c4f2e-6a3d")
    (node / "sub" / "file").write_bytes(b"data")
    os.mkfifo(node / "sub" / "fifo")
    os.symlink("file", node / "sub" / "link")
    wait_not_racy(node)
    store = create_store(tmp_path / "backups" / "node1")
    with store.lock():
        first = Backup(store, BackupOptions(source=node, backup_name="node1", host_id="1",
                                            progress=False))
        gen = first.run(None)
        # As backup --watch does when inotify saw no change: every folder's tree is reused.
        again = Backup(store, BackupOptions(source=node, backup_name="node1", host_id="1",
                                            progress=False, clean=lambda rel: True,
                                            tree_counts=first.tree_counts_seen))
        reused = again.build(gen)
    assert reused.root.tree == gen.root.tree
    assert gen.stats == {"files": 2, "dirs": 1, "symlinks": 1, "specials": 1, "bytes": 17,
                         "data_bytes": 17}
    assert reused.stats == gen.stats
