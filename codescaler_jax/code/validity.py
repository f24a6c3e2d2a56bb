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
linear on adversarial input (measured here: Java ``a<a<a<...`` takes 4-5 s at 10 KB and 40 s at
40 KB) and cannot be interrupted in-process: the GIL is held throughout, and the progress
callback (the only way to cancel) comes every 100 parser operations, which on such input can
take 0.5 s between calls, and not at all during end-of-input recovery. So:
- snippets up to `IN_PROCESS_MAX_BYTES` are parsed in-process with no budget, their size bounding
  the worst case: over 28x28 two-token patterns and 20 random token soups in 12 grammars at 2 KB
  the slowest took 0.7 s here (C, ``x=<`` repeated; machine load 10), against 0.3-0.7 ms for
  real code of that size;
- larger snippets go to a helper process under a time budget linear in the size
  (`PARSE_BUDGET_BASE_S` + `PARSE_BUDGET_PER_BYTE_S` per byte, about 50x the normal parse time
  of real code); over budget, the helper is killed (and restarted on the next call) and the
  snippet judged invalid (``too_complex``). Normal code never comes near the budget.
"""

from __future__ import annotations

import ast
import atexit
import os
import select
import subprocess
import sys
import threading
import warnings

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
# Largest snippet parsed in this process (worst case found: 0.7 s at this size, see above);
# bigger ones go to a helper process that can be killed.
IN_PROCESS_MAX_BYTES = 2048

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
    """`OK` iff `ast.parse(code)` succeeds; any exception at all is a `SYNTAX_ERROR`.

    Warnings are silenced during the parse: ast.parse warns on some valid code (invalid escape
    sequences, ``is`` with a literal), and under ``-W error`` such a warning would turn into a
    SyntaxError, making the verdict depend on the process's warning filters.
    """
    try:
        _parse_silently(code)
    except Exception:  # noqa: BLE001 - the reference treats every failure as invalid
        return SYNTAX_ERROR
    return OK


_IGNORE_ALL = [("ignore", None, Warning, None, 0)]
_WARNINGS_LOCK = threading.Lock()


def _parse_silently(code: str) -> None:
    # What warnings.catch_warnings(action="ignore") does, minus its showwarning bookkeeping:
    # 0.1 us instead of 2.3 us, which is 3% of a typical parse. Falls back to the public API
    # where the private hook is missing.
    mutated = getattr(warnings, "_filters_mutated", None)
    if mutated is None:
        with warnings.catch_warnings(action="ignore"):
            ast.parse(code)
        return
    # The lock keeps two threads from saving each other's swapped-in filters (which would
    # leave every warning silenced); ast.parse holds the GIL anyway, so nothing is serialised
    # that was not already.
    with _WARNINGS_LOCK:
        saved = warnings.filters
        warnings.filters = _IGNORE_ALL
        mutated()
        try:
            ast.parse(code)
        finally:
            warnings.filters = saved
            mutated()


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


def _in_process_verdict(data: bytes, language: str) -> str:
    return SYNTAX_ERROR if _parser(language).parse(data).root_node.has_error else OK


# The helper process: reads "<language> <n>\n" + n bytes, answers b"o" (no error) or b"e".
_WORKER_SOURCE = """
import sys
from tree_sitter_language_pack import get_parser
parsers = {}
stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
stdout.write(b"r")
stdout.flush()
while True:
    head = stdin.readline()
    if not head:
        break
    language, size = head.split()
    data = stdin.read(int(size))
    parser = parsers.get(language)
    if parser is None:
        parser = parsers[language] = get_parser(language.decode())
    stdout.write(b"e" if parser.parse(data).root_node.has_error else b"o")
    stdout.flush()
"""


class _ParserProcess:
    """tree-sitter in a helper process that can be killed when a parse runs out of budget.

    tree-sitter's error recovery at end of input cannot be cancelled (no progress callback is
    made during it) and is quadratic on some inputs, so larger snippets are parsed here.
    """

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.owner = 0

    def _start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-I", "-c", _WORKER_SOURCE],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            close_fds=True,
        )
        self.owner = os.getpid()
        ready, _, _ = select.select([self.proc.stdout], [], [], 60.0)
        if not ready or self.proc.stdout.read(1) != b"r":
            self.stop()
            raise RuntimeError("the tree-sitter helper process did not start")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and self.owner == os.getpid():
            proc.kill()
            proc.wait()
            for stream in (proc.stdin, proc.stdout):
                stream.close()

    def verdict(self, data: bytes, language: str, budget_s: float) -> str:
        if self.proc is None or self.owner != os.getpid() or self.proc.poll() is not None:
            if self.owner != os.getpid():
                self.proc = None  # inherited through fork: the parent's helper, not ours
            self.stop()
            self._start()
        try:
            self.proc.stdin.write(f"{language} {len(data)}\n".encode() + data)
            self.proc.stdin.flush()
        except OSError:
            self.stop()
            return TOO_COMPLEX
        ready, _, _ = select.select([self.proc.stdout], [], [], budget_s)
        answer = self.proc.stdout.read(1) if ready else b""
        if answer == b"o":
            return OK
        if answer == b"e":
            return SYNTAX_ERROR
        self.stop()  # over budget (or dead): kill it, a fresh one starts on the next call
        return TOO_COMPLEX


def _parser_process() -> _ParserProcess:
    worker = getattr(_local, "worker", None)
    if worker is None:
        worker = _local.worker = _ParserProcess()
        _all_workers.append(worker)
    return worker


_all_workers: list[_ParserProcess] = []
atexit.register(lambda: [w.stop() for w in _all_workers])


def tree_sitter_verdict(code: str, language: str, *, budget_s: float | None = None) -> str:
    """Verdict of the tree-sitter grammar ``language`` under a time budget linear in the size.

    Returns `OK`, `SYNTAX_ERROR` (an ERROR/MISSING node, or text that is not encodable as UTF-8)
    or `TOO_COMPLEX` (the parse ran out of budget and was abandoned). Snippets up to
    `IN_PROCESS_MAX_BYTES` are parsed in this process with no budget (their size bounds the
    worst case); larger ones in a helper process that is killed when over ``budget_s``.
    """
    try:
        data = code.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates: not source text in any language
        return SYNTAX_ERROR
    if budget_s is None:
        budget_s = PARSE_BUDGET_BASE_S + PARSE_BUDGET_PER_BYTE_S * len(data)
    if len(data) <= IN_PROCESS_MAX_BYTES:
        return _in_process_verdict(data, language)
    return _parser_process().verdict(data, language, budget_s)


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

