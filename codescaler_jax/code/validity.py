"""Syntax validity of extracted code: CPython's parser for Python, tree-sitter for other languages.

Python. The verdict is exactly `ast.parse` of the running interpreter, because that is what the
reference extractor used (recipe section 3.1): any exception (SyntaxError, IndentationError,
ValueError for NUL bytes, UnicodeEncodeError for lone surrogates, MemoryError or RecursionError on
deep nesting) means invalid. tree-sitter-python is *not* consulted for Python: it accepts code that
CPython rejects (Python 2 ``print x``, ``exec "s"``, type-parameter syntax on 3.11) and rejects some
code CPython accepts, so it can neither confirm nor refute a verdict, and as a pre-filter it only
adds its own parse time to every valid snippet (`python -m codescaler_jax.bench.extract` measures
both; tests/test_validity.py checks the ast.parse equality on a generated corpus).

Other languages. tree-sitter grammars from `tree_sitter_language_pack`; a snippet is valid when its
tree has no ERROR or MISSING node (`root_node.has_error`). tree-sitter's error recovery is not
linear on adversarial input (measured here: Java ``a<a<a<...`` takes 4 s at 10 KB and 40 s at
40 KB), so every parse runs under a time budget that grows linearly with the input
(`PARSE_BUDGET_BASE_S` + `PARSE_BUDGET_PER_BYTE_S` per byte, about 50x the normal parse time of
real code); a parse that runs out of budget is cancelled and the snippet judged invalid
(``too_complex``). Normal code never comes near the budget; only pathological input does.
"""

from __future__ import annotations

import ast
import threading
import time

# Canonical names are tree_sitter_language_pack grammar names.
SUPPORTED_LANGUAGES: tuple[str, ...] = (
    "python",
    "c",
    "cpp",
    "csharp",
    "go",
    "java",
    "javascript",
    "kotlin",
    "ruby",
    "rust",
    "scala",
    "swift",
    "typescript",
)

_ALIASES: dict[str, str] = {
    "py": "python",
    "py3": "python",
    "python3": "python",
    "python2": "python",
    "py2": "python",
    "ipython": "python",
    "c++": "cpp",
    "cxx": "cpp",
    "cc": "cpp",
    "hpp": "cpp",
    "h++": "cpp",
    "h": "c",
    "cs": "csharp",
    "c#": "csharp",
    "golang": "go",
    "js": "javascript",
    "node": "javascript",
    "nodejs": "javascript",
    "mjs": "javascript",
    "jsx": "javascript",
    "ts": "typescript",
    "kt": "kotlin",
    "kts": "kotlin",
    "rb": "ruby",
    "rs": "rust",
    "sc": "scala",
}

# Parse budget for tree-sitter (seconds). Real code parses at 2-5 MB/s here (0.2-0.5 us/byte).
PARSE_BUDGET_BASE_S = 0.02
PARSE_BUDGET_PER_BYTE_S = 20e-6

OK = "ok"
SYNTAX_ERROR = "syntax_error"
TOO_COMPLEX = "too_complex"
UNSUPPORTED = "unsupported_language"


def normalize_language(tag: str | None, fallback: str = "python") -> str:
    """Canonical language name for a fence tag (``py`` -> ``python``, ``c++`` -> ``cpp``, ...).

    An empty or missing tag gives the (normalised) ``fallback``. An unknown tag is returned
    lower-cased as is; callers test membership in `SUPPORTED_LANGUAGES`.
    """
    if not tag:
        if not fallback:
            raise ValueError("fallback language must be a non-empty name")
        return normalize_language(fallback, "python")
    name = tag.strip().lower()
    return _ALIASES.get(name, name)


def python_verdict(code: str) -> str:
    """`OK` iff `ast.parse(code)` succeeds; any exception at all is a `SYNTAX_ERROR`."""
    try:
        ast.parse(code)
    except Exception:  # noqa: BLE001 - the reference treats every failure as invalid
        return SYNTAX_ERROR
    return OK


_local = threading.local()


def _parser(language: str):
    """One tree-sitter parser per thread and language (parsers are not thread-safe)."""
    cache = getattr(_local, "parsers", None)
    if cache is None:
        cache = _local.parsers = {}
    parser = cache.get(language)
    if parser is None:
        from tree_sitter_language_pack import get_parser

        parser = cache[language] = get_parser(language)
    return parser


def tree_sitter_verdict(code: str, language: str, *, budget_s: float | None = None) -> str:
    """Verdict of the tree-sitter grammar ``language`` under a time budget linear in the size.

    Returns `OK`, `SYNTAX_ERROR` (an ERROR/MISSING node, or text that is not encodable as UTF-8)
    or `TOO_COMPLEX` (the parse ran out of budget and was cancelled).
    """
    try:
        data = code.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates: not source text in any language
        return SYNTAX_ERROR
    if budget_s is None:
        budget_s = PARSE_BUDGET_BASE_S + PARSE_BUDGET_PER_BYTE_S * len(data)
    deadline = time.perf_counter() + budget_s
    view = memoryview(data)
    clock = time.perf_counter

    # The callback form is the only one that takes a progress callback (cancellation); slicing a
    # memoryview copies nothing, so re-reads after the lexer moves back stay O(1).
    def read(offset: int, _point) -> memoryview:
        return view[offset:]

    def progress(_offset: int, _has_error: bool) -> bool:
        return clock() > deadline

    parser = _parser(language)
    tree = parser.parse(read, progress_callback=progress)
    if tree is None:
        # Cancelled. tree-sitter keeps the half-done parse to resume it on the next call with
        # the same input; drop it so the next snippet starts from scratch.
        parser.reset()
        return TOO_COMPLEX
    return SYNTAX_ERROR if tree.root_node.has_error else OK


def syntax_verdict(code: str, language: str) -> str:
    """`OK`, `SYNTAX_ERROR`, `TOO_COMPLEX` or `UNSUPPORTED` for ``code`` in a canonical language."""
    if language == "python":
        return python_verdict(code)
    if language not in SUPPORTED_LANGUAGES:
        return UNSUPPORTED
    return tree_sitter_verdict(code, language)


def is_valid(code: str, language: str) -> bool:
    """True iff ``code`` parses in ``language`` (a canonical name or an alias).

    Python: exactly `ast.parse` of this interpreter. Others: tree-sitter, no ERROR/MISSING node,
    within the linear time budget. Raises ValueError for an unsupported language.
    """
    name = normalize_language(language, "python")
    if name not in SUPPORTED_LANGUAGES:
        raise ValueError(
            f"unsupported language {language!r}; supported: {', '.join(SUPPORTED_LANGUAGES)}"
        )
    return syntax_verdict(code, name) == OK

