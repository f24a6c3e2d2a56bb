"""Output comparison for execution tests, as the reference's LiveCodeBench-style harness does it.

stdio (recipe section 5.6): both outputs are stripped, split on ``\\n`` and each line stripped; the
line counts must match; each line pair must be equal as text or, failing that, both lines must
split into whitespace-separated tokens that all parse as `decimal.Decimal` and be equal token by
token as numbers (so ``1.0`` == ``1`` and ``2e0`` == ``2``, with no float tolerance, like the
reference).

call-based: the returned value (with a top-level tuple turned into a list) must equal the expected
value, or, when the expected value is a non-empty list, its first element (test data often wraps
the answer in a list). Values arrive here as JSON-decoded plain data (the sandbox serialises the
return value inside the sandbox, refusing anything that is not plain data), so ``==`` is the
builtin one and a returned object cannot fake equality with a custom ``__eq__``.
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
from typing import Any


def stripped_lines(text: str) -> list[str]:
    """``text`` stripped, split on newlines, each line stripped (the reference's normal form)."""
    return [line.strip() for line in text.strip().split("\n")]


def _decimals(line: str) -> list[Decimal] | None:
    try:
        return [Decimal(tok) for tok in line.split()]
    except (InvalidOperation, ValueError):
        return None


def lines_match(got: str, expected: str) -> bool:
    """One stripped line pair: equal text, or equal token-wise as `Decimal` numbers."""
    if got == expected:
        return True
    got_nums = _decimals(got)
    if got_nums is None:
        return False
    want_nums = _decimals(expected)
    if want_nums is None:
        return False
    try:
        return got_nums == want_nums
    except InvalidOperation:  # a signalling NaN refuses comparison; the reference then fails too
        return False


def stdio_match(got: str, expected: str) -> bool:
    """True iff program output ``got`` matches ``expected`` under the reference's rules."""
    got_lines = stripped_lines(got)
    want_lines = stripped_lines(expected)
    if len(got_lines) != len(want_lines):
        return False
    return all(lines_match(g, w) for g, w in zip(got_lines, want_lines, strict=True))


def call_match(got: Any, expected: Any) -> bool:
    """True iff a call-based return value ``got`` matches ``expected`` (both plain JSON data)."""
    if isinstance(got, tuple):
        got = list(got)
    if got == expected:
        return True
    return isinstance(expected, list) and len(expected) > 0 and got == expected[0]
