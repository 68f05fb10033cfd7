"""The pyfuse3 Operations over tree.Tree: a protocol adapter only.

Bytes names in, EntryAttributes out; NotFound becomes ENOENT, damaged store data EIO (logged with
the path), and anything that would write EROFS. No other exception leaves a handler: anything
else would end the whole mount.
"""
from __future__ import annotations

import errno
import functools
import logging
import os
from collections.abc import Callable, Sequence
from typing import TypeVar, cast

import pyfuse3
import trio

from humiofs.errors import StoreError, StoreIOError
from humiofs.mount import tree

log = logging.getLogger(__name__)

T = TypeVar("T")

# An inode number never stands for two different things (inodes.py: a file's number follows
# its attributes and data, a folder's its generation), so the kernel may keep names,
# attributes and file pages of every inode for as long as it likes. Only the
# top-level folders follow new backups (NAME/ moves to the newest generation): their entries
# and attributes expire quickly, so a new generation shows up within about a second.
STABLE_TIMEOUT = 86400.0
VOLATILE_TIMEOUT = 1.0
STORE_THREADS = 4
# Replies to getattr and lookup for inodes already answered once (about 210 bytes each; cleared
# when full). readdir hands out the replies kept with each listing (tree.Tree.replies_of).
ATTR_CACHE = 65_536
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC


_STORE_DOWN = frozenset({errno.ECONNREFUSED, errno.ECONNRESET, errno.ETIMEDOUT, errno.EHOSTUNREACH,
                         errno.ENETUNREACH, errno.ECONNABORTED, errno.ENOLCK})


def _erofs() -> pyfuse3.FUSEError:
    return pyfuse3.FUSEError(errno.EROFS)


def _fuse_error(what: str, args: tuple[object, ...], exc: Exception) -> pyfuse3.FUSEError:
    """The FUSEError the kernel gets for what a model call raised (logged as it deserves)."""
    if isinstance(exc, tree.NotFound):
        log.debug("%s%r: not found", what, args)
        return pyfuse3.FUSEError(errno.ENOENT)
    if isinstance(exc, (StoreError, StoreIOError)):
        # Damaged store data, or the store unreadable (its drive gone, the S3 service down).
        log.error("%s: %s", what, exc)
        return pyfuse3.FUSEError(errno.EIO)
    if isinstance(exc, OSError) and (isinstance(exc, (ConnectionError, TimeoutError))
                                     or exc.errno in _STORE_DOWN):
        # Reaching the store failed (after the client's retries): for a reader, an I/O
        # error like a disk's, not a network error of its own.
        log.error("%s: %s", what, exc.strerror or exc)
        return pyfuse3.FUSEError(errno.EIO)
    if isinstance(exc, OSError):
        log.debug("%s%r: %s", what, args, exc)
        return pyfuse3.FUSEError(exc.errno or errno.EIO)
    log.error("internal error in %s", what, exc_info=exc)
    return pyfuse3.FUSEError(errno.EIO)


class Operations(pyfuse3.Operations):
    """Serves a tree.Tree read-only."""

    supports_dot_lookup = True
    enable_writeback_cache = False

    def __init__(self, model: tree.Tree, threads: int = STORE_THREADS) -> None:
        super().__init__()
        self.tree = model
        # Metadata the model does not hold in memory is read and decrypted in worker threads,
        # so that one slow store read never stalls the requests behind it on the trio loop.
        # File data has its own path off the loop (reader.py: a decryption process).
        self._limiter = trio.CapacityLimiter(threads)
        self._dirs: dict[int, tree.Listing] = {}
        self._next_dh = 1
        # An inode's reply never changes (only the top-level folders', never kept here).
        self._replies: dict[int, pyfuse3.EntryAttributes] = {}
        # A tree folder's replies are built where its listing is read (a worker or the
        # prefetch thread, tree.py), off the request loop, and kept with the listing.
        model.replies_of = self._replies_for

    async def _call(self, what: str, fn: Callable[..., T], *args: object) -> T:
        """Runs a model call: from memory on the loop when it can, else in a worker thread;
        maps domain errors to FUSEError."""
        try:
            try:
                return fn(*args, block=False)
            except tree.WouldBlock:
                return await trio.to_thread.run_sync(functools.partial(fn, *args, block=True),
                                                     limiter=self._limiter)
        except Exception as exc:
            raise _fuse_error(what, args, exc) from None

    def _entry(self, attr: tree.Attr, parent_volatile: bool) -> pyfuse3.EntryAttributes:
        # What EntryAttributes() starts with is not set again: generation 0, st_blksize 4096
        # (cp --sparse=always and tar look for holes in st_blksize steps: 4 KiB finds them all),
        # st_rdev 0. Built once for every entry of a first walk, so every set counts.
        e = pyfuse3.EntryAttributes()
        e.st_ino = attr.inode
        e.entry_timeout = VOLATILE_TIMEOUT if parent_volatile else STABLE_TIMEOUT
        e.attr_timeout = VOLATILE_TIMEOUT if attr.volatile else STABLE_TIMEOUT
        e.st_mode = attr.mode
        e.st_nlink = attr.nlink
        e.st_uid = attr.uid
        e.st_gid = attr.gid
        if attr.rdev:
            e.st_rdev = attr.rdev
        e.st_size = attr.size
        e.st_blocks = attr.blocks
        e.st_atime_ns = e.st_ctime_ns = e.st_mtime_ns = attr.mtime_ns
        return e

    def _replies_for(self, attrs: list[tree.Attr]) -> list[pyfuse3.EntryAttributes]:
        """_entry() of each of a tree folder's entries (never volatile), in one loop: a first
        walk builds one for every entry it passes."""
        out: list[pyfuse3.EntryAttributes] = []
        append, new = out.append, pyfuse3.EntryAttributes
        for inode, mode, nlink, uid, gid, size, blocks, mtime_ns, _, rdev in attrs:
            e = new()
            e.st_ino = inode
            e.entry_timeout = e.attr_timeout = STABLE_TIMEOUT
            e.st_mode = mode
            e.st_nlink = nlink
            e.st_uid = uid
            e.st_gid = gid
            if rdev:
                e.st_rdev = rdev
            e.st_size = size
            e.st_blocks = blocks
            e.st_atime_ns = e.st_ctime_ns = e.st_mtime_ns = mtime_ns
            append(e)
        return out

    def _remember(self, inode: int, reply: pyfuse3.EntryAttributes) -> None:
        if len(self._replies) >= ATTR_CACHE:
            self._replies.clear()
        self._replies[inode] = reply

    async def _stable_reply(self, what: str, inode: int) -> pyfuse3.EntryAttributes:
        """The reply for an inode below the top-level folders."""
        reply = self._replies.get(inode)
        if reply is None:
            reply = self._entry(await self._call(what, self.tree.getattr, inode), False)
            self._remember(inode, reply)
        return reply

    # -- metadata -----------------------------------------------------------------------------

    async def lookup(self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT,
                     ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if self.tree.volatile(parent_inode):
            if name == b".":
                attr = await self._call("lookup", self.tree.getattr, parent_inode)
            elif name == b"..":
                up = await self._call("lookup", self.tree.parent, parent_inode)
                attr = await self._call("lookup", self.tree.getattr, up)
            else:
                attr = await self._call("lookup", self.tree.lookup, parent_inode, bytes(name))
            return self._entry(attr, True)
        if name == b".":
            inode = parent_inode
        elif name == b"..":
            inode = await self._call("lookup", self.tree.parent, parent_inode)
            if self.tree.volatile(inode):
                return self._entry(await self._call("lookup", self.tree.getattr, inode), False)
        else:
            inode = await self._call("lookup", self.tree.lookup_inode, parent_inode, bytes(name))
        return await self._stable_reply("lookup", inode)

    async def getattr(self, inode: pyfuse3.InodeT,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if self.tree.volatile(inode):
            return self._entry(await self._call("getattr", self.tree.getattr, inode), False)
        return await self._stable_reply("getattr", inode)

    async def readlink(self, inode: pyfuse3.InodeT,
                       ctx: pyfuse3.RequestContext) -> pyfuse3.FileNameT:
        target = await self._call("readlink", self.tree.readlink, inode)
        return target

    async def forget(self, inode_list: Sequence[tuple[pyfuse3.InodeT, int]]) -> None:
        # Every inode stays resolvable for the life of the mount (tree.py), so there is
        # nothing to count.
        pass

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        data_bytes, inodes = await self._call("statfs", self.tree.statfs)
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        s.f_blocks = -(-data_bytes // s.f_frsize)
        s.f_files = inodes
        # A snapshot has room for nothing more: no free blocks or inodes, so df shows 100%.
        s.f_bfree = s.f_bavail = 0
        s.f_ffree = s.f_favail = 0
        s.f_namemax = 255
        return s

    # -- extended attributes: the stored ones (FORMAT.md 7.1), read-only ----------------------

    async def getxattr(self, inode: pyfuse3.InodeT, name: pyfuse3.XAttrNameT,
                       ctx: pyfuse3.RequestContext) -> bytes:
        for key, value in await self._call("getxattr", self.tree.xattrs, inode):
            if key == name:
                return value
        raise pyfuse3.FUSEError(errno.ENODATA)

    async def listxattr(self, inode: pyfuse3.InodeT,
                        ctx: pyfuse3.RequestContext) -> Sequence[pyfuse3.XAttrNameT]:
        return [pyfuse3.XAttrNameT(name)
                for name, _ in await self._call("listxattr", self.tree.xattrs, inode)]

    # -- folders ------------------------------------------------------------------------------

    async def opendir(self, inode: pyfuse3.InodeT,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.FileHandleT:
        listing = await self._call("opendir", self.tree.opendir, inode)
        dh = self._next_dh
        self._next_dh += 1
        self._dirs[dh] = listing
        return dh

    async def readdir(self, fh: pyfuse3.FileHandleT, start_id: int,
                      token: pyfuse3.ReaddirToken) -> None:
        listing = self._dirs.get(fh)
        if listing is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        volatile = listing.volatile
        names, attrs = listing.names, listing.attrs
        made = cast(list[pyfuse3.EntryAttributes], listing.replies)
        reply_to, entry = pyfuse3.readdir_reply, self._entry
        try:
            # An entry's cookie is the index of the entry after it, so a listing larger than the
            # kernel's buffer resumes exactly there, and telldir/seekdir land where they should.
            reply: pyfuse3.EntryAttributes
            for i in range(start_id, len(names) + 2):
                if i < 2:
                    name, reply = (b".", b"..")[i], entry(listing.attr(i), volatile)
                else:
                    # A tree folder's replies were built with its listing (_replies_for).
                    name = names[i - 2]
                    reply = made[i - 2] if made else entry(attrs[i - 2], volatile)
                if not reply_to(token, name, reply, i + 1):
                    break
        except Exception as exc:
            raise _fuse_error("readdir", (fh, start_id), exc) from None

    async def releasedir(self, fh: pyfuse3.FileHandleT) -> None:
        self._dirs.pop(fh, None)

    # -- files --------------------------------------------------------------------------------

    async def open(self, inode: pyfuse3.InodeT, flags: int,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if flags & _WRITE_FLAGS:
            raise _erofs()
        fh = await self._call("open", self.tree.open, inode)
        # keep_cache: the file's pages stay valid across opens, the inode being immutable.
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    async def read(self, fh: pyfuse3.FileHandleT, off: int, size: int) -> bytes:
        # A memoryview into the chunk cache saves a copy: pyfuse3 takes any buffer, and
        # copies it into the kernel before anything else runs on this thread.
        try:
            return cast(bytes, await self.tree.read(fh, off, size))
        except Exception as exc:
            raise _fuse_error("read", (fh, off, size), exc) from None

    async def release(self, fh: pyfuse3.FileHandleT) -> None:
        self.tree.release(fh)

    # -- everything that would write: the filesystem is read-only at every level --------------

    async def setattr(self, inode: pyfuse3.InodeT, attr: pyfuse3.EntryAttributes,
                      fields: pyfuse3.SetattrFields, fh: pyfuse3.FileHandleT | None,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        raise _erofs()

    async def mknod(self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT,
                    mode: pyfuse3.ModeT, rdev: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        raise _erofs()

    async def mkdir(self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT,
                    mode: pyfuse3.ModeT, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        raise _erofs()

    async def unlink(self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT,
                     ctx: pyfuse3.RequestContext) -> None:
        raise _erofs()

    async def rmdir(self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT,
                    ctx: pyfuse3.RequestContext) -> None:
        raise _erofs()

    async def symlink(self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT,
                      target: pyfuse3.FileNameT,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        raise _erofs()

    async def rename(self, parent_inode_old: pyfuse3.InodeT, name_old: pyfuse3.FileNameT,
                     parent_inode_new: pyfuse3.InodeT, name_new: pyfuse3.FileNameT,
                     flags: pyfuse3.FlagT, ctx: pyfuse3.RequestContext) -> None:
        raise _erofs()

    async def link(self, inode: pyfuse3.InodeT, new_parent_inode: pyfuse3.InodeT,
                   new_name: pyfuse3.FileNameT,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        raise _erofs()

    async def create(self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT,
                     mode: pyfuse3.ModeT, flags: pyfuse3.FlagT,
                     ctx: pyfuse3.RequestContext) -> tuple[pyfuse3.FileInfo,
                                                           pyfuse3.EntryAttributes]:
        raise _erofs()

    async def write(self, fh: pyfuse3.FileHandleT, off: int, buf: bytes) -> int:
        raise _erofs()

    async def setxattr(self, inode: pyfuse3.InodeT, name: pyfuse3.XAttrNameT, value: bytes,
                       ctx: pyfuse3.RequestContext) -> None:
        raise _erofs()

    async def removexattr(self, inode: pyfuse3.InodeT, name: pyfuse3.XAttrNameT,
                          ctx: pyfuse3.RequestContext) -> None:
        raise _erofs()
