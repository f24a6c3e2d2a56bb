"""RM-Bench accuracies and plain pairwise accuracy of a reward model.

``python -m codescaler_jax.eval.rm_bench --rm DIR --data total_dataset.json`` scores an
RM-Bench file; ``--pairs FILE`` scores any pair file in CodeScaler's schema
(``question_content``, ``code_pos``, ``code_neg``). Output: a table on stdout and JSON.

RM-Bench (THU-KEG/RM-Bench, ``scripts/utils.py::compute_accuracy``), as this module computes it:

- an item has a ``prompt``, three ``chosen`` and three ``rejected`` responses in the style order
  (concise, detailed plain text, detailed markdown), and a ``domain``;
- per domain, ``M[i][j]`` = fraction of items whose chosen response of style ``i`` scores
  *strictly* higher than the rejected response of style ``j`` (a tie counts as wrong); rows are
  chosen styles, columns rejected styles;
- ``hard`` = mean of the upper-right triangle (``i < j``: a plainer chosen response against a
  fancier rejected one), ``normal`` = mean of the diagonal, ``easy`` = mean of the lower-left
  triangle; a domain's accuracy is the mean of its hard / normal / easy;
- domains are ``chat``, ``math``, ``code``, ``safety`` (``safety-refuse`` and
  ``safety-response`` are both ``safety``: the reference groups by prefix); the overall hard /
  normal / easy are means over domains, and ``avg`` is the mean of the domain accuracies (the
  "Avg" column of the CodeScaler model cards).

Two choices where the reference has no answer: a domain with no items is left out of the means
(the reference would fail on it), and items of any other domain are reported under
``other_domains`` without entering the totals. Without a ``domain`` field every item is in one
group, ``all``.

RM input for RM-Bench: user = the prompt, assistant = the whole response text (no code
extraction: RM-Bench responses are prose, and the reference scores them as they are).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from codescaler_jax.cli import guarded, positive_int
from codescaler_jax.errors import InputError

NUM_STYLES = 3
STYLES = ("concise", "detailed_plain", "detailed_markdown")
DOMAINS = ("chat", "math", "code", "safety")


@dataclass(frozen=True)
class RMBenchItem:
    """One RM-Bench item: a prompt, 3 chosen and 3 rejected responses (style order), a domain.

    ``score_chosen``/``score_rejected`` hold precomputed scores when the file carries them (the
    reference writes its results in this same format).
    """

    item_id: str
    prompt: str
    chosen: tuple[str, ...]
    rejected: tuple[str, ...]
    domain: str = ""
    score_chosen: tuple[float, ...] | None = None
    score_rejected: tuple[float, ...] | None = None


class RMBenchFormatError(InputError):
    """An RM-Bench record is malformed; the message names the file, item and field."""


def _response_list(rec: dict[str, Any], key: str, where: str) -> tuple[str, ...]:
    v = rec.get(key)
    if not isinstance(v, list) or len(v) != NUM_STYLES or not all(isinstance(s, str) for s in v):
        raise RMBenchFormatError(
            f"{where}: field {key!r} must be a list of {NUM_STYLES} strings "
            f"(styles {', '.join(STYLES)})"
        )
    return tuple(v)


def _score_list(rec: dict[str, Any], key: str, where: str) -> tuple[float, ...] | None:
    v = rec.get(key)
    if v is None:
        return None
    if not isinstance(v, list) or len(v) != NUM_STYLES:
        raise RMBenchFormatError(f"{where}: field {key!r} must be a list of {NUM_STYLES} numbers")
    out = []
    for x in v:
        # The reference's result files may hold [[s]] per response (a pipeline artefact).
        if isinstance(x, list) and len(x) == 1:
            x = x[0]
        if isinstance(x, bool) or not isinstance(x, (int, float)):
            raise RMBenchFormatError(f"{where}: field {key!r} must hold numbers, got {x!r}")
        out.append(float(x))
    return tuple(out)


def parse_rm_bench_records(records: Sequence[Any], source: str = "<records>") -> list[RMBenchItem]:
    """Validate RM-Bench records (dicts) into items; errors name the item and field."""
    items = []
    for i, rec in enumerate(records):
        where = f"{source} item {i}"
        if not isinstance(rec, dict):
            raise RMBenchFormatError(f"{where}: expected a JSON object")
        prompt = rec.get("prompt")
        if not isinstance(prompt, str):
            raise RMBenchFormatError(f"{where}: field 'prompt' must be a string")
        domain = rec.get("domain", "")
        if not isinstance(domain, str):
            raise RMBenchFormatError(f"{where}: field 'domain' must be a string")
        items.append(
            RMBenchItem(
                item_id=str(rec.get("id", i)),
                prompt=prompt,
                chosen=_response_list(rec, "chosen", where),
                rejected=_response_list(rec, "rejected", where),
                domain=domain,
                score_chosen=_score_list(rec, "score_chosen", where),
                score_rejected=_score_list(rec, "score_rejected", where),
            )
        )
    return items


def read_rm_bench(path: str | Path) -> list[RMBenchItem]:
    """Items of an RM-Bench file: a JSON list (``total_dataset.json``) or JSONL."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise RMBenchFormatError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from e
    else:
        records = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise RMBenchFormatError(f"{path}:{lineno}: not valid JSON ({e.msg})") from e
    return parse_rm_bench_records(records, str(path))


# ---- metrics (host arrays in, host arrays / floats out) -------------------------------------


def accuracy_matrix(score_chosen: np.ndarray, score_rejected: np.ndarray) -> np.ndarray:
    """``M [3, 3]``: ``M[i, j]`` = mean over items of ``chosen[:, i] > rejected[:, j]``.

    Args:
        score_chosen: ``[items, 3]`` scores of the chosen responses (style order).
        score_rejected: ``[items, 3]`` scores of the rejected responses.
    """
    c = np.asarray(score_chosen, np.float64)
    r = np.asarray(score_rejected, np.float64)
    if c.ndim != 2 or c.shape != r.shape or c.shape[0] == 0:
        raise ValueError(
            f"need two equal non-empty [items, styles] arrays, got {c.shape} {r.shape}"
        )
    return (c[:, :, None] > r[:, None, :]).mean(axis=0)


def hard_normal_easy(matrix: np.ndarray) -> dict[str, float]:
    """RM-Bench's difficulty levels of an accuracy matrix ``[S, S]`` (rows chosen, cols rejected).

    hard: mean of the strict upper-right triangle; normal: mean of the diagonal; easy: mean of
    the strict lower-left triangle.
    """
    m = np.asarray(matrix, np.float64)
    s = m.shape[0]
    n_off = s * (s - 1) / 2
    return {
        "hard": float(np.triu(m, 1).sum() / n_off),
        "normal": float(np.diag(m).mean()),
        "easy": float(np.tril(m, -1).sum() / n_off),
    }


def domain_of(domain: str) -> str | None:
    """RM-Bench's domain group of an item's domain (prefix match), or None if none fits."""
    for d in DOMAINS:
        if domain.startswith(d):
            return d
    return None


def _group_metrics(c: np.ndarray, r: np.ndarray) -> dict[str, Any]:
    m = accuracy_matrix(c, r)
    levels = hard_normal_easy(m)
    return {
        "n": int(c.shape[0]),
        "matrix": m.tolist(),
        **levels,
        "accuracy": float(np.mean(list(levels.values()))),
    }


def rm_bench_metrics(
    score_chosen: np.ndarray, score_rejected: np.ndarray, domains: Sequence[str]
) -> dict[str, Any]:
    """All RM-Bench numbers from scores ``[items, 3]`` x 2 and each item's domain string.

    Returns ``{"domains": {d: {n, matrix, hard, normal, easy, accuracy}}, "hard", "normal",
    "easy", "avg", "n_items", "other_domains": {...}}``; levels are fractions in [0, 1].
    """
    c = np.asarray(score_chosen, np.float64)
    r = np.asarray(score_rejected, np.float64)
    if len(domains) != c.shape[0]:
        raise ValueError(f"{len(domains)} domains for {c.shape[0]} items")
    has_domains = any(domains)
    groups: dict[str, list[int]] = {}
    other: dict[str, list[int]] = {}
    for i, d in enumerate(domains):
        if not has_domains:
            groups.setdefault("all", []).append(i)
            continue
        g = domain_of(d)
        (groups.setdefault(g, []) if g else other.setdefault(d or "<none>", [])).append(i)
    per = {g: _group_metrics(c[idx], r[idx]) for g, idx in groups.items()}
    # Fixed order: the reference's domain order, then anything else.
    per = {g: per[g] for g in sorted(per, key=lambda g: (DOMAINS + ("all",)).index(g))}
    out: dict[str, Any] = {"n_items": int(c.shape[0]), "domains": per}
    for level in ("hard", "normal", "easy"):
        out[level] = float(np.mean([v[level] for v in per.values()])) if per else float("nan")
    out["avg"] = float(np.mean([v["accuracy"] for v in per.values()])) if per else float("nan")
    out["other_domains"] = {d: _group_metrics(c[idx], r[idx]) for d, idx in other.items()}
    return out


def pairwise_accuracy(score_pos: np.ndarray, score_neg: np.ndarray) -> dict[str, float]:
    """Accuracy of pairs ``[N]`` x 2: fraction with ``pos > neg`` strictly; ties are counted."""
    p = np.asarray(score_pos, np.float64)
    n = np.asarray(score_neg, np.float64)
    if p.shape != n.shape or p.ndim != 1:
        raise ValueError(f"need two equal [N] arrays, got {p.shape} {n.shape}")
    if p.size == 0:
        return {"n": 0, "accuracy": float("nan"), "ties": 0, "mean_margin": float("nan")}
    return {
        "n": int(p.size),
        "accuracy": float((p > n).mean()),
        "ties": int((p == n).sum()),
        "mean_margin": float((p - n).mean()),
    }


# ---- scoring ---------------------------------------------------------------------------------


def score_rm_bench(scorer, items: Sequence[RMBenchItem]) -> tuple[np.ndarray, np.ndarray]:
    """Score every response of every item in one batched scorer call.

    Returns ``(score_chosen [items, 3], score_rejected [items, 3])`` float32.
    """
    prompts, responses = [], []
    for it in items:
        for resp in (*it.chosen, *it.rejected):
            prompts.append(it.prompt)
            responses.append(resp)
    s = np.asarray(scorer.score(prompts, responses), np.float32).reshape(len(items), 2, NUM_STYLES)
    return s[:, 0], s[:, 1]


def score_pairs(scorer, pairs) -> tuple[np.ndarray, np.ndarray]:
    """Scores ``([N], [N])`` of the chosen and rejected code of each ``Pair``."""
    problems = [p.problem for p in pairs] * 2
    codes = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    s = np.asarray(scorer.score(problems, codes), np.float32)
    return s[: len(pairs)], s[len(pairs) :]


# ---- presentation ----------------------------------------------------------------------------


def format_rm_bench_table(result: dict[str, Any]) -> str:
    """Percent table: one row per domain (accuracy, hard, normal, easy) and the total."""
    lines = [f"{'domain':<10} {'n':>6} {'acc':>6} {'hard':>6} {'normal':>6} {'easy':>6}"]
    for d, v in result["domains"].items():
        lines.append(
            f"{d:<10} {v['n']:>6} {100 * v['accuracy']:>6.1f} {100 * v['hard']:>6.1f} "
            f"{100 * v['normal']:>6.1f} {100 * v['easy']:>6.1f}"
        )
    lines.append(
        f"{'avg':<10} {result['n_items']:>6} {100 * result['avg']:>6.1f} "
        f"{100 * result['hard']:>6.1f} {100 * result['normal']:>6.1f} {100 * result['easy']:>6.1f}"
    )
    for d, v in result.get("other_domains", {}).items():
        lines.append(f"(not in totals) {d}: n={v['n']} acc={100 * v['accuracy']:.1f}")
    return "\n".join(lines)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m codescaler_jax.eval.rm_bench",
        description="RM-Bench accuracies (3x3 matrix, hard/normal/easy, per domain) and "
        "pairwise accuracy of a reward model.",
    )
    p.add_argument("--rm", help="Hugging Face RM directory or train_rm run directory")
    p.add_argument("--data", help="RM-Bench file (JSON list or JSONL)")
    p.add_argument("--pairs", help="pair file in CodeScaler's schema (pairwise accuracy)")
    p.add_argument(
        "--from-scores",
        action="store_true",
        help="use the score_chosen/score_rejected stored in --data instead of running an RM",
    )
    p.add_argument("--max-length", type=positive_int, default=4096, help="RM input truncation")
    p.add_argument("--batch-size", type=positive_int, default=16, help="rows per RM forward pass")
    p.add_argument("--tokenizer", default=None, help="tokenizer dir (default: the RM's own)")
    p.add_argument("--out", default="rm_bench.json", help="JSON output path")
    args = p.parse_args(argv)
    if not args.data and not args.pairs:
        p.error("give --data (RM-Bench) and/or --pairs")
    if not args.from_scores and not args.rm:
        p.error("--rm is required unless --from-scores")
    if args.from_scores and args.pairs:
        p.error("--from-scores applies to --data only")
    return args


@guarded
def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    scorer = None
    if args.rm:
        from codescaler_jax.rm.scorer import RewardScorer

        scorer = RewardScorer.from_pretrained(
            args.rm, tokenizer=args.tokenizer, max_length=args.max_length,
            batch_size=args.batch_size,
        )
    result: dict[str, Any] = {}
    if args.data:
        items = read_rm_bench(args.data)
        if args.from_scores:
            missing = [
                it.item_id for it in items if it.score_chosen is None or it.score_rejected is None
            ]
            if missing:
                raise InputError(f"--from-scores: items without scores: {missing[:5]}")
            sc = np.array([it.score_chosen for it in items])
            sr = np.array([it.score_rejected for it in items])
        else:
            sc, sr = score_rm_bench(scorer, items)
        result["rm_bench"] = rm_bench_metrics(sc, sr, [it.domain for it in items])
        result["rm_bench"]["scores"] = [
            {"id": it.item_id, "score_chosen": c.tolist(), "score_rejected": r.tolist()}
            for it, c, r in zip(items, sc, sr)
        ]
        print(format_rm_bench_table(result["rm_bench"]))
    if args.pairs:
        from codescaler_jax.data.pairs import read_pairs

        pairs, counts = read_pairs(args.pairs)
        sp, sn = score_pairs(scorer, pairs)
        result["pairwise"] = {**pairwise_accuracy(sp, sn), "read": counts}
        pw = result["pairwise"]
        print(f"pairwise: n={pw['n']} accuracy={100 * pw['accuracy']:.1f}% ties={pw['ties']}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
