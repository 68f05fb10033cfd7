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
import stat
from dataclasses import dataclass, field
from pathlib import Path

from humiofs import crypto
from humiofs.errors import IntegrityError, StoreError, TargetError
from humiofs.format import DIR, FILE, SYMLINK, Entry, Generation, Ref, check_name
from humiofs.progress import Progress
from humiofs.store import Store

log = logging.getLogger(__name__)


@dataclass
class RestoreOptions:
    target: Path
    missing_only: bool = False
    overwrite: bool = False
    progress: bool | None = None


@dataclass
class RestoreStats:
    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    skipped: int = 0
    bytes: int = 0
    warnings: list[str] = field(default_factory=list)


class Restore:
    """Writes one generation into a target directory."""

    def __init__(self, store: Store, options: RestoreOptions) -> None:
        self.store = store
        self.opt = options
        self.stats = RestoreStats()
        self._as_root = os.geteuid() == 0
        self._progress = Progress(enabled=options.progress)

    def run(self, gen: Generation) -> RestoreStats:
        target = self.opt.target
        self._progress.total_bytes = gen.stats.get("data_bytes", 0)
        try:
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
            self._tree(root_fd, b"", gen.root.tree)
            if not self.opt.missing_only:
                self._set_attrs(root_fd, gen.root.mode, gen.root.uid, gen.root.gid,
                                gen.root.mtime_ns)
            _syncfs(root_fd)
        finally:
            os.close(root_fd)
            self._progress.close()
        return self.stats

    def _tree(self, dfd: int, rel: bytes, ref: Ref) -> None:
        try:
            entries = self.store.read_tree(ref)
        except StoreError as exc:
            where = f"folder {os.fsdecode(rel)}" if rel else "the top folder"
            raise IntegrityError(f"cannot restore {where}: {exc}") from None
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
            except OSError as exc:
                raise _target_error(exc, path) from None

    def _exists(self, dfd: int, name: bytes) -> os.stat_result | None:
        try:
            return os.stat(name, dir_fd=dfd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    def _skip(self, path: bytes, why: str) -> None:
        self.stats.skipped += 1
        msg = f"{os.fsdecode(path)}: {why}"
        self.stats.warnings.append(msg)
        log.warning("%s", msg)

    def _dir(self, dfd: int, path: bytes, e: Entry) -> None:
        st = self._exists(dfd, e.name)
        if st is not None and not stat.S_ISDIR(st.st_mode):
            if not self.opt.overwrite:
                if not self.opt.missing_only:
                    raise TargetError(f"{os.fsdecode(path)} exists in the target; use "
                                      "--overwrite to replace it")
                self._skip(path, "exists and is not a folder; left alone")
                return
            os.unlink(e.name, dir_fd=dfd)
            st = None
        created = st is None
        if created:
            os.mkdir(e.name, 0o700, dir_fd=dfd)
        sub = os.open(e.name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                      dir_fd=dfd)
        try:
            assert e.subtree is not None
            self._tree(sub, path, e.subtree)
            # --missing-only leaves folders that were already there as they are.
            if created or not self.opt.missing_only:
                self._set_attrs(sub, e.mode, e.uid, e.gid, e.mtime_ns)
        finally:
            os.close(sub)
        self.stats.dirs += 1

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
            return False
        raise TargetError(f"{os.fsdecode(path)} exists in the target; use --overwrite to "
                          "replace it")

    def _file(self, dfd: int, path: bytes, e: Entry) -> None:
        if not self._may_write(dfd, path, e.name):
            return
        tmp = _temp_name()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600, dir_fd=dfd)
        try:
            try:
                self._write_data(fd, e)
            except (IntegrityError, StoreError) as exc:
                raise IntegrityError(f"cannot restore {os.fsdecode(path)}: {exc}") from None
            os.ftruncate(fd, e.size)
            self._set_attrs(fd, e.mode, e.uid, e.gid, e.mtime_ns)
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
        try:
            if self._as_root:
                os.chown(tmp, e.uid, e.gid, dir_fd=dfd, follow_symlinks=False)
            os.utime(tmp, ns=(e.mtime_ns, e.mtime_ns), dir_fd=dfd, follow_symlinks=False)
            os.rename(tmp, e.name, src_dir_fd=dfd, dst_dir_fd=dfd)
        except BaseException:
            os.unlink(tmp, dir_fd=dfd)
            raise
        self.stats.symlinks += 1

    def _set_attrs(self, fd: int, mode: int, uid: int, gid: int, mtime_ns: int) -> None:
        if self._as_root:
            os.fchown(fd, uid, gid)
        os.fchmod(fd, mode)
        os.utime(fd, ns=(mtime_ns, mtime_ns))


def _temp_name() -> bytes:
    """A name in the target folder for a file or symlink until it is complete."""
    return b".humiofs-restore-" + os.urandom(6).hex().encode()


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        n = os.pwrite(fd, data, offset)
        data = data[n:]
        offset += n


def _target_error(exc: OSError, path: bytes) -> TargetError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return TargetError(f"restore target is full while writing {os.fsdecode(path)}")
    return TargetError(f"cannot restore {os.fsdecode(path)}: {exc.strerror}")


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _syncfs(fd: int) -> None:
    """Flushes the target's filesystem once, instead of an fsync per restored file."""
    if _libc.syncfs(fd) != 0:
        os.sync()
