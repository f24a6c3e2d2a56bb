"""Preference pairs: built from sandbox-verified candidates, or read in CodeScaler's schema.

A pair is ``(problem, chosen code, rejected code)``. Built pairs come from candidates of the
same problem (passing x failing), capped per problem, identical code removed, seeded; an
optional fraction of "unaligned" pairs takes the rejected code from another problem (off by
default; the reference's RM path hints at 30% of such samples). Released data uses the fields
``question_content``, ``code_pos``, ``code_neg`` (LARK-Lab/CodeScalerPair-51K).
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from codescaler_jax.data.jsonl import RecordError, iter_jsonl
from codescaler_jax.errors import InputError

PAIR_FIELDS = ("question_content", "code_pos", "code_neg")
DEFAULT_MAX_RECORD_BYTES = 1 << 20


@dataclasses.dataclass(frozen=True)
class Pair:
    """One preference pair. ``problem_id`` groups pairs of one problem (splits, statistics)."""

    problem: str
    chosen: str
    rejected: str
    problem_id: str = ""
    unaligned: bool = False
    kind: str = ""  # how the rejected code was made, when known (e.g. a mutant kind)
    chosen_kind: str = ""  # how the chosen code was made, when known (canonical / rewrite)

    def to_record(self) -> dict[str, Any]:
        return {
            "question_content": self.problem,
            "code_pos": self.chosen,
            "code_neg": self.rejected,
            "problem_id": self.problem_id,
            "unaligned": self.unaligned,
            "kind": self.kind,
            "chosen_kind": self.chosen_kind,
        }


@dataclasses.dataclass(frozen=True)
class Candidate:
    """A candidate solution of a problem and its verdict from the sandbox."""

    problem_id: str
    problem: str
    code: str
    passed: bool
    kind: str = ""


class BadRecordError(InputError):
    """A data record is malformed; the message names the file and line (or row) and the field."""


@dataclasses.dataclass
class PairStats:
    problems: int = 0
    problems_with_pairs: int = 0
    candidates: int = 0
    passing: int = 0
    failing: int = 0
    pairs: int = 0
    unaligned_pairs: int = 0
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)

    def skip(self, why: str, n: int = 1) -> None:
        self.skipped[why] = self.skipped.get(why, 0) + n

    @property
    def pass_rate(self) -> float:
        return self.passing / max(self.candidates, 1)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["pass_rate"] = self.pass_rate
        return d


def build_pairs(
    candidates: Iterable[Candidate],
    *,
    max_pairs_per_problem: int = 16,
    unaligned_fraction: float = 0.0,
    seed: int = 0,
) -> tuple[list[Pair], PairStats]:
    """Pairs within each problem: every passing x failing combination, deduplicated, capped.

    Candidates with identical code (after stripping) are kept once; a code that is both
    passing and failing (flaky) is dropped. ``unaligned_fraction`` of extra pairs per problem
    (relative to its aligned pairs) take a *passing* solution of this problem as chosen and a
    solution of another problem as rejected.
    """
    if not 0.0 <= unaligned_fraction <= 1.0:
        raise ValueError(f"unaligned_fraction must be in [0, 1], got {unaligned_fraction}")
    rng = random.Random(seed)
    stats = PairStats()
    by_problem: dict[str, tuple[str, dict[str, bool]]] = {}
    kinds: dict[tuple[str, str], str] = {}
    for c in candidates:
        stats.candidates += 1
        stats.passing += int(c.passed)
        stats.failing += int(not c.passed)
        code = c.code.strip()
        if not code:
            stats.skip("empty_code")
            continue
        text, verdicts = by_problem.setdefault(c.problem_id, (c.problem, {}))
        kinds.setdefault((c.problem_id, code), c.kind)
        if code in verdicts:
            if verdicts[code] != c.passed:
                verdicts[code] = None  # type: ignore[assignment]  # flaky: both verdicts
            else:
                stats.skip("duplicate_code")
            continue
        verdicts[code] = c.passed
    stats.problems = len(by_problem)

    pairs: list[Pair] = []
    all_codes = [(pid, code) for pid, (_, v) in by_problem.items() for code in v]
    for pid in sorted(by_problem):
        text, verdicts = by_problem[pid]
        flaky = [k for k, v in verdicts.items() if v is None]
        if flaky:
            stats.skip("flaky_code", len(flaky))
        pos = sorted(k for k, v in verdicts.items() if v is True)
        neg = sorted(k for k, v in verdicts.items() if v is False)
        if not pos or not neg:
            stats.skip("no_passing" if not pos else "no_failing")
            continue
        combos = [(p, n) for p in pos for n in neg]
        rng.shuffle(combos)
        if len(combos) > max_pairs_per_problem:
            stats.skip("over_cap", len(combos) - max_pairs_per_problem)
            combos = combos[:max_pairs_per_problem]
        pairs.extend(Pair(text, p, n, pid, kind=kinds[(pid, n)]) for p, n in combos)
        stats.problems_with_pairs += 1
        n_unaligned = round(unaligned_fraction * len(combos))
        others = [code for opid, code in all_codes if opid != pid]
        for _ in range(n_unaligned if others else 0):
            pairs.append(
                Pair(
                    text, rng.choice(pos), rng.choice(others), pid, unaligned=True, kind="unaligned"
                )
            )
            stats.unaligned_pairs += 1
    stats.pairs = len(pairs)
    return pairs, stats


def split_by_problem(
    pairs: Sequence[Pair], *, eval_fraction: float, seed: int = 0
) -> tuple[list[Pair], list[Pair]]:
    """Split so that no problem has pairs on both sides (held-out problems are never trained on)."""
    ids = sorted({p.problem_id for p in pairs})
    rng = random.Random(seed)
    rng.shuffle(ids)
    n_eval = int(round(eval_fraction * len(ids)))
    if eval_fraction > 0 and n_eval == 0 and len(ids) > 1:
        n_eval = 1
    held = set(ids[:n_eval])
    train = [p for p in pairs if p.problem_id not in held]
    evals = [p for p in pairs if p.problem_id in held]
    return train, evals


# ----------------------------------------------------------------------------- reading


def _check_record(rec: Any, where: str, max_bytes: int, size: int) -> Pair:
    if size > max_bytes:
        raise BadRecordError(
            f"{where}: record of {size} bytes exceeds max_record_bytes={max_bytes}"
        )
    if not isinstance(rec, dict):
        raise BadRecordError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    for f in PAIR_FIELDS:
        if f not in rec:
            raise BadRecordError(f"{where}: missing field {f!r}")
        if not isinstance(rec[f], str):
            raise BadRecordError(
                f"{where}: field {f!r} must be a string, got {type(rec[f]).__name__}"
            )
    for f in ("code_pos", "code_neg"):
        if not rec[f].strip():
            raise BadRecordError(f"{where}: field {f!r} is empty")
    pid = rec.get("problem_id", rec.get("question_id", ""))
    kind = rec.get("kind", "")
    chosen_kind = rec.get("chosen_kind", "")
    return Pair(
        rec["question_content"],
        rec["code_pos"],
        rec["code_neg"],
        str(pid or ""),
        unaligned=bool(rec.get("unaligned", False)),
        kind=kind if isinstance(kind, str) else "",
        chosen_kind=chosen_kind if isinstance(chosen_kind, str) else "",
    )


def _iter_jsonl(path: Path, max_record_bytes: int) -> Iterator[tuple[str, Any, int]]:
    # The size limit is enforced while reading: an oversized line is never held in memory.
    for where, rec in iter_jsonl(
        path, max_record_bytes=max_record_bytes, limit_name="max_record_bytes"
    ):
        yield where, (BadRecordError(str(rec)) if isinstance(rec, RecordError) else rec), 0


def _iter_rows(rows: Iterable[dict[str, Any]], name: str) -> Iterator[tuple[str, Any, int]]:
    for i, row in enumerate(rows):
        size = sum(len(v.encode("utf-8", "replace")) for v in row.values() if isinstance(v, str))
        yield f"{name} row {i}", row, size


def read_pairs(
    source: str | Path,
    *,
    skip_bad: bool = False,
    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
    split: str = "train",
) -> tuple[list[Pair], dict[str, int]]:
    """Read pairs in the released schema from a .jsonl/.json(l) file, a .parquet file, or a
    ``datasets`` name / local dataset directory. Returns ``(pairs, counts)`` where counts has
    ``read`` and ``skipped`` (and ``skipped:<reason>``).

    Without ``skip_bad`` the first bad record raises ``BadRecordError`` naming its file and
    line (or row) and the field; with it, bad records are skipped and counted.
    """
    path = Path(source)
    if path.suffix in (".jsonl", ".json") and path.is_file():
        records: Iterable[tuple[str, Any, int]] = _iter_jsonl(path, max_record_bytes)
    elif path.suffix == ".parquet" and path.is_file():
        import pyarrow.parquet as pq

        records = _iter_rows(pq.read_table(path).to_pylist(), str(path))
    else:
        import datasets

        try:
            ds = (
                datasets.load_from_disk(str(path))
                if path.is_dir()
                else datasets.load_dataset(str(source), split=split)
            )
        except Exception as e:  # noqa: BLE001 - re-raised with the source named
            raise FileNotFoundError(f"cannot read pairs from {source!r}: {e}") from e
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[split]
        records = _iter_rows(ds, str(source))

    pairs: list[Pair] = []
    counts = {"read": 0, "skipped": 0}
    for where, rec, size in records:
        try:
            if isinstance(rec, BadRecordError):
                raise rec
            pairs.append(_check_record(rec, where, max_record_bytes, size))
            counts["read"] += 1
        except BadRecordError as e:
            if not skip_bad:
                raise
            counts["skipped"] += 1
            reason = str(e).split(": ", 1)[1].split(" (")[0]
            key = "skipped:" + reason.split(",")[0][:60]
            counts[key] = counts.get(key, 0) + 1
    return pairs, counts


def write_pairs_jsonl(pairs: Iterable[Pair], path: str | Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for p in pairs:
            f.write(json.dumps(p.to_record(), ensure_ascii=False) + "\n")
