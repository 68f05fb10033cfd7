"""Failpoints for crash tests: `HUMIOFS_FAILPOINT=<point>:<n>` stops the process (SIGSTOP)
the n-th time the writer reaches `<point>`, so that a test can `kill -9` it at exactly that
moment. Points: `pack` (a pack was made durable), `committing` (a generation's journal line is
on disk, the generation not yet written), `checkpoint` (a checkpoint was written). Unset, a
call costs one comparison."""
from __future__ import annotations

import os
import signal
import threading

_SPEC = os.environ.get("HUMIOFS_FAILPOINT") or None
_counts: dict[str, int] = {}
_lock = threading.Lock()


def reached(point: str) -> None:
    if _SPEC is None:
        return
    with _lock:
        n = _counts[point] = _counts.get(point, 0) + 1
    if _SPEC == f"{point}:{n}":
        os.kill(os.getpid(), signal.SIGSTOP)
