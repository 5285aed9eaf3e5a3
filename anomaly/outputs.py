"""Output folders the commands share with their users: add files, never delete others'.

A command never replaces a whole folder the user named. It declares the names it writes
(:func:`claim`, called before any expensive work), builds them in a hidden staging folder,
and moves each one into place when the work succeeded (:meth:`OutputDir.writing`). Which
command wrote which file is recorded in a small manifest in the folder,
:data:`MANIFEST` (file name → command, sorted, no dates, so regenerating leaves git
clean). The rules:

* a name the command writes that already exists and the manifest does not give to the
  same command is refused before the work starts: the user's file stays untouched;
* files the manifest gives to another command, or does not list, are never touched;
* a rerun of the same command replaces its own files (and, with ``replace_own``, removes
  those it wrote last time but not this time, so one folder holds one consistent result);
* the final move is all or nothing as far as the OS allows: the previous files are moved
  aside first and put back if any move or the manifest fails (disk full, a file that cannot
  be replaced), and the failure is one line naming the path and the reason;
* names the file system cannot hold (longer than its ``NAME_MAX``) and dangling symlinks
  on the way to the folder are refused by :func:`claim`, before the work.

``figures/`` is shared by ``anomaly.figures``, ``anomaly.ablation.plots`` and (in
``figures/probe_smollm2``) ``anomaly.probe``; its manifests are committed, so a fresh
clone's ``python3 dev.py run`` regenerates the committed figures in place.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from anomaly.errors import UserError
from anomaly.io import _umask, write_text
from anomaly.sameness import same_result

MANIFEST = ".anomaly-outputs.json"
"""File name of the manifest kept in every output folder."""

_ABOUT = ("Files in this folder written by the anomaly toolkit, and the command that wrote "
          "each; a command rewrites only its own files and never removes anyone else's.")
_STAGING_PREFIX = ".anomaly-staging-"
_ASIDE = ".anomaly-previous"
"""Folder inside the staging folder that holds the previous files during the final move."""


@dataclass(frozen=True)
class OutputDir:
    """An output folder a command was allowed to write into (see :func:`claim`)."""

    path: Path
    """The folder, as the user named it."""
    owner: str
    """The command recorded as the writer of its files, e.g. ``"anomaly.probe"``."""
    names: frozenset[str]
    """Top-level names (files or sub-folders) the command will write."""
    flag: str = "--out"
    """How the user named the folder, for messages (``"--out"``, ``"--json"``)."""
    replace_own: bool = False
    """On commit, also remove files this owner wrote before but not this time."""
    single_file: bool = False
    """The user named one file in :attr:`path` (``--json FILE``), not the folder itself."""
    written: list[Path] = field(default_factory=list, compare=False)
    """Final paths of what :meth:`writing` moved into place (filled on success)."""

    @contextlib.contextmanager
    def writing(self) -> Iterator[Path]:
        """Yield an empty staging folder; on success move its entries into :attr:`path`.

        The staging folder sits inside the output folder (or its nearest existing
        ancestor), so every move is a rename on one file system. On failure it is removed
        and nothing in the output folder changes. A write that fails for lack of space or
        permission (while staging or in the final move) is a one-line :class:`UserError`.
        """
        stage = _make_staging(self)
        done = False
        try:
            try:
                yield stage
            except OSError as exc:
                if exc.errno not in _WRITE_ERRNOS:
                    raise
                raise _write_error(self, exc) from None
            self._commit(stage)
            done = True
        finally:
            aside = stage / _ASIDE
            # After a failed final move, previous files that could not be put back are
            # there (the error names the folder): never delete them.
            if done or not (aside.is_dir() and any(aside.iterdir())):
                shutil.rmtree(stage, ignore_errors=True)

    def adopt(self) -> None:
        """Create the folder and record all :attr:`names` as this owner's now.

        For commands that write into the folder step by step over a long time and resume
        (``anomaly.ablation``) rather than in one commit at the end.
        """
        _check(self)  # again: time may have passed since claim
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            manifest = _read_manifest(self.path, self.flag)
            manifest.update(dict.fromkeys(self.names, self.owner))
            _write_manifest(self.path, manifest)
        except OSError as exc:
            raise _write_error(self, exc) from None

    def _commit(self, stage: Path) -> None:
        """Move the staged entries into place, all or nothing (previous files that could
        not be put back stay in ``stage``'s :data:`_ASIDE`, and the error says so)."""
        staged = sorted(p.name for p in stage.iterdir())
        # Checked again, over what was actually staged: a file may have appeared meanwhile.
        _check(OutputDir(self.path, self.owner, frozenset(staged), self.flag, single_file=self.single_file))
        if not self.path.exists():  # a new folder appears whole, manifest included
            try:
                _write_manifest(stage, dict.fromkeys(staged, self.owner))
                os.chmod(stage, 0o777 & ~_umask())  # mkdtemp's 0700 is for the staging only
                self.path.parent.mkdir(parents=True, exist_ok=True)
                os.replace(stage, self.path)
            except OSError as exc:
                raise _write_error(self, exc) from None
            self.written[:] = [self.path / n for n in staged]
            return
        aside = stage / _ASIDE
        try:
            aside.mkdir()
            self._swap_in(stage, staged, aside)
        except OSError as exc:
            left = sorted(p.name for p in aside.iterdir()) if aside.is_dir() else []
            if left:  # the previous files could not all be put back: say where they are
                raise UserError(f"{self.flag} {self.path}: {_reason(exc)}; the previous {', '.join(left)} "
                                f"could not be put back and stay kept in {aside}") from None
            raise _write_error(self, exc) from None
        self.written[:] = [self.path / n for n in staged]

    def _swap_in(self, stage: Path, staged: list[str], aside: Path) -> None:
        """Each previous file goes to ``aside`` before its replacement comes in; any error
        (or Ctrl-C) puts every file back where it was before it propagates."""
        manifest = _read_manifest(self.path, self.flag)
        moved_aside: list[str] = []  # previous entries now in ``aside``
        placed: list[str] = []  # staged entries now in the output folder
        # Decided for all files before any moves (a PDF is judged with its PNG and JSON).
        same = {name: same_result(self.path / name, stage / name) for name in staged}
        try:
            for name in staged:
                if not same[name]:
                    if (self.path / name).is_dir() and not (stage / name).is_dir():
                        # A folder where this command's file was: the user's now, never removed.
                        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(self.path / name))
                    if (self.path / name).exists() or (self.path / name).is_symlink():
                        os.replace(self.path / name, aside / name)
                        moved_aside.append(name)
                    os.replace(stage / name, self.path / name)
                    placed.append(name)
                manifest[name] = self.owner
            if self.replace_own:
                for name, owner in list(manifest.items()):
                    if owner == self.owner and name not in staged and (self.path / name).is_file():
                        os.replace(self.path / name, aside / name)
                        moved_aside.append(name)
            # Entries whose file is gone (set aside above, or removed by the user) are dropped.
            _write_manifest(self.path, {n: o for n, o in manifest.items() if (self.path / n).exists()})
        except BaseException:
            for name in reversed(placed):
                with contextlib.suppress(OSError):
                    os.replace(self.path / name, stage / name)
            for name in reversed(moved_aside):
                with contextlib.suppress(OSError):
                    os.replace(aside / name, self.path / name)
            raise


_WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM,
                           errno.ENAMETOOLONG, errno.EIO, errno.EISDIR, errno.ENOTDIR, errno.ENOTEMPTY,
                           errno.EEXIST, errno.EBUSY, errno.EXDEV})
"""Errors of a write that the user can fix (space, permission, names), not bugs."""


def _reason(exc: OSError) -> str:
    """``cannot write PATH (reason)`` for an :class:`OSError` raised by a write."""
    where = exc.filename if exc.filename is not None else "a file"
    return f"cannot write {where} ({exc.strerror or exc})"


def _write_error(out: "OutputDir", exc: OSError) -> UserError:
    return UserError(f"{out.flag} {out.path}: {_reason(exc)}; the previous files there are unchanged "
                     f"(free some space or fix the permission, then run again)")


def claim(
    path: str | os.PathLike, owner: str, names: Iterable[str], *, flag: str = "--out",
    replace_own: bool = False,
) -> OutputDir:
    """Check, before any work, that ``owner`` may write ``names`` into the folder ``path``.

    Refused with a one-line :class:`UserError`: an empty name or the current folder (or
    one above it), a path that is a file, a folder that cannot be written, and a name that
    exists but is not this owner's by the manifest. Nothing is created.
    """
    out = OutputDir(Path(path), owner, frozenset(names), flag, replace_own)
    return _claimed(out)


def _claimed(out: OutputDir) -> OutputDir:
    _check(out)
    _make_staging(out).rmdir()  # proves the folder (or where it will go) is writable
    return out


def claim_file(path: str | os.PathLike, owner: str, *, flag: str) -> OutputDir:
    """:func:`claim` for a single output file (e.g. ``--json FILE``): its folder, one name."""
    path = Path(path)
    if str(path) in ("", ".") or path.name in ("", ".", ".."):
        raise UserError(f"{flag} {str(path)!r} is not a file name; give e.g. {flag} results.json")
    _check_name_lengths(flag, path)
    if path.is_dir():
        raise UserError(f"{flag} {path} is a folder; give a file name, e.g. {flag} {path / 'result.json'}")
    return _claimed(OutputDir(path.parent, owner, frozenset([path.name]), flag, single_file=True))


def _check(out: OutputDir) -> None:
    path, flag = out.path, out.flag
    _check_name_lengths(flag, path, out.names)
    if not out.single_file:
        # Outputs mixed into the folder one works in (or the repository) are hard to
        # tell apart from one's own files: a command's outputs get a folder of their own.
        here = Path.cwd().resolve()
        if str(path) in ("", ".") or path.resolve() in (here, *here.parents):
            raise UserError(f"{flag} {str(path)!r} is the current folder or one above it; "
                            f"give a folder of its own, e.g. {flag} runs/out")
    for p in (path, *path.parents):
        if p.is_symlink() and not p.exists():
            raise UserError(f"{flag} {path}: {p} is a symlink to {os.readlink(p)}, which does not exist; "
                            f"create its target or give another {flag}")
        if p.exists():
            break
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path} is a file, not a folder; give a folder name")
    anchor = _anchor(path)
    if not anchor.is_dir():
        raise UserError(f"{flag} {path}: {anchor} is a file, not a folder; give another path")
    if not path.is_dir():
        return
    manifest = _read_manifest(path, flag)
    for name in sorted(out.names):
        if (path / name).exists() or (path / name).is_symlink():
            by = manifest.get(name)
            if by != out.owner:
                whose = f"was written by {by}" if by else "was not written by this command"
                where = f"{flag} {path / name}" if out.single_file else f"{flag} {path}: {name}"
                raise UserError(f"{where} already exists and {whose}; it is left alone: "
                                f"choose another {flag} or move it away")


def _check_name_lengths(flag: str, path: Path, names: Iterable[str] = ()) -> None:
    """Refuse a folder or file name longer than the file system holds (``NAME_MAX``), and a
    path longer than ``PATH_MAX``, before the work rather than at the final move. Runs
    before anything else looks at ``path``: ``stat`` of an over-long name raises."""
    anchor = next((p for p in (path, *path.parents) if os.path.lexists(p)), Path("."))
    try:
        name_max = os.pathconf(anchor, "PC_NAME_MAX")
        path_max = os.pathconf(anchor, "PC_PATH_MAX")
    except (OSError, ValueError):
        name_max, path_max = 255, 4096
    names = list(names)
    for part in (*path.parts, *names):
        size = len(os.fsencode(part))
        if size > name_max:
            short = part if len(part) <= 40 else part[:24] + "…" + part[-12:]
            raise UserError(f"{flag} {short!r}: a name of {size} bytes, longer than the {name_max} "
                            "this file system allows; choose a shorter name")
    for p in [path / n for n in names] or [path]:
        if len(os.fsencode(os.path.abspath(p))) >= path_max:
            raise UserError(f"{flag}: the path of {p.name} would be longer than the {path_max} bytes "
                            "this system allows; choose a shorter path")


def _anchor(path: Path) -> Path:
    """``path`` if it exists, else its nearest existing ancestor."""
    for p in (path, *path.parents):  # a relative path ends at ".", an absolute one at "/"
        if p.exists():
            return p
    return Path.cwd()  # "." vanished under us


def _make_staging(out: OutputDir) -> Path:
    anchor = _anchor(out.path)
    try:
        return Path(tempfile.mkdtemp(prefix=_STAGING_PREFIX, dir=anchor))
    except OSError as exc:
        raise UserError(f"{out.flag} {out.path}: cannot write in {anchor} ({exc.strerror or exc}); "
                        f"choose a writable {out.flag}") from None


def _read_manifest(folder: Path, flag: str) -> dict[str, str]:
    path = folder / MANIFEST
    if not path.exists():
        return {}
    try:
        files = json.loads(path.read_text(encoding="utf-8"))["files"]
        # Plain names only: an entry like "../x" must never steer a removal outside the folder.
        if not all(isinstance(k, str) and isinstance(v, str) and _plain_name(k) for k, v in files.items()):
            raise TypeError
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise UserError(f"{flag} {folder}: {MANIFEST} is not a manifest this toolkit wrote; "
                        f"choose another {flag} or remove that file") from None
    return dict(files)


def _plain_name(name: str) -> bool:
    return name not in ("", ".", "..") and "/" not in name and os.sep not in name


def _write_manifest(folder: Path, files: dict[str, str]) -> None:
    text = json.dumps({"about": _ABOUT, "files": dict(sorted(files.items()))}, indent=2) + "\n"
    path = folder / MANIFEST
    if not (path.is_file() and path.read_text(encoding="utf-8") == text):
        write_text(path, text)
