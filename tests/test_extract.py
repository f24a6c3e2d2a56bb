"""Extraction follows the reference (recipe section 3): an edge-case table checked both against
hand-worked expectations and against the reference's own regex + ast.parse, a random-string
fuzz against `re.findall`, linear time on adversarial input, and the ``auto`` language mode.
"""

import ast
import random
import re
import time

import pytest

from codescaler_jax.code.extract import Extraction, extract_batch, extract_code, find_blocks

# The reference's pattern and its two extractors, written out from the recipe (section 3).
REF_PATTERN = re.compile(r"```(?:\w+)?\n(.*?)```", re.DOTALL)


def ref_train(response: str) -> str:
    blocks = REF_PATTERN.findall(response)
    if len(blocks) != 1:
        return ""
    code = blocks[0].strip()
    try:
        ast.parse(code)
    except Exception:  # noqa: BLE001 - the reference's bare except
        return ""
    return code


def ref_eval(response: str) -> str:
    blocks = REF_PATTERN.findall(response)
    return blocks[-1].strip() if blocks else ""


CPP = "#include <cstdio>\nint main() {\n    printf(\"%d\\n\", 42);\n    return 0;\n}"

# name -> (response, train (code, valid, reason), eval (code, valid, reason)), worked by hand.
CASES = {
    "no_fence": ("The answer is to loop over the list.", ("", False, "no_block"),
                 ("", False, "no_block")),
    "one_block": ("Here:\n```python\nprint(1)\n```\nDone.", ("print(1)", True, "ok"),
                  ("print(1)", True, "ok")),
    "untagged": ("```\nx = 1\n```", ("x = 1", True, "ok"), ("x = 1", True, "ok")),
    "two_fences": ("```python\na = 1\n```\nor\n```python\nb = 2\n```",
                   ("", False, "multiple_blocks"), ("b = 2", True, "ok")),
    # A sample-I/O block plus the solution: two blocks, so no code in train mode.
    "io_plus_solution": ("Input:\n```\n3\n```\n```python\nprint(int(input()))\n```",
                         ("", False, "multiple_blocks"), ("print(int(input()))", True, "ok")),
    "fence_in_reasoning": ("<think>try ```python\nx=1\n``` hmm</think>\n```python\nprint(2)\n```",
                           ("", False, "multiple_blocks"), ("print(2)", True, "ok")),
    # Inline triple backticks in prose never open a block (no newline after the tag).
    "inline_fence_in_prose": ("Use ```sorted``` here.\n```python\nprint(sorted([2, 1]))\n```",
                              ("print(sorted([2, 1]))", True, "ok"),
                              ("print(sorted([2, 1]))", True, "ok")),
    "unclosed_fence": ("```python\nprint(1)\n", ("", False, "no_block"), ("", False, "no_block")),
    "truncated_second_block": ("```python\na = 1\n```\nNow:\n```python\nb = ",
                               ("a = 1", True, "ok"), ("a = 1", True, "ok")),
    "space_before_tag": ("``` python\nprint(1)\n```", ("", False, "no_block"),
                         ("", False, "no_block")),
    "no_newline_after_tag": ("```python print(1)```", ("", False, "no_block"),
                             ("", False, "no_block")),
    "crlf": ("Intro\r\n```python\r\nprint(1)\r\n```\r\n", ("", False, "no_block"),
             ("", False, "no_block")),
    # CRLF opening, LF after the closing fence: the closing fence opens a block of the prose.
    "crlf_mixed": ("```python\r\nx = 1\r\n```\nDone\n```", ("Done", True, "ok"),
                   ("Done", True, "ok")),
    # Four backticks: the match starts one backtick late and stops at the first three closing ones.
    "four_backticks": ("````python\nprint(1)\n````", ("print(1)", True, "ok"),
                       ("print(1)", True, "ok")),
    "four_backticks_nested": ("````markdown\n```python\nx = 1\n```\n````",
                              ("", False, "multiple_blocks"), ("", False, "empty")),
    "backticks_in_string": ('```python\ns = "```"\nprint(s)\n```', ("", False, "syntax_error"),
                            ('s = "', False, "syntax_error")),
    "double_backticks_in_string": ('```python\ns = "``"\nprint(s)\n```',
                                   ('s = "``"\nprint(s)', True, "ok"),
                                   ('s = "``"\nprint(s)', True, "ok")),
    "empty_block": ("```python\n```", ("", False, "empty"), ("", False, "empty")),
    "whitespace_block": ("```python\n  \n\t\n```", ("", False, "empty"), ("", False, "empty")),
    "cpp_tagged_cpp": (f"```cpp\n{CPP}\n```", ("", False, "syntax_error"),
                       (CPP, False, "syntax_error")),
    "python_tagged_cpp": (f"```python\n{CPP}\n```", ("", False, "syntax_error"),
                          (CPP, False, "syntax_error")),
    "cpp_tagged_python": ("```cpp\nprint('hi')\n```", ("print('hi')", True, "ok"),
                          ("print('hi')", True, "ok")),
    # "c++" is not \w+: no block opens there; the closing fence then has nothing after it.
    "cpp_plus_tag": (f"```c++\n{CPP}\n```", ("", False, "no_block"), ("", False, "no_block")),
    "python2_print": ("```python\nprint 'hi'\n```", ("", False, "syntax_error"),
                      ("print 'hi'", False, "syntax_error")),
    "unicode_tag": ("```pythön\nx = 1\n```", ("x = 1", True, "ok"), ("x = 1", True, "ok")),
    "strip": ("```python\n\n\n    x = 1\n\n```", ("x = 1", True, "ok"), ("x = 1", True, "ok")),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_edge_cases_python_mode(name):
    response, train, evaluation = CASES[name]
    got_train = extract_code(response)
    got_eval = extract_code(response, mode="eval")
    assert (got_train.code, got_train.valid, got_train.reason) == train
    assert (got_eval.code, got_eval.valid, got_eval.reason) == evaluation
    # The same verdicts as the reference's own regex + ast.parse.
    assert got_train.code == ref_train(response)
    assert got_eval.code == ref_eval(response)
    if got_train.valid:
        assert got_train.language == "python"


def test_fuzz_find_blocks_equals_regex():
    """Random strings dense in backticks, newlines, CR, word and non-word characters."""
    rng = random.Random(0)
    alphabet = ["`", "`", "`", "```", "\n", "\r", "a", "_", "7", " ", "é", "٣", "+", "#", ".",
                "-", "\t", "\u00a0", "x\n", "```py\n", "````"]
    full = re.compile(r"```(\w*)\n(.*?)```", re.DOTALL)
    for _ in range(20000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        assert find_blocks(text) == full.findall(text), repr(text)
        assert extract_code(text).code == ref_train(text), repr(text)
        assert extract_code(text, mode="eval").code == ref_eval(text), repr(text)


@pytest.mark.parametrize(
    "text",
    [
        "```" * 300_000,
        "```a" * 250_000,
        "`" * 1_000_000,
        "```\n" * 250_000,
        "```" + "a" * 1_000_000,
        "```a\n" + "x" * 1_000_000,
        "````\n" * 200_000,
        ("```" + "a" * 1000 + "!") * 1000,
        "```python\n" + "(" * 1_000_000,
        "```python\n" + "(" * 1_000_000 + "\n```",
        "```java\na" + "<a" * 20_000 + "\n```",  # tree-sitter alone: 40 s (test_validity)
    ],
    ids=["fences", "fence_word", "backticks", "empty_blocks", "long_tag", "unclosed", "four",
         "tags_no_newline", "unclosed_parens", "closed_parens", "java_generics"],
)
def test_adversarial_input_is_fast(text):
    """About 1 MB of adversarial text each: a quadratic scan would take minutes."""
    t0 = time.perf_counter()
    for mode in ("train", "eval"):
        result = extract_code(text, mode=mode)
        assert isinstance(result, Extraction)
    extract_code(text, language="auto")
    assert time.perf_counter() - t0 < 5.0


def test_any_string_never_raises():
    rng = random.Random(1)
    for _ in range(300):
        raw = bytes(rng.randrange(256) for _ in range(rng.randint(0, 300)))
        text = raw.decode("utf-8", "surrogateescape")  # lone surrogates included
        text = "```python\n" + text + "\n```" if rng.random() < 0.5 else text
        for mode in ("train", "eval"):
            for language in ("python", "auto"):
                assert isinstance(extract_code(text, mode=mode, language=language), Extraction)
    assert extract_code("```python\nx = '\ud800'\n```").reason == "syntax_error"
    assert extract_code("```python\nx = 1\x00\n```").reason == "syntax_error"


AUTO = {
    "cpp": (f"```cpp\n{CPP}\n```", ("cpp", True, "ok")),
    "c++": (f"```c++\n{CPP}\n```", ("cpp", True, "ok")),
    "py": ("```py\nprint(1)\n```", ("python", True, "ok")),
    "python3": ("```python3\nprint(1)\n```", ("python", True, "ok")),
    "java": ("```java\nclass A { public static void main(String[] a) { } }\n```",
             ("java", True, "ok")),
    "js": ("```js\nconsole.log([1, 2].map(x => x * 2));\n```", ("javascript", True, "ok")),
    "golang": ("```golang\npackage main\nfunc main() {}\n```", ("go", True, "ok")),
    "rs": ("```rs\nfn main() { println!(\"hi\"); }\n```", ("rust", True, "ok")),
    "C#": ("```C#\nclass A { static void Main() {} }\n```", ("csharp", True, "ok")),
    "untagged_fallback": ("```\nprint(1)\n```", ("python", True, "ok")),
    "python_tagged_cpp": (f"```python\n{CPP}\n```", ("python", False, "syntax_error")),
    "cpp_tagged_python": ("```cpp\ndef f(x):\n    return x\n```", ("cpp", False, "syntax_error")),
    "java_broken": ("```java\nclass A { void f( { }\n```", ("java", False, "syntax_error")),
    "unknown_tag": ("```text\nhello world\n```", ("text", False, "unsupported_language")),
}


@pytest.mark.parametrize("name", sorted(AUTO))
def test_auto_language(name):
    response, (language, valid, reason) = AUTO[name]
    got = extract_code(response, language="auto")
    assert (got.language, got.valid, got.reason) == (language, valid, reason)
    assert (got.code != "") == valid  # train mode empties anything invalid
    evaluated = extract_code(response, mode="eval", language="auto")
    assert evaluated.code and evaluated.valid == valid


def test_auto_fallback_language_for_untagged_blocks():
    got = extract_code(f"```\n{CPP}\n```", language="auto", fallback_language="c++")
    assert (got.language, got.valid) == ("cpp", True)
    assert not extract_code(f"```\n{CPP}\n```", language="auto").valid  # fallback: python


def test_fixed_language_judges_every_block_in_it():
    got = extract_code(f"```python\n{CPP}\n```", language="cpp")
    assert (got.language, got.valid, got.code) == ("cpp", True, CPP)


def test_batch_and_argument_errors():
    responses = ["```python\nx = 1\n```", "nothing", "```\n```"]
    assert [e.reason for e in extract_batch(responses)] == ["ok", "no_block", "empty"]
    with pytest.raises(ValueError, match="mode"):
        extract_code("x", mode="test")
    with pytest.raises(ValueError, match="language"):
        extract_code("x", language="cobol")
    with pytest.raises(TypeError):
        extract_code(b"```python\nx=1\n```")
    # A bad fallback is an argument error whatever the content (not only for untagged blocks).
    for fallback in ("cobol", "", "auto"):
        with pytest.raises(ValueError):
            extract_code("no block at all", language="auto", fallback_language=fallback)
