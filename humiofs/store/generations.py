"""Choosing a generation: the latest one, or the latest at or before a time given with --at;
and how generation times are written for people and for folder names."""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from humiofs.errors import ConfigError, NoSuchObject, StoreError
from humiofs.store.format import GENERATION_NAME, Generation, generation_time
from humiofs.store.repository import Store

log = logging.getLogger(__name__)
_UNIX = re.compile(r"^@(\d{1,12})(?:\.(\d+))?$")
# ISO 8601, extended (2026-11-24T12:03:56.789Z, what ls prints) or basic (20261124T120356Z,
# the folder names under .generations), to the day, hour, minute, second or a fraction.
_ISO = re.compile(r"""^(?P<y>\d{4})-?(?P<mo>\d\d)-?(?P<d>\d\d)
                      (?:[T\ ](?P<h>\d\d)(?::?(?P<mi>\d\d)(?::?(?P<s>\d\d)(?:[.,](?P<f>\d+))?)?)?)?
                      (?P<z>Z|[+-]\d\d(?::?\d\d)?)?$""", re.X | re.I)
AT_FORMS = ("use a time as ls prints it (2026-11-24T10:00:00.123Z), a folder name under "
            ".generations (20261124T100000.123Z), ISO 8601 such as 2026-11-24T10:00 (local time "
            "without a zone), @UNIXSECONDS, or a generation name")


@dataclass(frozen=True)
class At:
    """What --at chose: the latest generation at or before a time, or one generation by name.

    A time covers all of its last unit: 10:00 stands for 10:00:00.000 .. 10:00:59.999, and a
    time to the second as ls prints it takes the generation committed within that second.
    """

    text: str
    until_ms: int
    name: str | None = None

    @classmethod
    def from_ms(cls, ms: int) -> At:
        return cls(f"@{ms / 1000:.3f}", ms)

    def admits(self, gen_name: str) -> bool:
        """True if the generation `gen_name` is at or before this point."""
        if self.name is not None:
            return gen_name <= self.name          # names sort by time, then by suffix
        return generation_time(gen_name) <= self.until_ms

    def pick(self, names: list[str]) -> str | None:
        """The latest of `names` (sorted, oldest first) at or before this point."""
        for name in reversed(names):
            if self.admits(name):
                return name
        return None


def parse_at(text: str) -> At:
    """Reads an --at value; ConfigError (exit 2, one line) if it is none of AT_FORMS."""
    value = text.strip()
    if GENERATION_NAME.match(value):
        return At(value, generation_time(value), value)
    try:
        m = _UNIX.match(value)
        if m:
            frac = (m.group(2) or "")[:3]
            start = int(m.group(1)) * 1000 + int(frac.ljust(3, "0") or 0)
            return At(value, start + _unit_ms(len(frac)) - 1)
        m = _ISO.match(value)
        if m:
            return At(value, _iso_until(m))
    except (ValueError, OverflowError):
        pass
    raise ConfigError(f"cannot read --at {text!r}: {AT_FORMS}")


def _unit_ms(fraction_digits: int) -> int:
    return 10 ** (3 - min(3, fraction_digits)) if fraction_digits else 1000


def _iso_until(m: re.Match[str]) -> int:
    """The last millisecond an ISO 8601 time covers, at the precision it was written to."""
    frac = (m["f"] or "")[:3]
    start = datetime(int(m["y"]), int(m["mo"]), int(m["d"]), int(m["h"] or 0),
                     int(m["mi"] or 0), int(m["s"] or 0), int(frac.ljust(3, "0") or 0) * 1000)
    if m["f"]:
        unit = timedelta(milliseconds=_unit_ms(len(frac)))
    elif m["s"]:
        unit = timedelta(seconds=1)
    elif m["mi"]:
        unit = timedelta(minutes=1)
    elif m["h"]:
        unit = timedelta(hours=1)
    else:
        unit = timedelta(days=1)
    zone = m["z"]
    if zone is None:
        # Local time; the end is computed in local time too, so a day is a calendar day.
        end = (start + unit).astimezone()
    else:
        if zone.upper() == "Z":
            tz = timezone.utc
        else:
            digits = zone[1:].replace(":", "")
            offset = timedelta(hours=int(digits[:2]), minutes=int(digits[2:] or 0))
            tz = timezone(offset if zone[0] == "+" else -offset)
        end = (start + unit).replace(tzinfo=tz)
    return round(end.timestamp() * 1000) - 1


def format_time(ms: int) -> str:
    """A generation time for people and messages: ISO 8601 in UTC, to the millisecond (what
    ls prints, and what --at takes back)."""
    try:
        dt = datetime.fromtimestamp(ms // 1000, timezone.utc)
    except (ValueError, OverflowError, OSError):
        # DELETE_BACKUP_AFTER_MILLIS may be any size (Long.MAX_VALUE for "forever").
        return "never (after the year 9999)" if ms > 0 else "before the year 1"
    return f"{dt:%Y-%m-%dT%H:%M:%S}.{ms % 1000:03d}Z"


def folder_time(ms: int, with_ms: bool = True) -> str:
    """A generation's folder name under .generations: ISO 8601 basic format in UTC, to the
    millisecond (to the second without `with_ms`). No ':' in it, so rsync and scp never take
    it for host:path; it sorts by time, --at takes it back, and it never changes: a name to
    the second would need milliseconds as soon as another generation shared its second."""
    dt = datetime.fromtimestamp(ms // 1000, timezone.utc)
    return f"{dt:%Y%m%dT%H%M%S}" + (f".{ms % 1000:03d}Z" if with_ms else "Z")


def describe(gen: Generation) -> str:
    """`2026-11-24T12:03:56.789Z (1796...-...)`: which generation, for messages."""
    return f"{format_time(gen.time_ms)} ({gen.name})"


# When a store has generation files and the master key opens none (backup, prune and check
# say the same).
NO_GENERATION_OPENS = (
    "No generation of the store opens with the master key its key files hold: either keys/ "
    "was copied from another store (put this store's key files back from a copy of it; a "
    "backup now would mix two master keys in one store, and prune deletes nothing), or every "
    "generation file is damaged (then nothing in this store can be restored: keep it for a "
    "look, and start a fresh backup under a new BACKUP_NAME).")


def latest_readable(store: Store) -> Generation | None:
    """The parent of a new backup: the newest generation that reads back, a checkpoint
    (FORMAT.md 7.4) if one is newer than the latest complete generation, skipping damaged
    ones with a warning; None if the store has none. Raises StoreError (exit 5) if the store
    has generation files and none of them reads back: its key files may hold another store's
    master key, and a generation committed under it would mix two master keys in one store."""
    names = store.list_generations()    # raises its own StoreError if it cannot list
    if not names:
        return None
    try:
        return pick(store, checkpoints=True, names=names).generation
    except StoreError as exc:
        if exc.exit_code == 2:      # no generation at all
            return None
        raise StoreError(f"{exc}. {NO_GENERATION_OPENS} Nothing was written") from None


def load_listed(store: Store, name: str) -> Generation | None:
    """The generation `name`, listed a moment ago; None if its file is gone since and a new
    listing confirms it: a writer deletes the checkpoints its next generation supersedes, and
    prune drops generations (FORMAT.md 7.4, 10.1), so a file that vanishes between listing and
    reading is not damage. Raises StoreError (NoSuchObject if a new listing still names it)."""
    try:
        return store.load_generation(name)
    except NoSuchObject:
        if name in store.list_generations():
            raise
        return None


def complete_name(gen: Generation | None) -> str | None:
    """The name of the complete generation `gen` stands for in rollback detection (FORMAT.md
    9.1): its own, or a checkpoint's base."""
    if gen is None:
        return None
    return gen.base if gen.checkpoint else gen.name


@dataclass(frozen=True)
class Picked:
    """The generation chosen, and the newer ones (in range) left out because they are
    damaged: (name, what is wrong with it)."""

    generation: Generation
    damaged: tuple[tuple[str, str], ...] = ()


def pick(store: Store, at: At | None = None, checkpoints: bool = False,
         names: list[str] | None = None) -> Picked:
    """The latest generation, or the latest one `at` chooses, that reads back: a damaged
    newer one is left out with a warning, so restore, the mount, ls and backup agree on what
    the latest generation is (FORMAT.md 7.2). Checkpoints (partial, FORMAT.md 7.4) are
    passed over unless `checkpoints` (the parent of a backup). A generation asked for by name
    is that one, damaged or a checkpoint (with a warning). StoreError with exit 2 if no
    generation matches, 5 if none of those that match can be read. `names`: the store's
    generation names, listed a moment ago by the caller (else listed here)."""
    if names is None:
        names = store.list_generations()
    if at is not None and at.name is not None:
        if at.name not in names:
            raise StoreError(f"store {store.path} has no generation {at.name}", 2)
        try:
            named = load_listed(store, at.name)
        except StoreError as exc:
            raise StoreError(
                f"generation {at.name} of {store.path} cannot be read ({exc}): it is damaged, "
                "and that state of the node is lost. Pick another with --at (`humiofs ls` "
                "lists them, and names the damaged ones); `humiofs check` says what else is "
                "affected") from None
        if named is None:
            raise StoreError(f"store {store.path} has no generation {at.name} (it was "
                             "superseded or pruned a moment ago)", 2)
        gen = named
        if gen.checkpoint:
            log.warning("generation %s of %s is a checkpoint of a backup that had not "
                        "finished: it is partial", at.name, store.name)
        return Picked(gen)
    candidates = [n for n in names if at is None or at.admits(n)]
    if not candidates:
        when = (f" at or before {format_time(at.until_ms)} (--at {at.text})"
                if at is not None else "")
        raise StoreError(f"store {store.path} has no generation{when}", 2)
    damaged: list[tuple[str, str]] = []
    passed: list[Generation] = []           # checkpoints passed by
    for name in reversed(candidates):
        try:
            loaded = load_listed(store, name)
        except StoreError as exc:
            damaged.append((name, str(exc)))
            continue
        if loaded is None:
            continue        # superseded or pruned since the listing
        gen = loaded
        if gen.checkpoint and not checkpoints:
            passed.append(gen)
            continue
        for bad, why in damaged:
            log.warning("generation %s (%s) of %s is damaged, so it is left out: %s", bad,
                        format_time(generation_time(bad)), store.name, why)
        if damaged:
            log.warning("the latest intact generation of %s is %s", store.name, describe(gen))
        return Picked(gen, tuple(damaged))
    if not damaged:
        raise StoreError(_only_checkpoints(store, names, at, passed), 2)
    newest, why = damaged[0]
    raise StoreError(f"no generation of store {store.path}"
                     + (f" at or before --at {at.text}" if at is not None else "")
                     + f" can be read; the newest, {newest}: {why}")


def _only_checkpoints(store: Store, names: list[str], at: At | None,
                      passed: list[Generation]) -> str:
    """Why a store (up to `at`) has no complete generation, only the checkpoints `passed`
    (newest first): a first backup that has not finished, one whose complete generation came
    later than `at`, or checkpoints whose base generation is missing."""
    where = f" at or before --at {at.text}" if at is not None else ""
    missing = sorted({g.base for g in passed if g.base is not None and g.base not in names})
    if missing:
        return (f"store {store.path} has no complete generation{where}, only checkpoints "
                f"(partial) of a backup based on generation {missing[-1]} "
                f"({format_time(generation_time(missing[-1]))}), which is missing from the "
                "store: the last complete restore point is gone (`humiofs check` reports it; "
                "`restore --at <checkpoint name>` restores what a checkpoint holds)")
    later = None
    if at is not None:
        for name in names:
            if at.admits(name):
                continue
            try:
                gen = load_listed(store, name)
            except StoreError:
                continue
            if gen is not None and not gen.checkpoint:
                later = gen
                break
    if later is not None:
        return (f"store {store.path} has no complete generation{where}, only checkpoints "
                "(partial) of a backup that finished later, as generation "
                f"{describe(later)}: restore that, or name a checkpoint with --at")
    return (f"store {store.path} has no complete generation{where}, only checkpoints of a "
            "first backup that has not finished (run the backup again to finish it; `ls` "
            "names the checkpoints)")
