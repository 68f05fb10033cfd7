"""Locks on object storage: a lease object that two hosts can never both hold (docs/S3.md,
"The writer lock").

The lock `NAME` is the object `NAME` holding `humiofs-s3-lock 1 TOKEN LEASE_S\n` and the
holder's info. It is taken by a PUT with If-None-Match: * (one of any number of racing PUTs
wins), kept by rewriting it every LEASE_S/10 with If-Match on its ETag, and given back by
deleting it. A lock not rewritten for LEASE_S by the server's clock (its Last-Modified against
the Last-Modified of an object written just now) is stale: it is taken over by a PUT with
If-Match on the ETag that was read, so of several takers only one wins. A holder whose last
confirmed rewrite is more than LEASE_S/2 old, or whose rewrite fails its If-Match, has lost
the lock: the backend then refuses every further write (OSError ENOLCK).
"""
from __future__ import annotations

import errno
import logging
import math
import os
import threading
import time
from typing import TYPE_CHECKING

from humiofs.store.backend import Busy, Lock

if TYPE_CHECKING:
    from humiofs.store.backend.s3 import S3Backend

log = logging.getLogger(__name__)

LEASE_S = 300.0     # HUMIOFS_S3_LEASE_S changes it (tests): at least 3 s
MAGIC = b"humiofs-s3-lock 1 "
POLL_S = 0.5        # how often a waiting taker looks again


def lease_s() -> float:
    try:
        return max(3.0, float(os.environ.get("HUMIOFS_S3_LEASE_S", LEASE_S)))
    except ValueError:
        return LEASE_S


def _body(token: str, lease: float, info: bytes) -> bytes:
    return MAGIC + f"{token} {lease:g}\n".encode() + info


def _parse(body: bytes) -> tuple[str, float, bytes]:
    """(token, lease_s, info) of a lock object; a foreign one: ("", LEASE_S, body)."""
    if body.startswith(MAGIC) and b"\n" in body:
        head, info = body[len(MAGIC):].split(b"\n", 1)
        try:
            token, lease = head.decode().split(" ")
            return token, min(max(float(lease), 3.0), 86400.0), info
        except ValueError:
            pass
    return "", LEASE_S, body


def _server_now(backend: S3Backend, name: str, token: str) -> float:
    """The server's clock now (seconds since the epoch): the Last-Modified of an object
    written for the purpose, so that a taker's own clock never judges a holder's lease."""
    import obstore
    probe = backend.key(f"{name}.clock-{token}")
    try:
        obstore.put(backend.client, probe, b"", use_multipart=False)
        now = obstore.head(backend.client, probe)["last_modified"].timestamp()
        obstore.delete(backend.client, probe)
    except Exception as exc:
        raise backend.error(exc, f"{name}.clock-{token}") from None
    return float(now)


def _look(backend: S3Backend, name: str) -> tuple[bytes, str, float] | None:
    """(body, ETag unquoted, Last-Modified) of the lock object, None if there is none."""
    import obstore
    try:
        got = obstore.get(backend.client, backend.key(name))
        body = bytes(got.bytes())
    except FileNotFoundError as exc:
        if "NoSuchBucket" in str(exc):
            raise backend.error(exc, name) from None
        return None
    except Exception as exc:
        raise backend.error(exc, name) from None
    meta = got.meta
    return body, (meta["e_tag"] or "").strip('"'), meta["last_modified"].timestamp()


class S3Lock(Lock):
    """A held lease lock; a daemon thread rewrites it every lease/10 seconds."""

    def __init__(self, backend: S3Backend, name: str, token: str, body: bytes, etag: str,
                 lease: float, since: float) -> None:
        self.backend = backend
        self.name = name
        self.token = token
        self.lease = lease
        self._body = body
        self._etag = etag
        self._confirmed = since     # time.monotonic() when the last rewrite was sent
        self._lost = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._keep, name=f"s3-lease-{name}",
                                        daemon=True)
        self._released = False
        backend._held.append(self)
        self._thread.start()

    def _keep(self) -> None:
        import obstore
        from obstore.exceptions import PreconditionError
        while not self._stop.wait(self.lease / 10):
            sent = time.monotonic()
            try:
                res = obstore.put(self.backend.client, self.backend.key(self.name), self._body,
                                  use_multipart=False,
                                  mode={"e_tag": self._etag})
                self._etag = (res["e_tag"] or self._etag).strip('"')
                self._confirmed = sent
            except (PreconditionError, FileNotFoundError):
                self._lost = "another process took it over or removed it"
            except Exception as exc:
                log.warning("cannot renew the lock %s/%s: %s", self.backend.location,
                            self.name, self.backend.error(exc, self.name).strerror)
                if time.monotonic() - self._confirmed > self.lease:
                    self._lost = f"it could not be renewed for {self.lease:g} s"
            if self._lost:
                log.error("lost the lock %s/%s: %s", self.backend.location, self.name,
                          self._lost)
                return

    def check(self) -> None:
        """Raises OSError(ENOLCK) once the lock may be another's: the lease confirmed more
        than lease/2 ago leaves a write sent now the other half to land."""
        if self._released:
            return
        age = time.monotonic() - self._confirmed
        if not self._lost and age > self.lease / 2:
            self._lost = f"it was last renewed {age:.0f} s ago"
        if self._lost:
            raise OSError(errno.ENOLCK, f"lost the lock {self.name} of {self.backend.location} "
                                        f"({self._lost}); nothing more is written")

    def release(self) -> None:
        import obstore
        if self._released:
            return
        self._released = True
        self._stop.set()
        self._thread.join()
        try:
            self.backend._held.remove(self)
        except ValueError:
            pass
        if self._lost:
            return
        # RadosGW ignores If-Match on DELETE (docs/S3.md): look first, and delete only our
        # own lock, which nobody can take over while its lease runs.
        try:
            seen = _look(self.backend, self.name)
            if seen is not None and _parse(seen[0])[0] == self.token:
                obstore.delete(self.backend.client, self.backend.key(self.name))
        except Exception as exc:
            log.warning("cannot remove the lock %s/%s (it goes stale in %g s): %s",
                        self.backend.location, self.name, self.lease, exc)


def take(backend: S3Backend, name: str, info: bytes, wait_s: float) -> S3Lock:
    """Backend.lock on object storage. Raises Busy, or OSError for the service's failures."""
    import obstore
    from obstore.exceptions import AlreadyExistsError, PreconditionError
    token = os.urandom(16).hex()
    lease = lease_s()
    body = _body(token, lease, info)
    deadline = time.monotonic() + wait_s if math.isfinite(wait_s) else math.inf
    while True:
        sent = time.monotonic()
        try:
            res = obstore.put(backend.client, backend.key(name), body, use_multipart=False,
                              mode="create")
            return S3Lock(backend, name, token, body, (res["e_tag"] or "").strip('"'), lease,
                          sent)
        except AlreadyExistsError:
            pass
        except Exception as exc:
            raise backend.error(exc, name) from None
        seen = _look(backend, name)
        if seen is None:
            continue        # released between the two requests
        held, etag, modified = seen
        holder, holder_lease, holder_info = _parse(held)
        if holder == token:
            # Our own create landed, its answer was lost and the client's retry found it.
            return S3Lock(backend, name, token, body, etag, lease, sent)
        if _server_now(backend, name, token) - modified > holder_lease:
            sent = time.monotonic()
            try:
                res = obstore.put(backend.client, backend.key(name), body, use_multipart=False,
                                  mode={"e_tag": etag})
                log.warning("took over the lock %s/%s, not renewed for over %g s",
                            backend.location, name, holder_lease)
                return S3Lock(backend, name, token, body,
                              (res["e_tag"] or "").strip('"'), lease, sent)
            except (PreconditionError, FileNotFoundError):
                pass        # renewed, released or taken by another: look again
            except Exception as exc:
                raise backend.error(exc, name) from None
        if time.monotonic() >= deadline:
            raise Busy(holder_info)
        time.sleep(min(POLL_S, max(0.0, deadline - time.monotonic())))


def is_held(backend: S3Backend, name: str) -> bool:
    """Backend.locked on object storage: a lock object whose lease has not run out."""
    try:
        seen = _look(backend, name)
        if seen is None:
            return False
        body, _, modified = seen
        return _server_now(backend, name, os.urandom(8).hex()) - modified <= _parse(body)[1]
    except OSError:
        return True

