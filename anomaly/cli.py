"""Shared command-line plumbing: user errors become one line and exit code 2."""

from __future__ import annotations

import sys
from typing import Callable, Sequence

from anomaly.errors import EXIT_USER_ERROR, UserError

__all__ = ["EXIT_USER_ERROR", "UserError", "run_main"]


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
