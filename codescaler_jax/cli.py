"""What every command-line entry point shares: bad input becomes one line and exit status 2.

    @guarded
    def main(argv: list[str] | None = None) -> int: ...

``guarded`` catches `InputError` (bad config keys and values, bad records, unreadable or
malformed files the user named) and ``FileNotFoundError`` (a path the user gave that does not
exist), prints ``error: <message>`` on stderr and returns 2, so no traceback reaches a user for
a bad input, and `RefusedError` (the environment forbids what was asked, e.g. untrusted code
under weak isolation) the same way. Ctrl-C prints one line and returns 130. Every other
exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable

from codescaler_jax.errors import InputError, RefusedError

EXIT_BAD_INPUT = 2

Main = Callable[[list[str] | None], int]


def report(e: BaseException) -> int:
    """Print ``error: <message>`` for a bad-input exception; returns the exit status (2)."""
    msg = str(e)
    if isinstance(e, FileNotFoundError) and e.filename and e.filename not in msg:
        msg = f"{msg}: {e.filename}"
    print(f"error: {msg}", file=sys.stderr)
    return EXIT_BAD_INPUT


def guarded(main: Main) -> Main:
    """Wrap a ``main(argv) -> int`` so that bad input ends it with one line and status 2."""

    @functools.wraps(main)
    def wrapper(argv: list[str] | None = None) -> int:
        try:
            return main(argv)
        except (InputError, RefusedError, FileNotFoundError, NotADirectoryError,
                IsADirectoryError) as e:
            return report(e)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130

    return wrapper


def positive_int(text: str) -> int:
    """argparse ``type=`` for a count that must be >= 1 (the error names the argument)."""
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def positive_float(text: str) -> float:
    """argparse ``type=`` for a quantity that must be > 0."""
    import argparse

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def shaping_choices() -> list[str]:
    """The registered reward-shaping modes, for ``--shaping`` ``choices=`` (names only: no
    jax import before the command parses its arguments)."""
    from codescaler_jax.registry import SHAPERS

    return sorted(SHAPERS)
