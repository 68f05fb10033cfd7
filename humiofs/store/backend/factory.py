"""Which backend holds BACKUP_DIR: `open_location` is the one place that tells (a module of
its own, so that the interface in __init__.py imports no implementation)."""
from __future__ import annotations

from pathlib import Path

from humiofs.store.backend import Location


def is_remote(backup_dir: Path | str) -> bool:
    """Whether BACKUP_DIR names object storage (`s3://BUCKET/PREFIX`) rather than a folder.
    config.load keeps such a BACKUP_DIR a string (a Path would fold its `//`)."""
    return isinstance(backup_dir, str) and backup_dir.startswith("s3://")


def store_at(backup_dir: Path | str, name: str) -> Path | str:
    """The store `name` in BACKUP_DIR: a Path in a folder, `s3://BUCKET/PREFIX/NAME` on
    object storage."""
    if is_remote(backup_dir):
        return f"{str(backup_dir).rstrip('/')}/{name}"
    return Path(backup_dir) / name


def open_location(backup_dir: Path | str) -> Location:
    """The Location BACKUP_DIR names: object storage (S3Location, with the AWS_* settings
    config.load registered, s3.use_settings) for `s3://BUCKET/PREFIX`, else a local folder
    (LocalLocation). ValueError with one line for a malformed s3:// URL or setting;
    ConfigError (exit 2) if obstore, the optional S3 client, is not installed."""
    if is_remote(backup_dir):
        try:
            import obstore  # noqa: F401  (the optional S3 client: the `s3` extra)
        except ImportError:
            from humiofs.errors import ConfigError
            raise ConfigError(f"BACKUP_DIR {backup_dir} is on object storage, which needs the "
                              "S3 client obstore: pip install 'humiofs[s3]' (scripts/setup "
                              "installs it)") from None
        from humiofs.store.backend import s3
        return s3.open_s3(str(backup_dir))
    from humiofs.store.backend.local import LocalLocation
    return LocalLocation(Path(backup_dir))
