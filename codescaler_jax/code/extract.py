"""Fenced-code-block extraction from model responses, as the reference reward pipeline does it.

Two modes (recipe section 3):

- ``train`` (what rewards use): every fenced block in the whole response is found; exactly one
  must exist, it is stripped, and it must parse; otherwise the result is "no code"
  (``code == ""``, ``valid == False``, ``reason`` says why).
- ``eval``: the last fenced block, stripped, with no single-block rule; ``valid`` reports the
  checker's verdict but never empties the code.

A block is what the reference regex ```` ```(\\w*)\\n(.*?)``` ```` (DOTALL, via ``re.findall``)
matches: three backticks, an optional ``\\w+`` tag, a required newline, then everything up to the
next three backticks. `find_blocks` reproduces its matches exactly, including the odd cases that
follow from it (a four-backtick fence opens one character late and leaves a stray backtick, CRLF
after the tag is not a newline so the fence does not open there, an unclosed fence is no block,
``` python`` with a space is no fence), and runs in linear time in the response.

``language="python"`` (the default) judges every block as Python whatever its tag, exactly as the
reference. ``language="auto"`` takes the language from the tag (aliases in `validity`), with
``fallback_language`` for untagged blocks; tags may then also contain ``+ # . -`` (``c++``, ``c#``)
and an unknown tag gives ``reason="unsupported_language"``. Any other supported language name
judges every block in that language. Only ``python`` uses the reference's ``\\w`` tag rule.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass

from codescaler_jax.code import validity

MODES = ("train", "eval")

# The reference pattern with possessive tag runs (``\n`` is not a word character, so no match is
# lost). Linear: a tag run holds no backtick, so runs never overlap; the lazy body scan stops at
# the next ``` and, if there is none, no later opening can match either, so at most one scan
# fails and the search ends.
_BLOCK_WORD = re.compile(r"```(\w*+)\n(.*?)```", re.DOTALL)
_BLOCK_WIDE = re.compile(r"```([\w+#.\-]*+)\n(.*?)```", re.DOTALL)


@dataclass(frozen=True)
class Extraction:
    """Result of extracting code from one response.

    ``code == ""`` with ``valid == False`` is "no code". ``reason`` is ``ok`` or one of
    ``no_block``, ``multiple_blocks``, ``empty``, ``syntax_error``, ``too_complex``,
    ``unsupported_language``. ``language`` is the canonical language the code was judged as
    (``""`` when no single block was selected).
    """

    code: str
    valid: bool
    language: str
    reason: str


def find_blocks(text: str, *, wide_tags: bool = False) -> list[tuple[str, str]]:
    """The ``(tag, body)`` pairs of ``re.findall(r"```(\\w*)\\n(.*?)```", text, re.DOTALL)``.

    ``wide_tags`` also admits ``+ # . -`` in tags (for ``auto`` language detection). Linear time
    (see the pattern's comment; tests/test_extract.py times adversarial inputs).
    """
    return (_BLOCK_WIDE if wide_tags else _BLOCK_WORD).findall(text)


def _judge(tag: str, language: str, fallback: str) -> str:
    if language == "auto":
        return validity.normalize_language(tag, fallback)
    return language


def extract_code(
    response: str,
    *,
    mode: str = "train",
    language: str = "python",
    fallback_language: str = "python",
) -> Extraction:
    """Extract the code of one response (see the module docstring for the rules).

    Never raises on content: any string gives an `Extraction`. Raises ValueError for a bad
    ``mode``/``language`` argument and TypeError when ``response`` is not a str.
    """
    if not isinstance(response, str):
        raise TypeError(f"response must be str, got {type(response).__name__}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    lang = _resolve_language(language)
    if lang == "auto":
        fallback_language = _resolve_language(fallback_language)
        if fallback_language == "auto":
            raise ValueError("fallback_language must be a language, not 'auto'")
    blocks = find_blocks(response, wide_tags=lang != "python")
    if not blocks:
        return Extraction("", False, "", "no_block")
    if mode == "train" and len(blocks) != 1:
        return Extraction("", False, "", "multiple_blocks")
    tag, body = blocks[-1]
    code = body.strip()
    judged = _judge(tag, lang, fallback_language)
    if not code:
        return Extraction("", False, judged, "empty")
    verdict = validity.syntax_verdict(code, judged)
    if verdict == validity.OK:
        return Extraction(code, True, judged, "ok")
    if mode == "train":
        return Extraction("", False, judged, verdict)
    return Extraction(code, False, judged, verdict)


@functools.lru_cache(maxsize=64)
def _resolve_language(language: str) -> str:
    if language == "auto":
        return "auto"
    name = validity.normalize_language(language, "python") if language else ""
    if name not in validity.SUPPORTED_LANGUAGES:
        raise ValueError(
            f"language must be 'auto' or one of {validity.SUPPORTED_LANGUAGES}, got {language!r}"
        )
    return name


def extract_batch(responses: Iterable[str], **kwargs) -> list[Extraction]:
    """`extract_code` over a batch of responses (same keyword arguments)."""
    return [extract_code(r, **kwargs) for r in responses]
