"""Extended attributes (and so POSIX ACLs) of node entries: read at backup, written at restore.

Calls take an open fd where there is one, else a folder fd and a name. A name is reached as
`/proc/self/fd/DFD/NAME` without following a final symlink: Linux has no *xattrat calls before
6.13, and this form neither follows a symlink nor depends on the entry's full path, which may
be longer than PATH_MAX. Rules for names and values: FORMAT.md section 7.1.
"""
from __future__ import annotations

import errno
import os

from humiofs.store.format import Xattrs

# A filesystem that has no extended attributes at all answers these: nothing to keep.
_UNSUPPORTED = (errno.ENOTSUP, errno.EOPNOTSUPP)


def at(dfd: int, name: bytes) -> bytes:
    """The path of `name` in the folder `dfd` that xattr calls can take (see above)."""
    return b"/proc/self/fd/%d/%s" % (dfd, name)


def read(target: int | bytes) -> Xattrs:
    """Every extended attribute of `target` (an fd, or a path from `at()`), sorted by name.

    Raises OSError if they cannot be listed or read; an attribute removed between the listing
    and its read is left out.
    """
    follow = isinstance(target, int)
    try:
        names = os.listxattr(target, follow_symlinks=follow)
    except OSError as exc:
        if exc.errno in _UNSUPPORTED:
            return ()
        raise
    if not names:
        return ()
    out = []
    for name in sorted(os.fsencode(n) for n in names):
        try:
            value = os.getxattr(target, name, follow_symlinks=follow)
        except OSError as exc:
            if exc.errno == errno.ENODATA:
                continue
            raise
        out.append((name, value))
    return tuple(out)


def write(target: int | bytes, xattrs: Xattrs) -> list[tuple[bytes, OSError]]:
    """Sets each attribute on `target` (an fd, or a path from `at()`); returns the ones the
    target refused, with the error, instead of raising (setting `trusted.*` needs root, and
    `security.*` a security module that accepts the value)."""
    follow = isinstance(target, int)
    failed = []
    for name, value in xattrs:
        try:
            os.setxattr(target, name, value, follow_symlinks=follow)
        except OSError as exc:
            failed.append((name, exc))
    return failed
