"""Shared command-line plumbing: user errors become one line and exit code 2.

What :func:`run_main` turns into one line on stderr, and the exit status:

* a :class:`UserError` (bad input): ``error: …``, status 2;
* a write the machine refused (disk full, quota, read-only file system) anywhere in the
  command: ``error: cannot write PATH (reason) …``, status 2; every file is written
  atomically (:mod:`anomaly.io`), so what was there before stays complete;
* Ctrl-C: ``interrupted; …``, status 130;
* a closed pipe on stdout (``python -m anomaly.probe … | head -1``): nothing more is
  printed and the status is 141, what a shell reports for a program ended by ``SIGPIPE``
  (``yes | head -1`` under ``set -o pipefail``), so a pipeline can tell a cut-short output
  from a failure (Python's own recipe, docs.python.org "Note on SIGPIPE", uses 1).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import math
import os
import sys
from typing import Callable, Iterator, NoReturn, Sequence

from anomaly.errors import EXIT_USER_ERROR, UserError

__all__ = [
    "EXIT_BROKEN_PIPE", "EXIT_USER_ERROR", "ArgumentParser", "UserError", "check_memory",
    "finite_float", "layer_progress", "machine_memory", "positive_int", "run_main", "transformers_bars",
]

EXIT_BROKEN_PIPE = 141
"""Exit status when the reader of stdout went away (128 + SIGPIPE, as a shell reports it)."""

_FULL_DISK = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS)


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors are :class:`UserError`: one line, exit 2.

    argparse's own error prints the whole usage block before the message; the toolkit's
    commands print one line that names the problem and points to ``--help``.
    """

    def error(self, message: str) -> NoReturn:
        raise UserError(f"{message} (see {self.prog} --help)")


def run_main(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> int:
    """Call ``main(argv)``; print a :class:`UserError` as one line and return 2, no traceback
    (the module docstring lists every case)."""
    try:
        status = int(main(argv) or 0)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit
        return status
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted; nothing half-written was left behind", file=sys.stderr)
        return 130
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    except OSError as exc:
        if exc.errno not in _FULL_DISK:
            raise
        where = exc.filename if exc.filename is not None else "a file"
        print(f"error: cannot write {where} ({exc.strerror or exc}); every file written before is "
              "complete: free some space and run the same command again", file=sys.stderr)
        return EXIT_USER_ERROR


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that flushing it at exit raises no second
    ``BrokenPipeError`` (the recipe of docs.python.org, "Note on SIGPIPE")."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        return  # not a real file (captured in a test): nothing will be flushed to a pipe
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


def finite_float(text: str) -> float:
    """argparse ``type=`` for a float that must be a finite number (``nan``, ``inf`` and
    ``1e400``, which overflows to ``inf``, are refused)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def positive_int(text: str) -> int:
    """argparse ``type=`` for an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def machine_memory() -> int:
    """Physical memory of this machine in bytes (``0`` where the OS does not say)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return 0


def check_memory(nbytes: float, what: str, fix: str) -> None:
    """Refuse, before any work, settings whose arrays would take more than this machine's
    physical memory: ``what`` names the arrays and the settings, ``fix`` what to lower."""
    total = machine_memory()
    if total and nbytes > total:
        raise UserError(f"{what} would take {_size(nbytes)}, more than this machine's {_size(total)} "
                        f"of memory; {fix}")


def _size(nbytes: float) -> str:
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20)):
        if nbytes >= scale:
            value = nbytes / scale
            return f"{value:.3g} {unit}" if value < 1e6 else f"{value:.2e} {unit}"
    return f"{int(nbytes)} bytes"


@contextlib.contextmanager
def transformers_bars(enabled: bool) -> Iterator[None]:
    """Transformers' progress bars on or off inside the block, as the caller had them after."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    if not enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        (hf_logging.enable_progress_bar if was else hf_logging.disable_progress_bar)()


@contextlib.contextmanager
def layer_progress(total: int, desc: str, enabled: bool) -> Iterator[Callable[[int], None] | None]:
    """A per-layer progress callback (a tqdm bar of ``total`` layers) for the block, closed
    after it; ``None`` when ``enabled`` is false (``--quiet``)."""
    if not enabled:
        yield None
        return
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, unit="layer")
    try:
        yield lambda _layer: bar.update(1)
    finally:
        bar.close()
