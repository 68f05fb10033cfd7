"""backup/prewarm.py: what a one-shot backup reads while the store's key is derived."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from humiofs.backup.prewarm import Prewarm

DEADLINE_S = 30.0


def _finish(p: Prewarm) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not p.finished.wait(0.05):
        assert time.monotonic() < deadline, "prewarm did not finish"


def test_stats_every_entry_without_following_symlinks(tmp_path: Path) -> None:
    node, outside = tmp_path / "node", tmp_path / "outside"
    (node / "a" / "b").mkdir(parents=True)
    outside.mkdir()
    for i in range(5):
        (outside / f"o{i}").write_bytes(b"x")
    (node / "f").write_bytes(b"1")
    (node / "a" / "g").write_bytes(b"2")
    (node / "a" / "b" / "h").write_bytes(b"3")
    os.symlink(outside, node / "link")          # a link to a folder: one entry, not six
    os.mkfifo(node / "fifo")                    # stat'ed, never opened
    with Prewarm(node) as p:
        _finish(p)
    assert p.entries == 7     # f, a, link, fifo, a/g, a/b, a/b/h
    assert "humiofs.backup.writer" in sys.modules


def test_a_missing_source_raises_nothing(tmp_path: Path) -> None:
    with Prewarm(tmp_path / "nothing") as p:
        _finish(p)
    assert p.entries == 0


def test_leaving_the_block_stops_the_thread(tmp_path: Path) -> None:
    node = tmp_path / "node"
    for d in range(50):
        (node / f"d{d}").mkdir(parents=True)
        for f in range(40):
            (node / f"d{d}" / f"f{f}").touch()
    with Prewarm(node) as p:
        pass
    assert not p._thread.is_alive()       # left only once the thread has ended
    stopped = Prewarm(node)
    stopped.stopped.set()                 # as if the store opened at once: it stats nothing
    with stopped:
        _finish(stopped)
    assert stopped.entries == 0
