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
  those it wrote last time but not this time, so one folder holds one consistent result).

``figures/`` is shared by ``anomaly.figures``, ``anomaly.ablation.plots`` and (in
``figures/probe_smollm2``) ``anomaly.probe``; its manifests are committed, so a fresh
clone's ``python3 dev.py run`` regenerates the committed figures in place.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from anomaly.errors import UserError
from anomaly.io import write_text

MANIFEST = ".anomaly-outputs.json"
"""File name of the manifest kept in every output folder."""

_ABOUT = ("Files in this folder written by the anomaly toolkit, and the command that wrote "
          "each; a command rewrites only its own files and never removes anyone else's.")
_STAGING_PREFIX = ".anomaly-staging-"


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
        and nothing in the output folder changes.
        """
        stage = _make_staging(self)
        try:
            yield stage
            self._commit(stage)
        finally:
            shutil.rmtree(stage, ignore_errors=True)

    def adopt(self) -> None:
        """Create the folder and record all :attr:`names` as this owner's now.

        For commands that write into the folder step by step over a long time and resume
        (``anomaly.ablation``) rather than in one commit at the end.
        """
        _check(self)  # again: time may have passed since claim
        self.path.mkdir(parents=True, exist_ok=True)
        manifest = _read_manifest(self.path, self.flag)
        manifest.update(dict.fromkeys(self.names, self.owner))
        _write_manifest(self.path, manifest)

    def _commit(self, stage: Path) -> None:
        staged = sorted(p.name for p in stage.iterdir())
        # Checked again, over what was actually staged: a file may have appeared meanwhile.
        _check(OutputDir(self.path, self.owner, frozenset(staged), self.flag, single_file=self.single_file))
        self.written[:] = [self.path / n for n in staged]
        if not self.path.exists():  # a new folder appears whole, manifest included
            _write_manifest(stage, dict.fromkeys(staged, self.owner))
            os.chmod(stage, 0o777 & ~_umask())  # mkdtemp's 0700 is for the staging only
            self.path.parent.mkdir(parents=True, exist_ok=True)
            os.replace(stage, self.path)
            return
        manifest = _read_manifest(self.path, self.flag)
        for name in staged:
            if not _same_picture(self.path / name, stage / name):
                os.replace(stage / name, self.path / name)
            manifest[name] = self.owner
        if self.replace_own:
            for name, owner in list(manifest.items()):
                if owner == self.owner and name not in staged and (self.path / name).is_file():
                    (self.path / name).unlink()
        # Entries whose file is gone (removed above, or by the user) are dropped.
        manifest = {n: o for n, o in manifest.items() if (self.path / n).exists()}
        _write_manifest(self.path, manifest)


PNG_TOLERANCE = 2 / 255
"""Largest per-channel difference at which a re-rendered PNG counts as the same picture."""


def _same_picture(old: Path, new: Path) -> bool:
    """Whether ``new`` is a PNG that shows the same picture as the existing ``old``.

    Rasterisation is not bit-exact across CPUs: numpy's vectorised ``log10`` (log-scale
    axes) differs in the last bit between AVX-512 and older CPUs, which can move the
    anti-aliasing of a nearly straight line by 1/255 at a few dozen pixels. Keeping the
    existing file then keeps regeneration byte-for-byte idempotent on every machine, while a
    real change (a moved curve, new text) differs by far more than :data:`PNG_TOLERANCE`.
    """
    if new.suffix.lower() != ".png" or not old.is_file():
        return False
    if old.read_bytes() == new.read_bytes():
        return True
    import numpy as np
    from matplotlib import image

    try:
        a, b = image.imread(old), image.imread(new)  # [rows, cols, channels] in [0, 1]
    except (OSError, ValueError, SyntaxError):
        return False  # not a PNG we can read: replace it
    return a.shape == b.shape and float(np.abs(a - b).max()) <= PNG_TOLERANCE + 1e-6


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
    if path.is_dir():
        raise UserError(f"{flag} {path} is a folder; give a file name, e.g. {flag} {path / 'result.json'}")
    return _claimed(OutputDir(path.parent, owner, frozenset([path.name]), flag, single_file=True))


def _check(out: OutputDir) -> None:
    path, flag = out.path, out.flag
    if not out.single_file:
        # Outputs mixed into the folder one works in (or the repository) are hard to
        # tell apart from one's own files: a command's outputs get a folder of their own.
        here = Path.cwd().resolve()
        if str(path) in ("", ".") or path.resolve() in (here, *here.parents):
            raise UserError(f"{flag} {str(path)!r} is the current folder or one above it; "
                            f"give a folder of its own, e.g. {flag} runs/out")
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


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


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
