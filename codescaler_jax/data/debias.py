"""Length-debiased training pairs: make "the longer RM input wins" a fair coin in training.

In the augmented pairs the negative's length says much about the label (cut and delete_line
negatives are always shorter than their positive, range_bound ones mostly longer; the rule
"longer input wins" scores ~0.68 with no model, notes/rm_experiments.md), and a model trained
on them learns that shortcut. `length_debias_pairs` appends a semantics-free filler (comment
lines after the code, at module level, so the program and its pass/fail are unchanged) to one
side of each training pair so that, in tokens after truncation:

- which side is longer is a fair coin drawn per pair, independent of the label;
- the filler goes on that coin's side, always (at least one word), so it lies on the positive
  and on the negative equally often and its presence is no cue of the label;
- the longer side leads by ``g`` tokens, ``g`` uniform in ``1..margin`` (or, when it was
  already longer by more, by its own lead plus the filler's few tokens); filler grows by whole
  words, so the lead can pass ``g`` by a word's tokens.

When the target cannot be reached under ``max_length`` (the other side is near the cap) the
pair is left as it is and counted.

Training pairs only (the trainer applies it after the cached splits are read); validation and
held-out pairs are never touched. Deterministic for a seed and a pair's text.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
from collections.abc import Sequence
from typing import Any

from codescaler_jax.data.pairs import Pair
from codescaler_jax.data.tokenizer import encode_rm_inputs

DEBIAS_MODES = ("none", "replace", "add")  # not "off": YAML reads that as false
# Comment words: plain English, no identifiers or keywords of the solutions.
_WORDS = ("note", "see", "the", "above", "this", "part", "end", "of", "here", "text", "comment",
          "for", "reader", "kept", "as", "is", "a", "line", "and", "so", "on")
_WORDS_PER_LINE = 6


def filler_text(words: Sequence[str]) -> str:
    """``words`` as lines of ``#`` comments (each line starts with ``\\n``)."""
    lines = [words[i : i + _WORDS_PER_LINE] for i in range(0, len(words), _WORDS_PER_LINE)]
    return "".join("\n# " + " ".join(w) for w in lines)


def with_filler(code: str, filler: str) -> str:
    """``code`` with ``filler`` (from `filler_text`) after its last line: module-level comment
    lines after a complete program, which cannot change what the program does."""
    if not filler:
        return code
    return code.rstrip("\n") + "\n" + filler.lstrip("\n") + "\n"


def _pair_rng(seed: int, p: Pair) -> random.Random:
    h = hashlib.sha256(
        f"{seed}\0{p.problem_id}\0{p.chosen}\0{p.rejected}".encode("utf-8", "replace")
    ).hexdigest()
    return random.Random(int(h[:16], 16))


def _length(tokenizer, problem: str, code: str, max_length: int) -> int:
    return len(encode_rm_inputs(tokenizer, [problem], [code], max_length)[0])


def _grow(tokenizer, problem: str, code: str, target: int, max_length: int,
          rng: random.Random) -> str | None:
    """``code`` with the shortest filler (at least one word) that makes its RM input at least
    ``target`` tokens after truncation at ``max_length``; None when that is out of reach."""
    base = _length(tokenizer, problem, code, max_length)
    target = max(target, base + 1)
    if target > max_length:
        return None
    words = [rng.choice(_WORDS) for _ in range(2 * (target - base) + 4)]

    def length(k: int) -> int:
        return _length(tokenizer, problem, with_filler(code, filler_text(words[:k])), max_length)

    lo, hi = 1, len(words)  # the length grows with the word count: binary search
    if length(hi) < target:
        return None
    while lo < hi:
        mid = (lo + hi) // 2
        if length(mid) >= target:
            hi = mid
        else:
            lo = mid + 1
    return with_filler(code, filler_text(words[:lo]))


def length_debias_pairs(
    pairs: Sequence[Pair],
    tokenizer,
    max_length: int,
    *,
    seed: int = 0,
    mode: str = "replace",
    margin: int = 16,
) -> tuple[list[Pair], dict[str, Any]]:
    """Training pairs with the filler of the module docstring. ``mode``: ``replace`` (each
    pair by its debiased copy), ``add`` (each pair and, after all of them, its debiased copy;
    a copy equal to its pair is not added), ``none`` (unchanged). Returns the pairs and
    statistics (P(chosen longer) before / after, filler counts, pairs out of reach)."""
    if mode not in DEBIAS_MODES:
        raise ValueError(f"length debias mode must be one of {DEBIAS_MODES}, got {mode!r}")
    if margin < 1:
        raise ValueError(f"length debias margin must be >= 1, got {margin}")
    pairs = list(pairs)
    if mode == "none":
        return pairs, {"mode": "none"}
    out: list[Pair] = []
    n_c = n_r = unreachable = 0
    before, after = [], []
    for p in pairs:
        rng = _pair_rng(seed, p)
        chosen_longer = rng.random() < 0.5
        g = rng.randint(1, margin)
        lc = _length(tokenizer, p.problem, p.chosen, max_length)
        lr = _length(tokenizer, p.problem, p.rejected, max_length)
        before.append(1.0 if lc > lr else 0.5 if lc == lr else 0.0)
        q = p
        if chosen_longer:
            grown = _grow(tokenizer, p.problem, p.chosen, lr + g, max_length, rng)
            if grown is not None:
                q, n_c = dataclasses.replace(p, chosen=grown), n_c + 1
        else:
            grown = _grow(tokenizer, p.problem, p.rejected, lc + g, max_length, rng)
            if grown is not None:
                q, n_r = dataclasses.replace(p, rejected=grown), n_r + 1
        if grown is None:
            unreachable += 1
        # only a side that grew needs counting again
        lc2 = lc if q.chosen is p.chosen else _length(tokenizer, q.problem, q.chosen, max_length)
        lr2 = lr if q.rejected is p.rejected else _length(tokenizer, q.problem, q.rejected,
                                                          max_length)
        after.append(1.0 if lc2 > lr2 else 0.5 if lc2 == lr2 else 0.0)
        out.append(q)
    stats = {
        "mode": mode,
        "margin": margin,
        "pairs": len(pairs),
        "chosen_longer_before": sum(before) / max(len(before), 1),
        "chosen_longer_after": sum(after) / max(len(after), 1),
        "filler_on_chosen": n_c,
        "filler_on_rejected": n_r,
        "out_of_reach": unreachable,
    }
    if mode == "add":
        extra = [q for p, q in zip(pairs, out) if q is not p]
        stats["added"] = len(extra)
        return pairs + extra, stats
    return out, stats
