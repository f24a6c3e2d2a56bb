"""The one exception type for bad input from the user, which commands report without a traceback.

A config value, a command-line argument, a data record, a file the user named: when one of them
is wrong, the code raises `InputError` (or a subclass: ``ConfigError``, ``BadRecordError``, ...)
with a message that names the key, file, line or record. ``codescaler_jax.cli.guarded`` turns it
into one ``error: ...`` line on stderr and exit status 2; anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations


class InputError(ValueError):
    """Bad input from the user; the message names what is wrong and where."""


class RefusedError(RuntimeError):
    """The environment forbids what was asked (e.g. untrusted code with weak isolation); the
    message names the setting to change. Commands report it like bad input, without a traceback."""
