"""The mount's decryption worker: a child process that reads file data from the store and
decrypts it straight into the chunk cache's shared memory.

Why a process: pyfuse3 holds the GIL while it receives a request and copies a reply into the
kernel, and cryptography's AES-GCM holds it while it decrypts, so a decrypting thread never runs
beside the request loop. A forked child runs on the other core. It is forked before trio and
pyfuse3 start (nothing is forked after them) and inherits the open stores, keys included, so no
secret crosses a pipe. It lives only as long as the socket: when the mount closes its end, the
child exits.

Protocol, one SOCK_SEQPACKET message each way per job:

    job     id u32 | store u16 | first u32 | last u32 | cache offset u64 | ref (format.Ref)
    result  id u32 | status u8 (0 ok, 1 damaged or unreadable) | message, UTF-8

The child decrypts chunks first..last of the data blob at ref into the shared buffer at the cache
offset, and only then answers. On status 1 those bytes may be unauthenticated: the mount drops
them unread.
"""
from __future__ import annotations

import logging
import mmap
import os
import signal
import socket
import struct
import time

from humiofs.errors import StoreError
from humiofs.store import crypto
from humiofs.store.format import REF_LEN, Ref
from humiofs.store.repository import Store

log = logging.getLogger(__name__)

_JOB = struct.Struct(f"<IHIIQ{REF_LEN}s")
_RESULT = struct.Struct("<IB")
OK, DAMAGED = 0, 1
_STOP_S = 2.0
NICE = 10


class Worker:
    """The mount's side of a running worker: submit jobs, collect results."""

    def __init__(self, sock: socket.socket, pid: int, stores: list[Store]) -> None:
        self.sock, self.pid = sock, pid
        self._index = {id(s): i for i, s in enumerate(stores)}
        self.alive = True
        self.killed = False     # ended by kill(), not by itself

    @classmethod
    def start(cls, stores: list[Store], shared: mmap.mmap,
              close_fds: tuple[int, ...] = ()) -> Worker:
        """Forks the worker over `stores`, writing into `shared` (a MAP_SHARED mapping made
        before the fork). `close_fds` are closed in the child (a readiness pipe, say, whose
        reader waits for every writer to close it). Call before any thread or trio run starts."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = os.fork()
        if pid == 0:  # the child: never returns
            code = 0
            try:
                ours.close()
                for fd in close_fds:
                    os.close(fd)
                _serve(theirs, memoryview(shared), stores)
            except BaseException:
                code = 1
            finally:
                os._exit(code)
        theirs.close()
        ours.setblocking(False)
        return cls(ours, pid, stores)

    def serves(self, store: Store) -> bool:
        return self.alive and id(store) in self._index

    def submit(self, job: int, store: Store, ref: Ref, first: int, last: int,
               offset: int) -> bool:
        """Queues a job; False if the worker is gone or its queue is full (do it elsewhere)."""
        try:
            self.sock.send(_JOB.pack(job, self._index[id(store)], first, last, offset,
                                     ref.encode()))
            return True
        except BlockingIOError:
            return False
        except OSError:
            self.alive = False
            return False

    def results(self) -> list[tuple[int, str | None]] | None:
        """The results ready now, as (job, None) or (job, what went wrong); None once the worker
        has exited (every job not answered yet is lost)."""
        out: list[tuple[int, str | None]] = []
        while True:
            try:
                msg = self.sock.recv(4096)
            except BlockingIOError:
                return out
            except OSError:
                msg = b""
            if len(msg) < _RESULT.size:  # gone (or, never expected, garbled): stop using it
                self.alive = False
                return out or None
            job, status = _RESULT.unpack_from(msg)
            out.append((job, None if status == OK else
                        msg[_RESULT.size:].decode("utf-8", "replace")))

    def state(self) -> str:
        """The child's scheduler state from /proc (R, S, D, T, Z, ...; '' if it is gone)."""
        try:
            with open(f"/proc/{self.pid}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            return ""
        # pid (comm) state ...: comm may hold anything, so look after its last ')'.
        return stat[stat.rfind(b")") + 2:][:1].decode("ascii", "replace")

    def kill(self) -> None:
        """Ends the child at once (SIGKILL works on a stopped or hung one too); from then on
        it never writes into the shared memory again. Jobs not answered yet are lost."""
        self.alive = False
        self.killed = True
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def reaped(self) -> bool:
        """True once the child has exited and been reaped (never blocks)."""
        try:
            pid, _ = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            return True
        return pid != 0

    def stop(self) -> None:
        """Ends the child and reaps it, without depending on it: it is killed, and waited for
        at most _STOP_S (a child stuck in the kernel on a hung disk is left to init)."""
        self.kill()
        self.sock.close()
        deadline = time.monotonic() + _STOP_S
        while not self.reaped() and time.monotonic() < deadline:
            time.sleep(0.005)


def _serve(sock: socket.socket, shared: memoryview, stores: list[Store]) -> None:
    """The child's loop: a job in, the chunks decrypted into `shared`, a result out."""
    # A Ctrl-C in a terminal reaches the whole process group: the mount handles it, and this
    # child ends when the mount closes the socket.
    for sig in (signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    # Below the server and the reader in priority: it works ahead of them, and on two cores
    # the three of them share, yielding to them shortened a 1 GiB read (median of 6: 0.68 s
    # -> 0.64 s). On a busy node it also leaves the node's own work alone.
    os.nice(NICE)
    while True:
        msg = sock.recv(_JOB.size)
        if len(msg) != _JOB.size:
            return
        job, index, first, last, offset, raw = _JOB.unpack(msg)
        status, text = OK, ""
        try:
            ref = Ref.decode(raw)
            end = offset + (last - first + 1) * crypto.CHUNK  # the load's slots
            stores[index].read_chunks_into(ref, crypto.KIND_DATA, first, last,
                                           shared[offset:end])
        except StoreError as exc:
            status, text = DAMAGED, str(exc)
        except Exception as exc:  # the mount logs it with the file's path
            status, text = DAMAGED, f"internal error: {type(exc).__name__}: {exc}"
        try:
            sock.send(_RESULT.pack(job, status) + text.encode()[:3000])
        except OSError:
            return
