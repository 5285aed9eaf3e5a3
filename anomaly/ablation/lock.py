"""Claiming one piece of work with a lock file, so that several processes share a to-do list.

A lock is a file that holds its owner's pid and the owner's start time (from ``/proc``, where
there is one). It is created atomically: its content is written to a private file first, which
is then hard-linked to the lock's name; like ``os.open(O_CREAT | O_EXCL)`` the link fails when the
lock exists, and unlike it the lock never exists empty (a reader never sees a half-written one).

A lock whose owner is no longer running is *stale* (the owner was killed) and is taken over.
"Running" means the pid exists and, where the start time was recorded, still has that start
time, so a pid reused by an unrelated process after a reboot does not hold a lock forever.

Taking over a stale lock renames it to a private name first: of two processes that both found
it stale, only one rename succeeds. A fresh lock taken between one process's reading and its
renaming is put back. The one race left (a third process locking in that instant) can only
make two processes do the same piece of work, never lose it; work written atomically under a
fixed name (as the sweep's results are) then ends the same either way.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator


@dataclass(frozen=True)
class LockOwner:
    """Who holds a lock."""

    pid: int
    """Process id."""
    started: str | None
    """The process's start time in clock ticks since boot (``/proc/<pid>/stat`` field 22);
    ``None`` where unknown."""

    def text(self) -> str:
        return f"{self.pid} {self.started or '-'}\n"

    @classmethod
    def parse(cls, text: str) -> "LockOwner | None":
        parts = text.split()
        if len(parts) != 2 or not parts[0].isdigit():
            return None
        return cls(int(parts[0]), None if parts[1] == "-" else parts[1])

    @classmethod
    def me(cls) -> "LockOwner":
        return cls(os.getpid(), _start_time(os.getpid()))


def _start_time(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces: split after it.
    fields = stat.rpartition(")")[2].split()
    return fields[19] if len(fields) > 19 else None  # field 22 of the whole line


def is_running(owner: LockOwner) -> bool:
    """Whether the process that took the lock is still running."""
    try:
        os.kill(owner.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, under another user
    if owner.started is not None:
        now = _start_time(owner.pid)
        if now is not None and now != owner.started:
            return False  # the pid was reused by another process
    return True


def lock_owner(path: Path) -> LockOwner | None:
    """The owner recorded in the lock ``path``; ``None`` when there is no lock. A lock that
    cannot be read as one counts as held by nobody alive (pid 0 is never a worker)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    return LockOwner.parse(text) or LockOwner(0, "unreadable")


def try_lock(path: Path) -> bool:
    """Claim ``path`` for this process: ``True`` when it is now ours, ``False`` when a running
    process holds it. A stale lock (its owner is gone) is taken over."""
    path.parent.mkdir(parents=True, exist_ok=True)
    me = LockOwner.me()
    mine = path.with_name(f".{path.name}.{me.pid}.new")
    mine.write_text(me.text())
    try:
        for _ in range(5):
            try:
                os.link(mine, path)  # atomic; fails when the lock exists
                return True
            except FileExistsError:
                pass
            held = lock_owner(path)
            if held is None:
                continue  # released in the meantime: try again
            if held == me:
                return True  # already ours
            if held.pid != 0 and is_running(held):
                return False
            aside = path.with_name(f".{path.name}.{me.pid}.stale")
            try:
                os.rename(path, aside)  # of two takers, only one finds the lock to rename
            except FileNotFoundError:
                continue
            if lock_owner(aside) != held:  # a fresh lock came between reading and renaming
                with contextlib.suppress(FileExistsError):
                    os.link(aside, path)  # give it back
                aside.unlink()
                return False
            aside.unlink()
        return False
    finally:
        mine.unlink(missing_ok=True)


def release(path: Path) -> None:
    """Remove the lock ``path`` if this process holds it (never someone else's)."""
    if lock_owner(path) == LockOwner.me():
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def locked(path: Path) -> Iterator[bool]:
    """``with locked(p) as mine:`` — ``mine`` says whether the claim succeeded; a lock taken
    here is released when the block ends, however it ends."""
    mine = try_lock(path)
    try:
        yield mine
    finally:
        if mine:
            release(path)
