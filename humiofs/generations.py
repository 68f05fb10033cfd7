"""Choosing a generation: the latest one, or the latest at or before a given time."""
from __future__ import annotations

import logging
import re
from datetime import datetime, timezone

from humiofs.errors import ConfigError, StoreError
from humiofs.format import Generation, generation_time
from humiofs.store import Store

log = logging.getLogger(__name__)
_UNIX = re.compile(r"^@(\d+(?:\.\d+)?)$")


def parse_time(text: str) -> int:
    """Unix milliseconds from `@SECONDS` or an ISO 8601 date/time (local time if no zone)."""
    text = text.strip()
    m = _UNIX.match(text)
    if m:
        return int(float(m.group(1)) * 1000)
    try:
        dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError(f"cannot read time {text!r}; use ISO 8601 like 2026-11-24T10:00 "
                          "or @UNIXSECONDS") from None
    if dt.tzinfo is None:
        dt = dt.astimezone()
    return int(dt.timestamp() * 1000)


def format_time(ms: int) -> str:
    """A generation time for people: ISO 8601 in UTC, to the second."""
    return datetime.fromtimestamp(ms / 1000, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def latest_readable(store: Store) -> Generation | None:
    """The newest generation that reads back, skipping damaged ones with a warning; the
    parent of a new backup."""
    for name in reversed(store.list_generations()):
        try:
            return store.load_generation(name)
        except StoreError as exc:
            log.warning("ignoring damaged generation %s: %s", name, exc)
    return None


def pick(store: Store, at: str | None = None) -> Generation:
    """The latest generation, or the latest committed at or before `at`."""
    names = store.list_generations()
    if at is not None:
        limit = parse_time(at)
        names = [n for n in names if generation_time(n) <= limit]
    if not names:
        when = f" at or before {at}" if at else ""
        raise StoreError(f"store {store.path} has no generation{when}", 2)
    return store.load_generation(names[-1])
