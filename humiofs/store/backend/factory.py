"""Which backend holds BACKUP_DIR: `open_location` is the one place that tells (a module of
its own, so that the interface in __init__.py imports no implementation)."""
from __future__ import annotations

from pathlib import Path

from humiofs.store.backend import Location
from humiofs.store.backend.local import LocalLocation


def open_location(backup_dir: Path | str) -> Location:
    """The Location BACKUP_DIR names: for now always a local folder (LocalLocation).

    Object storage (`s3://BUCKET/PREFIX`) is added here, by s3.py: test the string's scheme
    before it is taken for a path."""
    # s3://: return s3.S3Location(...) here.
    return LocalLocation(Path(backup_dir))
