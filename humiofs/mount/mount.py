"""Mounting: checking the mountpoint, pyfuse3.init / trio.run / unmount, signals, and the
background mode.

Background mode does everything that can fail on the user's side (settings, mountpoint, key,
stores) in the calling process, so errors come out at once with their exit codes, then forks a
child that mounts and serves. The child reports through a pipe once it serves; the parent
returns when the mount is up. Nothing forks after trio or pyfuse3 have started.
"""
from __future__ import annotations

import errno
import logging
import logging.handlers
import os
import select
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from humiofs.errors import ConfigError, HumiofsError, TargetError
from humiofs.system import sdnotify

if TYPE_CHECKING:
    import trio

    from humiofs.mount import tree

# pyfuse3, trio and the adapter (fs.py) are imported where the mount starts, not here: the mount
# command imports them while the stores' Argon2id unwraps run (mount_cli.py), after the checks
# here (mountpoint, log file), which so stay fast.

log = logging.getLogger(__name__)

READY = b"ok\n"
READY_TIMEOUT_S = 30.0
SWITCH_INTERVAL_S = 0.0005


def check_mountpoint(path: Path) -> Path:
    """The absolute mountpoint; TargetError unless it is an existing, empty folder that is not
    mounted on."""
    path = Path(os.path.abspath(path))
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise TargetError(f"mountpoint {path} does not exist; create it with mkdir") from None
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:
            raise TargetError(f"{path} is a mount whose process has died; clear it with "
                              f"humiofs umount {path}") from None
        raise TargetError(f"cannot use mountpoint {path}: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise TargetError(f"mountpoint {path} is not a folder")
    if os.path.ismount(path):
        raise TargetError(f"mountpoint {path} is busy: something is already mounted there")
    try:
        busy = bool(os.listdir(path))
    except OSError as exc:
        raise TargetError(f"cannot use mountpoint {path}: {exc.strerror}") from None
    if busy:
        raise TargetError(f"mountpoint {path} is not empty; mount on an empty folder")
    return path


def options(allow_other: bool = False, source: str = "humiofs") -> set[str]:
    """The FUSE mount options: read-only at the kernel too, permissions checked by the kernel
    against the stored modes, other users locked out unless asked for, and neither the device
    nodes nor the set-id bits of a backup give anyone access to anything (nodev, nosuid).

    `source` is what the mount table shows as the mount's source: mount(8) passes its fstab
    source (the env file), and libmount finds the mount by it, so a second `mount -a` knows
    the line is mounted already. The type stays fuse.humiofs."""
    # libfuse splits options at commas; a backslash keeps one in the value.
    escaped = source.replace("\\", "\\\\").replace(",", "\\,")
    opts = {f"fsname={escaped}", "subtype=humiofs", "ro", "default_permissions", "nodev",
            "nosuid"}
    if allow_other:
        opts.add("allow_other")
    return opts


READ_AHEAD_KB = 1024


def _raise_readahead(mountpoint: Path) -> None:
    """Lets the kernel read ahead 1 MiB at a time (the default 128 KiB makes 256 KiB requests):
    fewer, larger requests cost less per byte in a Python filesystem. Needs root; harmless to
    skip. The device is looked up in /proc/self/mountinfo, since stat() on the mountpoint would
    wait for a loop that is not running yet."""
    target = os.path.abspath(mountpoint)
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            devs = [fields[2] for fields in (line.split() for line in f)
                    if len(fields) > 4 and _unescape(fields[4]) == target]
        if devs:
            Path(f"/sys/class/bdi/{devs[-1]}/read_ahead_kb").write_text(f"{READ_AHEAD_KB}\n")
    except OSError as exc:
        log.debug("could not raise read-ahead for %s: %s", target, exc)


def is_mounted(path: Path) -> bool:
    """True if /proc/self/mounts lists `path` (works for a mount whose process died, too)."""
    target = os.path.abspath(path)
    try:
        with open("/proc/self/mounts", encoding="utf-8", errors="surrogateescape") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 1 and _unescape(fields[1]) == target:
                    return True
    except OSError:
        return os.path.ismount(target)
    return False


def _unescape(field: str) -> str:
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field


def serve(model: tree.Tree, mountpoint: Path, opts: set[str], ready_fd: int | None = None) -> None:
    """Mounts `model` and serves it until unmounted or SIGINT/SIGTERM/SIGHUP, then unmounts."""
    import pyfuse3
    import trio

    from humiofs.mount import fs

    # Forked here, before pyfuse3 and trio start and before any thread does.
    model.start_worker(close_fds=() if ready_fd is None else (ready_fd,))
    # The request loop shares the GIL with the threads that read listings ahead (prefetch.py)
    # and from the store: at Python's default 5 ms, each request arriving while one of them
    # runs would wait up to 5 ms for the loop to get the GIL back. Measured on a first find.
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    ops = fs.Operations(model)
    try:
        try:
            pyfuse3.init(ops, str(mountpoint), opts)
        except RuntimeError as exc:
            raise TargetError(f"cannot mount at {mountpoint}: {exc}") from None
        _raise_readahead(mountpoint)
        try:
            trio.run(_main, ready_fd, model, mountpoint)
        finally:
            # Unmounted already after a signal (_stop_on_signal), or by humiofs umount.
            pyfuse3.close(unmount=is_mounted(mountpoint))
    finally:
        model.close()
    log.info("unmounted %s", mountpoint)


async def _main(ready_fd: int | None, model: tree.Tree, mountpoint: Path) -> None:
    import pyfuse3
    import trio

    async with trio.open_nursery() as nursery:
        await nursery.start(_stop_on_signal, model, mountpoint)
        if ready_fd is not None:
            os.write(ready_fd, READY)
            os.close(ready_fd)
        else:
            # --foreground, as a Type=notify unit runs it: mounted now, so tell systemd.
            sdnotify.ready("mounted")
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


async def _stop_on_signal(model: tree.Tree, mountpoint: Path,
                          task_status: trio.TaskStatus[None]) -> None:
    """SIGINT, SIGTERM or SIGHUP (systemctl stop) unmount as `umount` would. If files are open
    on the mount, it is detached at once (a lazy unmount: nobody new finds it) and keeps
    serving the open files until they are closed, then the process exits; a reader in the
    middle of a copy finishes it. A second signal ends the mount at once (reads of files
    still open then fail with ENOTCONN)."""
    import pyfuse3
    import trio

    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        task_status.started()
        detached = False
        async for signum in signals:
            name = signal.Signals(signum).name
            # pyfuse3.main() returns once every request in flight is answered; a read waiting
            # for the decryption worker would keep it (and so the unmount) waiting for as long
            # as the worker does not answer. Killed, its jobs go to threads.
            model.reader.kill_worker()
            if detached:
                log.warning("%s: ending the mount now; reads of files still open on it fail",
                            name)
                pyfuse3.terminate()
                return
            log.info("%s: unmounting %s", name, mountpoint)
            why = await trio.to_thread.run_sync(_fusermount, mountpoint, False)
            if why is not None and "busy" in why:
                why = await trio.to_thread.run_sync(_fusermount, mountpoint, True)
                if why is None:
                    log.warning("%s is busy (files are open on it): detached it (lazy "
                                "unmount); it serves the open files until they are closed, "
                                "then exits (signal again to end it now)", mountpoint)
                    detached = True
                    continue    # pyfuse3.main() returns when the kernel ends the connection
            if why is not None:
                log.warning("cannot unmount %s: %s; ending the mount", mountpoint, why)
            pyfuse3.terminate()
            return


def _fusermount(mountpoint: Path, lazy: bool) -> str | None:
    """Unmounts with fusermount3 (-z: lazily); None if that worked, else why not."""
    try:
        proc = subprocess.run(["fusermount3", "-u", *(["-z"] if lazy else []),
                               str(mountpoint)], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        return str(exc)
    if proc.returncode == 0:
        return None
    return (proc.stderr.strip().splitlines() or ["failed"])[-1]


def open_log(log_file: Path | None) -> logging.Handler | None:
    """The handler for --log FILE, added to the root logger at once: what the mount finds
    while it opens the stores (a damaged generation, a store left out) is logged there too,
    not only on the terminal."""
    if log_file is None:
        return None
    try:
        handler = logging.FileHandler(os.path.abspath(log_file))
    except OSError as exc:
        raise ConfigError(f"cannot open log file {log_file}: {exc.strerror}") from None
    handler.setFormatter(logging.Formatter(
        "%(asctime)s humiofs[%(process)d]: %(levelname)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    return handler


def run(model: tree.Tree, mountpoint: Path, foreground: bool = False,
        allow_other: bool = False, log_handler: logging.Handler | None = None,
        source: str = "humiofs", again: list[str] | None = None) -> int:
    """Mounts `model` at `mountpoint` (already checked); in the background unless `foreground`.
    `log_handler` is open_log's; `source` see options(). Returns the exit code."""
    opts = options(allow_other, source)
    ready = os.environ.pop(READY_FD_ENV, None)
    if foreground and ready is not None and ready.isdigit():
        return serve_respawned(model, mountpoint, opts, int(ready), log_handler)
    if foreground:
        serve(model, mountpoint, opts)
        return 0
    if again is not None:
        # `again`: the command line of this mount in the foreground, for respawn.
        model.close()
        return respawn(again, mountpoint)
    return _background(model, mountpoint, opts, log_handler)


def _background(model: tree.Tree, mountpoint: Path, opts: set[str],
                handler: logging.Handler | None) -> int:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        os.close(r)
        code = 1
        try:
            code = _serve_detached(model, mountpoint, opts, w, handler, new_session=True)
        finally:
            logging.shutdown()
            os._exit(code)
    os.close(w)
    reply = _read_all(r, READY_TIMEOUT_S)
    if reply != READY:
        message = reply.decode("utf-8", "replace").strip() if reply else (
            "the mount process ended before it was ready; run with --foreground to see why")
        raise TargetError(message.removeprefix("error: "))
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not os.path.ismount(mountpoint):
        if time.monotonic() > deadline:
            raise TargetError(f"{mountpoint} did not come up; run with --foreground to see why")
        time.sleep(0.01)
    print(f"humiofs: mounted at {mountpoint} (pid {pid}); unmount with: humiofs umount "
          f"{mountpoint}")
    return 0


#: Set in the environment of a mount started again in a fresh process (respawn): the fd of
#: the pipe on which it says it is ready.
READY_FD_ENV = "HUMIOFS_MOUNT_READY_FD"


def respawn(argv: list[str], mountpoint: Path) -> int:
    """Starts `humiofs ARGV` (a `mount --foreground` of the same settings) as a new process in
    its own session and waits until it serves `mountpoint`, as _background does for a fork.

    For object storage: its client (obstore, on a tokio runtime) does not survive fork(), and
    this process has used it to open the stores, so the mount runs in a fresh interpreter
    that opens them again (and forks no decryption worker, tree.start_worker)."""
    r, w = os.pipe()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "humiofs", *argv], stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, pass_fds=(w,),
            start_new_session=True, cwd="/", env={**os.environ, READY_FD_ENV: str(w)})
    finally:
        os.close(w)
    reply = _read_all(r, READY_TIMEOUT_S)
    if reply != READY:
        if proc.poll() is None and not reply:
            proc.kill()
        message = reply.decode("utf-8", "replace").strip() if reply else (
            "the mount process ended before it was ready; run with --foreground to see why")
        raise TargetError(message.removeprefix("error: "))
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not os.path.ismount(mountpoint):
        if time.monotonic() > deadline or proc.poll() is not None:
            raise TargetError(f"{mountpoint} did not come up; run with --foreground to see why")
        time.sleep(0.01)
    print(f"humiofs: mounted at {mountpoint} (pid {proc.pid}); unmount with: humiofs umount "
          f"{mountpoint}")
    return 0


def serve_respawned(model: tree.Tree, mountpoint: Path, opts: set[str], ready_fd: int,
                    handler: logging.Handler | None) -> int:
    """The process respawn started: serves as _background's child does, telling the parent
    on `ready_fd` that it is ready or why it failed."""
    return _serve_detached(model, mountpoint, opts, ready_fd, handler, new_session=False)


def _serve_detached(model: tree.Tree, mountpoint: Path, opts: set[str], ready_fd: int,
                    handler: logging.Handler | None, new_session: bool) -> int:
    """Detaches from the terminal and serves the mount until it ends, telling the parent on
    `ready_fd` that it is ready or why it failed; returns the exit code."""
    try:
        _detach(handler, new_session=new_session)
        serve(model, mountpoint, opts, ready_fd=ready_fd)
        return 0
    except HumiofsError as exc:
        _report(ready_fd, str(exc))
        log.error("%s", exc)
        return exc.exit_code
    except BaseException as exc:  # the parent must hear of anything
        _report(ready_fd, f"{type(exc).__name__}: {exc}")
        log.exception("mount failed")
        return 1


def _detach(handler: logging.Handler | None, new_session: bool = True) -> None:
    """Leaves the terminal's session and stdio; logs go to --log FILE, else to syslog."""
    if new_session:
        os.setsid()
    os.chdir("/")
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
    root = logging.getLogger()
    if handler is None and os.path.exists("/dev/log"):
        try:
            handler = logging.handlers.SysLogHandler("/dev/log")
            handler.setFormatter(logging.Formatter("humiofs[%(process)d]: %(message)s"))
        except OSError:
            handler = None
    root.handlers[:] = [handler] if handler is not None else [logging.NullHandler()]


def _report(fd: int, message: str) -> None:
    try:
        os.write(fd, f"error: {message}\n".encode())
    except OSError:
        pass


def _read_all(fd: int, timeout: float) -> bytes:
    """What the child writes until it closes its end (it does once it serves or fails)."""
    deadline = time.monotonic() + timeout
    data = b""
    try:
        while True:
            ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                return data
            piece = os.read(fd, 4096)
            if not piece:
                return data
            data += piece
    finally:
        os.close(fd)


def unmount(mountpoint: Path, lazy: bool = False) -> None:
    """Unmounts a humiofs mount with fusermount3; TargetError if that fails."""
    path = os.path.abspath(mountpoint)
    if not is_mounted(Path(path)):
        raise TargetError(f"{path} is not mounted")
    cmd = ["fusermount3", "-u", *(["-z"] if lazy else []), path]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise TargetError("fusermount3 is not installed (apt-get install fuse3)") from None
    if proc.returncode != 0:
        why = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"
        hint = " (files are open on it; close them, or use --lazy)" if "busy" in why else ""
        raise TargetError(f"cannot unmount {path}: {why}{hint}")
