"""Unverified "naturalness" pairs from real code on this machine: Python's standard library.

A function of the standard library is (almost always) correct code; a small mutant of it
(``data/mutants.py``: a swapped operator, an off-by-one constant, a deleted line, ...) almost
always is not. Such pairs carry no test verdict, so they are weaker labels than the verified
pairs of ``data/augmented.py``, but they are plentiful and cost no sandbox time, and they teach
what correct code looks like beyond the few problems the verified pairs come from. Training on
artificially seeded bugs in a corpus of real code is the classic recipe of learned bug
detectors (DeepBugs, Pradel & Sen 2018); here they are extra *training* pairs only.

Each pair is written like a HumanEval pair: the problem is the instruction with the function's
signature and docstring, the chosen code is the function, the rejected code a mutant of its
body (``chosen_kind="corpus"``, ``kind`` = the mutation kind, ``problem_id`` =
``stdlib:<module>:<qualname>``).

The corpus is the interpreter's own standard library (``sysconfig``'s ``stdlib`` path; no
download), with its test suites, demos and ``site-packages`` left out, so no third-party code
(and none of the bundled HumanEval problems) can enter. Deterministic for a given interpreter
version and seed.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import logging
import random
import sysconfig
import textwrap
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from codescaler_jax.data.mutants import FINE_MUTANT_KINDS, make_mutants_by_kind
from codescaler_jax.data.pairs import Pair
from codescaler_jax.data.problems import HUMANEVAL_INSTRUCTION
from codescaler_jax.data.source_edits import body_range, is_docstring, parse

log = logging.getLogger("codescaler_jax")

# directories of the standard library that are not library code (or not the library at all)
_SKIP_DIRS = frozenset({
    "site-packages", "dist-packages", "test", "tests", "idle_test", "idlelib", "turtledemo",
    "ensurepip", "lib2to3", "__pycache__", "pydoc_data", "tkinter",
})  # and config-* (the build's Makefile directory)


def stdlib_root() -> Path:
    """The running interpreter's standard library directory."""
    return Path(sysconfig.get_paths()["stdlib"])


def _files(root: Path) -> Iterator[Path]:
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).parts
        if any(part in _SKIP_DIRS or part.startswith("config-") for part in rel[:-1]):
            continue
        yield path


def corpus_functions(
    root: str | Path | None = None, *, min_body_lines: int = 2, max_body_lines: int = 25,
    max_chars: int = 1500,
) -> list[tuple[str, str, str]]:
    """``(function id, header, code)`` of every function (top-level, or a method, dedented)
    with a docstring and a body of ``min_body_lines..max_body_lines`` lines, in a fixed order.
    ``header`` is its signature and docstring (the "problem"), ``code`` the whole function.
    A directory is read once per process (about 4 s for the standard library)."""
    root = stdlib_root() if root is None else Path(root)
    return list(_read_functions(str(root.resolve()), min_body_lines, max_body_lines, max_chars))


@functools.lru_cache(maxsize=4)
def _read_functions(
    root_s: str, min_body_lines: int, max_body_lines: int, max_chars: int
) -> tuple[tuple[str, str, str], ...]:
    root = Path(root_s)
    out: list[tuple[str, str, str]] = []
    seen: set[str] = set()
    for path in _files(root):
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        tree = parse(text)
        if tree is None:
            continue
        lines = text.splitlines(keepends=True)
        module = ".".join(path.relative_to(root).with_suffix("").parts)
        stack: list[tuple[ast.AST, str]] = [(tree, "")]
        while stack:
            node, prefix = stack.pop()
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.ClassDef):
                    stack.append((child, f"{prefix}{child.name}."))
                if not isinstance(child, ast.FunctionDef) or child.decorator_list:
                    continue
                body = child.body
                if len(body) < 2 or not is_docstring(body[0]):
                    continue
                n_body = child.end_lineno - body[1].lineno + 1
                if not min_body_lines <= n_body <= max_body_lines:
                    continue
                code = textwrap.dedent("".join(lines[child.lineno - 1 : child.end_lineno]))
                header = textwrap.dedent("".join(lines[child.lineno - 1 : body[0].end_lineno]))
                if (len(code) > max_chars or not code.isascii() or code.strip() in seen
                        or parse(code) is None):
                    continue
                seen.add(code.strip())
                out.append((f"stdlib:{module}:{prefix}{child.name}", header, code))
    out.sort(key=lambda t: t[0])
    return tuple(out)


def corpus_pairs(
    *, n_functions: int, mutants_per_function: int = 2, seed: int = 0,
    kinds: tuple[str, ...] = FINE_MUTANT_KINDS, root: str | Path | None = None,
) -> tuple[list[Pair], dict[str, Any]]:
    """Up to ``n_functions`` seeded-drawn corpus functions, each with up to
    ``mutants_per_function`` mutants of its body over ``kinds``: pairs and statistics."""
    funcs = corpus_functions(root)
    rng = random.Random(f"corpus:{seed}")
    picked = rng.sample(funcs, min(n_functions, len(funcs)))
    pairs: list[Pair] = []
    kind_counts: Counter[str] = Counter()
    for fid, header, code in picked:
        name = fid.rsplit(".", 1)[-1].rsplit(":", 1)[-1]
        rng_range = body_range(code, name)
        if rng_range is None:
            continue
        lo, hi = rng_range
        problem = HUMANEVAL_INSTRUCTION + "```python\n" + header.strip("\n") + "\n```"
        mseed = int(hashlib.sha256(f"{seed}:{fid}".encode()).hexdigest()[:8], 16)
        for mutant, kind in make_mutants_by_kind(
            code, n=mutants_per_function, kinds=kinds, seed=mseed, lo=lo, hi=hi
        ):
            pairs.append(Pair(problem, code, mutant, fid, kind=kind, chosen_kind="corpus"))
            kind_counts[kind] += 1
    stats = {
        "root": str(stdlib_root() if root is None else root),
        "functions_available": len(funcs),
        "functions_drawn": len(picked),
        "pairs": len(pairs),
        "pairs_by_kind": dict(sorted(kind_counts.items())),
    }
    log.info("corpus pairs: %d from %d of %d standard-library functions", len(pairs),
             len(picked), len(funcs))
    return pairs, stats
