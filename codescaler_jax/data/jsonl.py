"""Reading JSONL input safely: bounded memory per line, one clear message per bad line.

``iter_jsonl(path, max_record_bytes=...)`` yields ``(where, value)`` for each non-blank line, where
``where`` is ``"path:line"`` and ``value`` is the parsed JSON, or a `RecordError` describing why
the line is bad: longer than ``max_record_bytes`` (only that many bytes of it are ever held in
memory; the rest is skipped in chunks), not UTF-8, not JSON, or nested too deeply for the parser
(a ``RecursionError`` inside ``json.loads``). Callers decide whether a bad line stops the run or
is skipped and counted.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from codescaler_jax.errors import InputError

DEFAULT_MAX_RECORD_BYTES = 1 << 20
_CHUNK = 1 << 20


class RecordError(InputError):
    """A bad input line; the message starts with ``path:line``."""


def loads(text: str | bytes, where: str = "input") -> Any:
    """``json.loads`` whose failures are `RecordError`s naming ``where`` (deep nesting too)."""
    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        return json.loads(text)
    except UnicodeDecodeError as e:
        raise RecordError(f"{where}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise RecordError(f"{where}: not valid JSON ({e.msg}, column {e.colno})") from None
    except RecursionError:
        raise RecordError(f"{where}: JSON nested too deeply") from None


def _lines(f: BinaryIO, limit: int) -> Iterator[tuple[bytes | None, int]]:
    """``(line, size)`` per line; ``line`` is None (and only its size is counted) when longer
    than ``limit`` bytes, which are then never held in memory at once."""
    while True:
        line = f.readline(limit + 1)
        if not line:
            return
        if len(line) <= limit or line.endswith(b"\n"):
            yield line, len(line)
            continue
        size = len(line)
        while True:  # the rest of an oversized line, in bounded chunks
            more = f.readline(_CHUNK)
            size += len(more)
            if not more or more.endswith(b"\n"):
                break
        yield None, size


def iter_jsonl(
    path: str | Path,
    *,
    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
    limit_name: str = "--max-record-bytes",
) -> Iterator[tuple[str, Any]]:
    """``(where, value)`` per non-blank line of ``path``; ``value`` is a `RecordError` for a bad
    line (see the module docstring). ``limit_name`` names the size limit's knob in messages.
    Raises ``FileNotFoundError`` for a missing file."""
    path = Path(path)
    with open(path, "rb") as f:
        for lineno, (raw, size) in enumerate(_lines(f, max_record_bytes), 1):
            where = f"{path}:{lineno}"
            if raw is None:
                yield where, RecordError(
                    f"{where}: record of {size} bytes exceeds {limit_name}={max_record_bytes}"
                )
                continue
            if not raw.strip():
                continue
            try:
                yield where, loads(raw, where)
            except RecordError as e:
                yield where, e
