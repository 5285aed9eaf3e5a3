"""The toolkit's error for bad user input.

Library code raises :class:`UserError` where the input (a model, a path, a number) is
wrong in a way the user can fix; the command-line entry points (:mod:`anomaly.cli`) print
it as one line and exit with :data:`EXIT_USER_ERROR`. Kept apart from the CLI plumbing so
that library modules never import from a CLI module.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user. The message says what was wrong and what to do."""


EXIT_USER_ERROR = 2
"""Exit status of a command that refused its input."""
