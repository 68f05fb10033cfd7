"""systemd drop-ins for the shipped units (contrib/systemd), made from the env file by
humiofs's own parser, so that the units need no EnvironmentFile= (which would read the file a
second time, by systemd's rules): where the backup drive and the node's data are
(RequiresMountsFor=), what the backup may write (ReadWritePaths=), and the key file handed
over as a credential (LoadCredential=). scripts/install runs `python -m humiofs.system.units`.
"""
from __future__ import annotations

import sys
from pathlib import Path

from humiofs import config
from humiofs.errors import ConfigError, HumiofsError

DROPIN = "50-env-file.conf"
CREDENTIAL = "backup.key"


def _path(name: str, value: str, prefix: str = "") -> str:
    """`value` as one entry of a space-separated path list of a unit (`prefix`, such as '-',
    before it): % escaped, and in double quotes with C escapes if it holds blanks, quotes or
    backslashes, which systemd takes. ConfigError for a path no unit can name."""
    if not value.startswith("/"):
        raise ConfigError(f"{name} {value!r} must be an absolute path for the systemd units")
    if any(ord(c) < 0x20 or c == "\x7f" for c in value):
        raise ConfigError(f"{name} {value!r}: the systemd units cannot take a path with "
                          "control characters")
    value = value.replace("%", "%%")
    if any(c.isspace() or c in "\"'\\;" for c in value):
        return prefix + '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return prefix + value


def dropins(env_file: Path) -> dict[str, str]:
    """{unit name: drop-in text} for humiofs-backup.service and humiofs-mount.service, from
    the settings in `env_file` alone (not the environment of whoever installs). ConfigError
    if the file cannot be read or a path cannot go into a unit."""
    text = config.read_env_text(env_file)
    values = config.parse_env_file(text, str(env_file), {})
    raw_dir = values.get("BACKUP_DIR") or config.DEFAULT_BACKUP_DIR
    # Object storage is no path: nothing to wait for or open up but the network, which the
    # units wait for anyway (network-online.target).
    remote = raw_dir.startswith("s3:")
    backup_dir = "" if remote else _path("BACKUP_DIR", raw_dir)
    head = (f"# Written by scripts/install from {env_file}; run it again after changing "
            "BACKUP_DIR,\n# DIRECTORY, BACKUP_STATE_DIR or BACKUP_KEY_FILE there.\n")
    key = ""
    if values.get("BACKUP_KEY_FILE"):
        # The credential is a copy only this service can read; BACKUP_KEY_FILE in the
        # environment wins over the env file's (humiofs's precedence).
        # LoadCredential= takes the rest of the line as the path, as it is (no quotes).
        key_file = values["BACKUP_KEY_FILE"]
        _path("BACKUP_KEY_FILE", key_file)
        if key_file != key_file.strip():
            raise ConfigError(f"BACKUP_KEY_FILE {key_file!r}: the systemd units cannot take a "
                              "path with blanks at its ends")
        key = (f"LoadCredential={CREDENTIAL}:{key_file.replace('%', '%%')}\n"
               f"Environment=BACKUP_KEY_FILE=%d/{CREDENTIAL}\n")
    needs = [backup_dir] if backup_dir else []
    if values.get("DIRECTORY"):
        needs.append(_path("DIRECTORY", values["DIRECTORY"]))
    # '-': a drive that is not mounted yet must not stop the sandbox from being set up;
    # humiofs then says so (exit 2) and the unit tries again.
    writable = [] if remote else [_path("BACKUP_DIR", raw_dir, "-")]
    if values.get("BACKUP_STATE_DIR"):
        writable.append(_path("BACKUP_STATE_DIR", values["BACKUP_STATE_DIR"], "-"))
    backup = (head + "[Unit]\n" + (f"RequiresMountsFor={' '.join(needs)}\n" if needs else "")
              + "\n[Service]\n"
              + (f"ReadWritePaths={' '.join(writable)}\n" if writable else "") + key)
    mount = (head + "[Unit]\n" + (f"RequiresMountsFor={backup_dir}\n" if backup_dir else "")
             + "\n[Service]\n" + key)
    return {"humiofs-backup.service": backup, "humiofs-mount.service": mount}


def main(argv: list[str]) -> int:
    """python -m humiofs.system.units ENV_FILE UNIT_DIR: writes UNIT_DIR/UNIT.d/50-env-file.conf."""
    if len(argv) != 2:
        print("usage: python -m humiofs.system.units ENV_FILE UNIT_DIR", file=sys.stderr)
        return 2
    try:
        for unit, text in dropins(Path(argv[0])).items():
            folder = Path(argv[1]) / f"{unit}.d"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / DROPIN).write_text(text)
    except HumiofsError as exc:
        print(f"humiofs: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:
        print(f"humiofs: error: cannot write the drop-ins: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
