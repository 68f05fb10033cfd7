"""The packs a backup run writes: one open for small files and one for trees, rotated at
PACK_TARGET, made durable on a background thread, each listed in the run's journal first."""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

from humiofs import failpoint
from humiofs.store import journal
from humiofs.store.repository import PackWriter, Store

PACK_TARGET = 16 << 20
# Packs are made durable (fsync, rename, fsync of the folder) on a background thread so the
# disk flushes one pack while the next is read and encrypted. At most this many wait.
MAX_PENDING_PACKS = 4


class RunPacks:
    """The packs of one run into `store`, and the run's journal (journal.RunJournal), which
    lists every pack before it is made durable and is replaced after each checkpoint."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._small: PackWriter | None = None
        self._trees: PackWriter | None = None
        self._finisher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pack-finish")
        self._pending: list[Future[None]] = []
        # Every pack made durable is listed here first, so that if the run fails or dies
        # before its generation is committed, its packs are removed (discard, or the next
        # writer's store.clean_tmp) and never stay behind taking space.
        self.journal = journal.RunJournal(store)

    def tree_pack(self) -> PackWriter:
        if self._trees is None:
            self._trees = self.store.new_pack()
        return self._trees

    def small_pack(self) -> PackWriter:
        if self._small is None:
            self._small = self.store.new_pack()
        return self._small

    def finish_later(self, pack: PackWriter) -> None:
        """Queues `pack` to be made durable; raises the error of any finished one that failed."""
        self._pending.append(self._finisher.submit(self._make_durable, pack))
        while len(self._pending) > MAX_PENDING_PACKS or (self._pending and self._pending[0].done()):
            self._pending.pop(0).result()

    def rotate(self) -> None:
        for attr in ("_small", "_trees"):
            pack = getattr(self, attr)
            if pack is not None and pack.size >= PACK_TARGET:
                self.finish_later(pack)
                setattr(self, attr, None)

    def finish_packs(self) -> None:
        """Makes every pack durable. Only after this may the generation be written: it must
        never reach the disk before the data and trees it refers to."""
        for attr in ("_small", "_trees"):
            pack = getattr(self, attr)
            if pack is not None:
                self.finish_later(pack)
                setattr(self, attr, None)
        while self._pending:
            self._pending.pop(0).result()

    def _make_durable(self, pack: PackWriter) -> None:
        try:
            self.journal.add(pack.pack_id)     # listed before it can appear under packs/
        except BaseException:
            pack.abort()
            raise
        pack.finish()
        failpoint.reached("pack")

    def abort_packs(self) -> None:
        # An interrupt (SIGINT/SIGTERM arrive as KeyboardInterrupt anywhere) can land between
        # a pack's temporary file being created and its writer being recorded here; discard()
        # then empties tmp/ (the run holds the writer lock, so all of it is this run's).
        for attr in ("_small", "_trees"):
            pack = getattr(self, attr)
            if pack is not None:
                pack.abort()
                setattr(self, attr, None)
        for fut in self._pending:
            fut.exception()
        self._pending.clear()

    def shutdown(self) -> None:
        """Stops the background thread once the walk is over (after finish_packs or
        abort_packs)."""
        self._finisher.shutdown(wait=True)
