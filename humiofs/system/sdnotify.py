"""systemd's readiness protocol (sd_notify(3)) for Type=notify units, in a few lines over a
unix datagram socket: no dependency on libsystemd or a Python binding for one datagram.
"""
from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


def notify(state: str, environ: dict[str, str] | None = None) -> bool:
    """Sends `state` (for example "READY=1" or "STATUS=...", newline-separated assignments)
    to the socket named by $NOTIFY_SOCKET: a path, or an abstract address written with a
    leading '@'. Returns False, doing nothing, if NOTIFY_SOCKET is not set (not run by
    systemd as Type=notify); a socket that cannot be reached is logged as a warning, never
    raised: readiness is a courtesy to the service manager, not part of the job."""
    env = os.environ if environ is None else environ
    address = env.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address[0] == "@":
        target: str | bytes = "\0" + address[1:]
    elif address[0] == "/":
        target = address
    else:
        log.warning("NOTIFY_SOCKET %r is neither a path nor an abstract address; not "
                    "telling systemd %s", address, state)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(target)
            sock.sendall(state.encode())
    except OSError as exc:
        log.warning("cannot tell systemd %s at NOTIFY_SOCKET %s: %s", state, address,
                    exc.strerror or exc)
        return False
    return True


def ready(status: str | None = None) -> bool:
    """READY=1 (with a STATUS= line if given); see notify."""
    return notify("READY=1" + (f"\nSTATUS={status}" if status else ""))
