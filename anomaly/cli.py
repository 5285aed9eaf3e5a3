"""Shared command-line plumbing: user errors become one line and exit code 2."""

from __future__ import annotations

import argparse
import contextlib
import sys
from typing import Callable, Iterator, NoReturn, Sequence

from anomaly.errors import EXIT_USER_ERROR, UserError

__all__ = ["EXIT_USER_ERROR", "ArgumentParser", "UserError", "run_main", "transformers_bars"]


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors are :class:`UserError`: one line, exit 2.

    argparse's own error prints the whole usage block before the message; the toolkit's
    commands print one line that names the problem and points to ``--help``.
    """

    def error(self, message: str) -> NoReturn:
        raise UserError(f"{message} (see {self.prog} --help)")


def run_main(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> int:
    """Call ``main(argv)``; print a :class:`UserError` as one line and return 2, no traceback."""
    try:
        return int(main(argv) or 0)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted; nothing half-written was left behind", file=sys.stderr)
        return 130


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
