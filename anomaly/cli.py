"""Shared command-line plumbing: user errors become one line and exit code 2."""

from __future__ import annotations

import sys
from typing import Callable, Sequence


class UserError(Exception):
    """Bad input from the user. The message says what was wrong and what to do."""


EXIT_USER_ERROR = 2


def run_main(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> int:
    """Call ``main(argv)``; print a :class:`UserError` as one line and return 2, no traceback."""
    try:
        return int(main(argv) or 0)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted; no output was written", file=sys.stderr)
        return 130
