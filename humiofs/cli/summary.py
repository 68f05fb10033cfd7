"""--json: each command's summary as one JSON object on one line of stdout (docs/JSON.md).

The objects are a stable interface: fields are added, never renamed or removed, and
`schema` changes only if one must be.
"""
from __future__ import annotations

import json
import sys
from typing import Any

from humiofs.store.format import Generation
from humiofs.store.generations import format_time

SCHEMA = 1


def emit(command: str, **fields: Any) -> None:
    """Writes {"schema": 1, "command": COMMAND, **fields} as one line, flushed."""
    obj = {"schema": SCHEMA, "command": command, **fields}
    sys.stdout.write(json.dumps(obj, sort_keys=False) + "\n")
    sys.stdout.flush()


def generation(gen: Generation | None) -> dict[str, str] | None:
    """{"name": generation name, "time": commit time as ls prints it (UTC, ms)}."""
    if gen is None:
        return None
    return {"name": gen.name, "time": format_time(gen.time_ms)}


def backup_files(stats: Any) -> dict[str, int]:
    """The file counts of a writer.BackupStats."""
    return {k: getattr(stats, k) for k in
            ("new", "changed", "unchanged", "live", "skipped", "vanished", "healed")}
