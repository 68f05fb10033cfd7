"""Restore: a generation's tree back onto disk, holes exact, never outside the target.

Every path is opened relative to a directory fd with O_NOFOLLOW, so neither a name in the
store nor a symlink already in the target can make restore write elsewhere. Files are written
under a temporary name and renamed into place only once all their data has authenticated.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

from humiofs.backup import scan, xattrs
from humiofs.errors import IntegrityError, StoreError, TargetError, os_reason, show
from humiofs.progress import Progress
from humiofs.store import crypto, format
from humiofs.store.format import DIR, FILE, SYMLINK, Entry, Generation, Ref, Xattrs, check_name
from humiofs.store.repository import Store

log = logging.getLogger(__name__)


@dataclass
class RestoreOptions:
    target: Path
    missing_only: bool = False
    overwrite: bool = False
    progress: bool | None = None
    # Damaged store data skips that file (or folder) with an error naming it, instead of
    # ending the restore; the caller reports the damaged paths and exits 5 at the end.
    keep_going: bool = False


@dataclass
class RestoreStats:
    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    specials: int = 0
    links: int = 0          # files restored as another name of an inode already restored
    skipped: int = 0
    present: int = 0        # with --missing-only: entries already in the target, left alone
    xattrs_refused: int = 0  # extended attribute names the target refused (each warned once)
    bytes: int = 0
    warnings: list[str] = field(default_factory=list)
    damaged: list[str] = field(default_factory=list)   # with keep_going: paths not restored


class Restore:
    """Writes one generation into a target directory."""

    def __init__(self, store: Store, options: RestoreOptions) -> None:
        self.store = store
        self.opt = options
        self.stats = RestoreStats()
        self._as_root = os.geteuid() == 0
        self._progress = Progress(enabled=options.progress)
        # Hard links: Entry.link_key() -> [O_PATH fd of the first name restored, names left].
        self._links: dict[object, list[int]] = {}
        # Extended attributes the target refused: name -> (count, first path, error).
        self._xattr_failures: dict[bytes, tuple[int, bytes, str]] = {}
        # Folders made and not yet given their attributes (see _made_folder).
        self._root_fd = -1
        self._made_fd = -1
        self._resumed: set[bytes] = set()
        self._root_created = False
        self._root_probed = False       # something was created in the target, or probed

    def run(self, gen: Generation) -> RestoreStats:
        target = self.opt.target
        self._progress.total_bytes = gen.stats.get("data_bytes", 0)
        try:
            root_created = not os.path.isdir(target)
            os.makedirs(target, exist_ok=True)
            root_fd = os.open(target, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileExistsError:
            raise TargetError(f"restore target {target} exists and is not a folder") from None
        except OSError as exc:
            raise TargetError(f"cannot use restore target {target}: {exc.strerror}") from None
        try:
            if not (self.opt.missing_only or self.opt.overwrite) and os.listdir(root_fd):
                raise TargetError(f"restore target {target} is not empty; use --missing-only "
                                  "to add what is missing or --overwrite to replace files")
            self._root_fd = root_fd
            self._resumed = self._read_made_folders()
            # Listed with the first folder made: alone it was made by os.makedirs with the
            # usual mode, and a run that made nothing else leaves no list. A target that was
            # empty when a plain restore began is this restore's too (a --missing-only run
            # after it gives it its attributes).
            self._root_created = root_created or not (self.opt.missing_only or
                                                      self.opt.overwrite)
            with scan.deep_walk():
                self._tree(root_fd, b"", gen.root.tree, fresh=not (self.opt.missing_only or
                                                                   self.opt.overwrite))
            # Every folder below has its attributes now; the list goes before the target's
            # own mtime is set (removing it changes that).
            self._close_made_folders()
            if not self.opt.missing_only or root_created or b"." in self._resumed:
                # (A fresh restore always sets them: the target was empty.)
                try:
                    self._set_attrs(root_fd, b".", gen.root.mode, gen.root.uid, gen.root.gid,
                                    gen.root.mtime_ns, gen.root.xattrs, drop_list=True)
                except OSError as exc:
                    # An immutable target, root squashed by NFS: the files are there.
                    raise TargetError(f"cannot set the owner, mode or times of the restore "
                                      f"target {target}: {exc.strerror}") from None
            else:
                _unlink_at(root_fd, MADE_FOLDERS)
            _syncfs(root_fd)
        finally:
            self._close_made_folders()
            os.close(root_fd)
            for fd, _left in self._links.values():
                os.close(fd)
            self._links.clear()
            self._progress.close()
            self._report_xattr_failures()
        return self.stats

    def _tree(self, dfd: int, rel: bytes, ref: Ref, fresh: bool) -> None:
        """Restores the tree at `ref` into the folder `dfd`; `fresh` if this restore has just
        made that folder (else what a killed restore left in it is removed first)."""
        try:
            entries = self.store.read_tree(ref)
        except StoreError as exc:
            where = f"folder {show(rel)}" if rel else "the top folder"
            self._damaged(f"{show(rel)}/ (the whole folder)" if rel else "./ (everything)",
                          f"cannot restore {where}: {exc}")
            return
        if not fresh:
            self._remove_leftovers(dfd, rel, {e.name for e in entries})
        for e in entries:
            check_name(e.name)
            path = rel + b"/" + e.name if rel else e.name
            try:
                if e.type == DIR:
                    self._dir(dfd, path, e)
                elif e.type == FILE:
                    self._file(dfd, path, e)
                elif e.type == SYMLINK:
                    self._symlink(dfd, path, e)
                else:
                    self._special(dfd, path, e)
            except OSError as exc:
                # A full or read-only target ends the restore; anything else is about this
                # entry (a file too large for the target, a name it refuses, folders nested
                # deeper than the open-file limit): named in a warning, the rest restored.
                if exc.errno in _FATAL:
                    raise _target_error(exc, path) from None
                if not rel and exc.errno in (errno.EPERM, errno.EACCES):
                    self._root_writable()
                self._skip(path, f"{os_reason(exc)}; not restored")
            else:
                if not rel:
                    self._root_probed = True

    def _root_writable(self) -> None:
        """Raises TargetError (one line, exit 6) if nothing can be created in the target
        itself (immutable, read-only for this user): else each entry would be a warning.
        Probed once, at the first refusal before anything was restored there."""
        if self._root_probed:
            return
        self._root_probed = True
        name = os.fsdecode(_temp_name())
        try:
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o600, dir_fd=self._root_fd)
        except OSError as exc:
            raise TargetError(f"cannot write into the restore target {self.opt.target}: "
                              f"{exc.strerror} (is it immutable, chattr +i, or not writable "
                              "for this user?); nothing was restored") from None
        os.close(fd)
        _unlink_at(self._root_fd, name)

    def _exists(self, dfd: int, name: bytes) -> os.stat_result | None:
        try:
            return os.stat(name, dir_fd=dfd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    def _damaged(self, shown: str, message: str) -> None:
        """Store data behind `shown` is damaged: the end of the restore, or with keep_going
        an error naming it, and on to the next file."""
        if not self.opt.keep_going:
            raise IntegrityError(f"{message} (restore --keep-going restores everything else)")
        self.stats.damaged.append(shown)
        log.error("%s; not restored", message)

    def _remove_leftovers(self, dfd: int, rel: bytes, names: set[bytes]) -> None:
        """Removes the temporary files a killed restore left in this folder (names no
        generation entry has, in the form _temp_name makes); never a folder."""
        with os.scandir(dfd) as it:
            stale = [os.fsencode(de.name) for de in it
                     if _TEMP_NAME.match(de.name) and not de.is_dir(follow_symlinks=False)]
        for name in stale:
            if name in names:
                continue
            try:
                os.unlink(name, dir_fd=dfd)
            except FileNotFoundError:
                continue
            log.info("removed %s, left by an interrupted restore",
                     show(rel + b"/" + name if rel else name))

    def _skip(self, path: bytes, why: str) -> None:
        self.stats.skipped += 1
        msg = f"{show(path)}: {why}"
        self.stats.warnings.append(msg)
        log.warning("%s", msg)

    def _dir(self, dfd: int, path: bytes, e: Entry) -> None:
        st = self._exists(dfd, e.name)
        if st is not None and not stat.S_ISDIR(st.st_mode):
            if not self.opt.overwrite:
                if not self.opt.missing_only:
                    raise TargetError(f"{show(path)} exists in the target; use "
                                      "--overwrite to replace it")
                self._skip(path, "exists and is not a folder; left alone")
                return
            os.unlink(e.name, dir_fd=dfd)
            st = None
        created = st is None
        if created:
            self._made_folder(path)     # first: a kill right after mkdir leaves it listed
            os.mkdir(e.name, 0o700, dir_fd=dfd)
        sub = os.open(e.name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                      dir_fd=dfd)
        try:
            assert e.subtree is not None
            self._tree(sub, path, e.subtree, fresh=created)
            # --missing-only leaves folders that were already there as they are, except
            # those a restore made and did not finish (their mode is still 0700).
            if created or not self.opt.missing_only or path in self._resumed:
                self._set_attrs(sub, path, e.mode, e.uid, e.gid, e.mtime_ns, e.xattrs)
        finally:
            os.close(sub)
        self.stats.dirs += 1

    # -- the folders a run made, listed until their attributes are set -----------------------

    def _read_made_folders(self) -> set[bytes]:
        """The folders an interrupted restore into this target made (paths relative to it,
        b"." the target itself), from TARGET/.humiofs-restore-folders."""
        try:
            fd = os.open(MADE_FOLDERS, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC,
                         dir_fd=self._root_fd)
        except FileNotFoundError:
            return set()
        with open(fd, "rb") as f:
            return set(f.read().split(b"\0")) - {b""}

    def _made_folder(self, path: bytes) -> None:
        """Lists `path` as made by this run, before it is made."""
        if path in self._resumed:
            return
        if self._made_fd < 0:
            self._made_fd = os.open(MADE_FOLDERS, os.O_WRONLY | os.O_APPEND | os.O_CREAT |
                                    os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=self._root_fd)
            if self._root_created:
                path = b".\0" + path
        os.write(self._made_fd, path + b"\0")

    def _close_made_folders(self) -> None:
        if self._made_fd >= 0:
            os.close(self._made_fd)
            self._made_fd = -1

    def _may_write(self, dfd: int, path: bytes, name: bytes) -> bool:
        st = self._exists(dfd, name)
        if st is None:
            return True
        if self.opt.overwrite:
            if stat.S_ISDIR(st.st_mode):
                self._skip(path, "a folder is in the way; left alone")
                return False
            return True
        if self.opt.missing_only:
            self.stats.present += 1
            return False
        raise TargetError(f"{show(path)} exists in the target; use --overwrite to "
                          "replace it")

    def _link(self, dfd: int, path: bytes, e: Entry) -> bool:
        """Restores `e` as another name of an inode restored before (FORMAT.md 7.1, hard
        links); False if it is the first name of its inode, or the link cannot be made."""
        key = e.link_key()
        held = self._links.get(key) if key is not None else None
        if held is None:
            return False
        tmp = _temp_name()
        try:
            # linkat() through /proc follows the O_PATH fd to the inode itself: no path of the
            # first name is looked up again, so nothing in the target can redirect it.
            os.link(b"/proc/self/fd/%d" % held[0], tmp, dst_dir_fd=dfd, follow_symlinks=True)
        except OSError as exc:
            log.info("%s: cannot be linked to its other name (%s); writing a copy",
                     show(path), exc.strerror)
            return False
        try:
            os.rename(tmp, e.name, src_dir_fd=dfd, dst_dir_fd=dfd)
        except BaseException:
            os.unlink(tmp, dir_fd=dfd)
            raise
        held[1] -= 1
        if held[1] <= 0:
            os.close(held[0])
            del self._links[key]
        self.stats.links += 1
        return True

    def _linked(self, dfd: int, e: Entry) -> None:
        """Remembers the inode just restored as `e.name`, for its other names."""
        key = e.link_key()
        if key is None:
            return
        try:
            fd = os.open(e.name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
        except OSError:
            return   # e.g. out of fds: its other names are written as copies
        self._links[key] = [fd, e.nlink - 1]

    def _file(self, dfd: int, path: bytes, e: Entry) -> None:
        if not self._may_write(dfd, path, e.name):
            return
        if self._link(dfd, path, e):
            self.stats.files += 1
            self._progress.update(1, 0)
            return
        tmp = _temp_name()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600, dir_fd=dfd)
        try:
            try:
                self._write_data(fd, e)
            except StoreError as exc:
                os.close(fd)
                fd = -1
                os.unlink(tmp, dir_fd=dfd)
                self._damaged(show(path), f"cannot restore {show(path)}: {exc}")
                return
            os.ftruncate(fd, e.size)
            self._set_attrs(fd, path, e.mode, e.uid, e.gid, e.mtime_ns, e.xattrs)
            os.close(fd)
            fd = -1
            os.rename(tmp, e.name, src_dir_fd=dfd, dst_dir_fd=dfd)
        except BaseException:
            if fd >= 0:
                os.close(fd)
            try:
                os.unlink(tmp, dir_fd=dfd)
            except FileNotFoundError:
                pass
            raise
        self._linked(dfd, e)
        self.stats.files += 1
        self._progress.update(1, 0)

    def _write_data(self, fd: int, e: Entry) -> None:
        if e.data is None:
            return
        extents = iter(e.extents)
        ext_off, ext_left = next(extents)
        for piece in self.store.iter_blob(e.data, crypto.KIND_DATA):
            view = memoryview(piece)
            while view:
                while ext_left == 0:
                    ext_off, ext_left = next(extents)
                n = min(ext_left, len(view))
                _pwrite_all(fd, view[:n], ext_off)
                view = view[n:]
                ext_off += n
                ext_left -= n
            self.stats.bytes += len(piece)
            self._progress.update(0, len(piece))

    def _symlink(self, dfd: int, path: bytes, e: Entry) -> None:
        if not self._may_write(dfd, path, e.name):
            return
        tmp = _temp_name()
        os.symlink(e.target, tmp, dir_fd=dfd)
        self._finish_node(dfd, tmp, path, e)
        self.stats.symlinks += 1

    def _special(self, dfd: int, path: bytes, e: Entry) -> None:
        """A FIFO, or (as root) a device node."""
        if e.type not in format.SPECIALS:
            raise IntegrityError(f"cannot restore {show(path)}: unknown type {e.type}")
        if e.type != format.FIFO and not self._as_root:
            self._skip(path, "a device node; only root can create it")
            return
        if not self._may_write(dfd, path, e.name):
            return
        if self._link(dfd, path, e):
            self.stats.specials += 1
            return
        tmp = _temp_name()
        try:
            if e.type == format.FIFO:
                os.mkfifo(tmp, 0o600, dir_fd=dfd)
            else:
                kind = stat.S_IFCHR if e.type == format.CHR else stat.S_IFBLK
                os.mknod(tmp, kind | 0o600, os.makedev(*e.rdev), dir_fd=dfd)
        except OSError as exc:
            # A container without CAP_MKNOD, or a target filesystem without FIFOs or devices.
            if exc.errno not in (errno.EPERM, errno.EACCES, errno.EOPNOTSUPP, errno.EINVAL):
                raise
            what = "a FIFO" if e.type == format.FIFO else "a device node"
            self._skip(path, f"{what} cannot be created here ({exc.strerror})")
            return
        self._finish_node(dfd, tmp, path, e)
        self._linked(dfd, e)
        self.stats.specials += 1

    def _finish_node(self, dfd: int, tmp: bytes, path: bytes, e: Entry) -> None:
        """Sets the attributes of a symlink, FIFO or device node just made as `tmp`, without
        opening it (which could block, or act on a device) or following it, then renames it
        into place."""
        try:
            if self._as_root:
                os.chown(tmp, e.uid, e.gid, dir_fd=dfd, follow_symlinks=False)
            if e.type != SYMLINK:
                os.chmod(tmp, e.mode, dir_fd=dfd, follow_symlinks=False)
            self._set_xattrs(xattrs.at(dfd, tmp), path, e.xattrs)
            os.utime(tmp, ns=(e.mtime_ns, e.mtime_ns), dir_fd=dfd, follow_symlinks=False)
            os.rename(tmp, e.name, src_dir_fd=dfd, dst_dir_fd=dfd)
        except BaseException:
            os.unlink(tmp, dir_fd=dfd)
            raise

    def _set_attrs(self, fd: int, path: bytes, mode: int, uid: int, gid: int, mtime_ns: int,
                   attrs: Xattrs, drop_list: bool = False) -> None:
        # In this order: chown clears set-id bits and file capabilities, and every xattr set
        # moves the ctime only (the mtime is set last). The target's own list of made folders
        # is removed just before its mtime is set (`drop_list`): a mode that forbids writing
        # would keep it from going.
        if self._as_root:
            os.fchown(fd, uid, gid)
        if drop_list:
            _unlink_at(fd, MADE_FOLDERS)
        os.fchmod(fd, mode)
        self._set_xattrs(fd, path, attrs)
        os.utime(fd, ns=(mtime_ns, mtime_ns))

    def _set_xattrs(self, target: int | bytes, path: bytes, attrs: Xattrs) -> None:
        if not attrs:
            return
        for name, exc in xattrs.write(target, attrs):
            count, first, why = self._xattr_failures.get(name, (0, path, exc.strerror or ""))
            self._xattr_failures[name] = (count + 1, first, why)

    def _report_xattr_failures(self) -> None:
        """One warning per attribute name the target refused (often all of a kind, such as
        `security.selinux` without SELinux or `trusted.*` without root)."""
        for name, (count, first, why) in sorted(self._xattr_failures.items()):
            more = f" and {count - 1} more" if count > 1 else ""
            self.stats.xattrs_refused += 1
            msg = (f"{show(first)}: extended attribute {show(name)} not restored on this "
                   f"entry{more}: {why}")
            self.stats.warnings.append(msg)
            log.warning("%s", msg)
        self._xattr_failures.clear()


# In the target while a restore runs: the folders it made, NUL-separated, so that a restore
# after it was stopped or killed (--missing-only included) gives them their stored attributes.
MADE_FOLDERS = ".humiofs-restore-folders"
_TEMP_NAME = re.compile(r"^\.humiofs-restore-[0-9a-f]{12}$")


def _temp_name() -> bytes:
    """A name in the target folder for a file or symlink until it is complete."""
    return b".humiofs-restore-" + os.urandom(6).hex().encode()


def _unlink_at(dfd: int, name: str) -> None:
    try:
        os.unlink(name, dir_fd=dfd)
    except FileNotFoundError:
        pass


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        n = os.pwrite(fd, data, offset)
        data = data[n:]
        offset += n


_FATAL = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


def _target_error(exc: OSError, path: bytes) -> TargetError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return TargetError(f"restore target is full while writing {show(path)}")
    return TargetError(f"cannot restore {show(path)}: {exc.strerror}")


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _syncfs(fd: int) -> None:
    """Flushes the target's filesystem once, instead of an fsync per restored file."""
    if _libc.syncfs(fd) != 0:
        os.sync()
