"""Shared command-line plumbing: user errors become one line and exit code 2."""

from __future__ import annotations

import argparse
import contextlib
import sys
from typing import Callable, Iterator, NoReturn, Sequence

from anomaly.errors import EXIT_USER_ERROR, UserError

__all__ = [
    "EXIT_USER_ERROR", "ArgumentParser", "UserError", "check_rope_config", "layer_progress", "run_main",
    "transformers_bars",
]


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


def check_rope_config(name: str, config, tokens: int, why: str) -> None:
    """Refuse, before any weight is loaded, a model without RoPE or with fewer positions than
    ``--tokens``. ``why`` says in the user's terms what the command needs RoPE for."""
    from anomaly import model_surgery

    if not model_surgery.has_rope(config):
        raise UserError(f"{name} ({config.model_type}) has no rotary position embedding (RoPE); "
                        f"{why}, pick a RoPE model")
    max_pos = model_surgery.max_positions_of(config)
    if max_pos and tokens > max_pos:
        raise UserError(f"--tokens {tokens} exceeds the model's {max_pos} positions; use --tokens {max_pos} or fewer")


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
