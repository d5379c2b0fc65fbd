"""The ``seqnorm`` commands: ``explain``, ``bench``, ``compare``, ``audit``.

Each command is ``add_arguments(parser)`` and ``run(args) -> exit code``; a
package command is split compute → report → command. Bad input raises
:class:`CommandError` anywhere below ``run``, and :func:`guarded` turns it into
one line on stderr and exit status 2 — never a traceback.
"""

from __future__ import annotations

import sys
from typing import Callable

__all__ = ["CommandError", "fail", "guarded"]


class CommandError(ValueError):
    """Bad user input: the message is one line naming the option."""


def fail(command: str, message: str) -> int:
    """Say what is wrong in one line on stderr; the exit status for it (2)."""
    print(f"seqnorm {command}: error: {message}", file=sys.stderr)
    return 2


def guarded(command: str, run: Callable[[object], int], args) -> int:
    """``run(args)``, with a :class:`CommandError` reported by :func:`fail`."""
    try:
        return run(args)
    except CommandError as e:
        return fail(command, str(e))
