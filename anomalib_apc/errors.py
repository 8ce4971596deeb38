"""The project's own errors: one base class, so that a command line can report them in one line.

A user error (bad input, a missing file, an unusable setting) is an :class:`ApcError`. The concrete
classes also derive from the built-in exception a Python caller would expect (``ValueError``,
``FileNotFoundError``, ...), so code that catches those keeps working. Anything else (a torch
out-of-memory, a genuine bug) is not an ``ApcError`` and keeps its traceback.

This module is the bottom of the import graph: every layer may import it, it imports nothing of
the project. :func:`run_reporting_user_errors` is the one error policy of every command line.
"""

import sys
import traceback
from collections.abc import Callable, Collection


class ApcError(Exception):
    """Base class of every error that anomalib-apc raises about its inputs or settings."""


class InvalidInputError(ApcError, ValueError):
    """An argument, setting or file content that cannot be used; the message names which."""


class MissingInputError(ApcError, FileNotFoundError):
    """A file or folder that is needed but absent; the message names it."""


class OutputExistsError(ApcError, FileExistsError):
    """An output that exists already and would be overwritten without ``--overwrite``."""


class InterruptedRunError(ApcError, RuntimeError):
    """A run stopped by a signal (SIGTERM, SIGINT) before it finished; nothing complete was written."""


class PretrainedWeightsUnavailableError(ApcError, RuntimeError):
    """Pretrained weights that were asked for cannot be had (no hub or registry, not cached, not the pinned file)."""


def check_choice(argument: str, value: object, choices: Collection[object]) -> None:
    """Refuse ``value`` unless it is one of ``choices``, with one message naming ``argument`` and the choices.

    Raises:
        InvalidInputError: ``value`` is not one of ``choices``.
    """
    if value not in choices:
        msg = f"{argument} must be one of {list(choices)}, got {value!r}."
        raise InvalidInputError(msg)


USER_ERRORS = (ApcError, FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError)
"""What a user can fix: the project's errors and the operating system's file errors. Other ``OSError`` s (a
connection reset, a full disk) and every other exception keep their traceback, so they can be reported."""
USER_ERROR_STATUS = 2


def run_reporting_user_errors(run: Callable[[], int | None], program: str, verbose: bool) -> int:
    """``run()``'s exit status; a :data:`USER_ERRORS` error becomes one line on stderr and :data:`USER_ERROR_STATUS`.

    With ``verbose`` the line follows the error's traceback. Any other exception propagates.
    """
    try:
        return int(run() or 0)
    except USER_ERRORS as error:
        if verbose:
            traceback.print_exception(error, file=sys.stderr)
        print(f"{program}: error: {error}", file=sys.stderr)
        return USER_ERROR_STATUS
