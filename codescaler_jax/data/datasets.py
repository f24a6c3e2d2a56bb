"""The RM's pair datasets: train / validation / held-out pairs from a data config, cached.

``load_pair_splits`` builds the pairs a ``data`` section of the RM config names (HumanEval
verified pairs, the augmented recipe, or a pair file / dataset), gives every pair a problem id,
splits them by problem, and caches the three splits plus their statistics in the run's
``data/`` folder, keyed by the data config and the identity of the source files
(``pairs_cache_key``), so a changed ``data`` section or source file rebuilds them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import random
from pathlib import Path
from typing import Any

from codescaler_jax.config import to_dict
from codescaler_jax.data.pairs import Pair, read_pairs, split_by_problem, write_pairs_jsonl
from codescaler_jax.errors import InputError

log = logging.getLogger("codescaler_jax")


# Data keys that change only tokenization or speed, not which pairs are built and cached (the
# length debiasing and the corpus pairs of the training split are applied by the trainer after
# the cache is read).
_NOT_PAIR_KEYS = ("tokenizer", "max_length", "min_bucket", "sandbox_workers",
                  "train_length_debias", "train_length_debias_margin",
                  "corpus_functions", "corpus_mutants_per_function", "corpus_mutant_kinds")

# Keys added after caches existed whose None builds the same pairs as before: left out of the
# key when None, so that the caches built before them stay valid.
_PAIR_KEYS_OFF_WHEN_NONE = ("train_mutants_per_positive",)


def _file_identity(value: str | None) -> dict[str, Any] | None:
    """Path, size and modification time of a local data file (of each file in a dataset
    directory); None for names that are not local paths (``humaneval``, hub datasets)."""
    if not value or not Path(value).exists():
        return None
    p = Path(value).resolve()
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    return {
        "path": str(p),
        "files": [[str(f.relative_to(p) if p.is_dir() else f.name), f.stat().st_size,
                   f.stat().st_mtime_ns] for f in files],
    }


def pairs_cache_key(data: Any, seed: int) -> dict[str, Any]:
    """What the cached pairs of a run depend on: the data section (less its tokenization and
    speed keys), the seed (split and shuffles) and the identity of the source files; with its
    ``sha256``."""
    section = {k: v for k, v in to_dict(data).items() if k not in _NOT_PAIR_KEYS
               and not (k in _PAIR_KEYS_OFF_WHEN_NONE and v is None)}
    key: dict[str, Any] = {
        "data": section,
        "seed": seed,
        "sources": {
            "source": _file_identity(data.source),
            "eval_source": _file_identity(data.eval_source),
        },
    }
    key["sha256"] = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    return key


def problem_key(p: Pair) -> Pair:
    """``p`` with a problem id: its own, else a hash of the problem text."""
    if p.problem_id:
        return p
    h = hashlib.sha1(p.problem.encode("utf-8", "replace")).hexdigest()[:16]
    return dataclasses.replace(p, problem_id=h)


def load_pair_splits(
    data: Any, *, seed: int, data_dir: Path, resume: bool = False, progress: bool = False,
    write: bool = True,
) -> tuple[list[Pair], list[Pair], list[Pair], dict[str, Any]]:
    """Train, validation and held-out pairs of an RM config's ``data`` section, with their
    statistics: read from the cache in ``data_dir`` when it was built from the same data
    config and source files, else built (and, with ``write``, cached there). ``resume``: a
    cache built from other data is an error (the checkpoint's data position would not match)
    instead of a rebuild."""
    d = data
    cached = [
        data_dir / "train_pairs.jsonl",
        data_dir / "validation_pairs.jsonl",
        data_dir / "eval_pairs.jsonl",
    ]
    key = pairs_cache_key(d, seed)
    if all(p.is_file() for p in cached) and (data_dir / "stats.json").is_file():
        stats = json.loads((data_dir / "stats.json").read_text())
        if stats.get("cache_key") == key["sha256"]:
            train, val, held = (
                read_pairs(c, max_record_bytes=1 << 40)[0] if c.stat().st_size else []
                for c in cached
            )
            log.info("reusing the pairs cached in %s", data_dir)
            return train, val, held, stats
        if resume:
            raise InputError(
                f"--resume: the pairs cached in {data_dir} were built from other data "
                f"(a source file changed since the run started: {key['sources']}); the "
                "checkpoint's data position would not match. Start a new run_dir or pass "
                "--overwrite"
            )
        log.info("the pairs cached in %s were built for another data config; rebuilding",
                 data_dir)
    stats: dict[str, Any] = {"cache_key": key["sha256"], "cache_inputs": key}
    val: list[Pair] = []
    if d.source == "humaneval" and d.pairs_recipe == "augmented":
        from codescaler_jax.data.augmented import AugmentOptions, build_split_pairs
        from codescaler_jax.data.mutants import FINE_MUTANT_KINDS
        from codescaler_jax.data.problems import humaneval_problems
        from codescaler_jax.data.rewrites import TRANSFORMS

        split, stats["build"] = build_split_pairs(
            humaneval_problems()[: d.max_problems],
            held_out_fraction=d.eval_fraction,
            validation_fraction=d.validation_fraction,
            options=AugmentOptions(
                rewrites_per_problem=d.rewrites_per_problem,
                rewrite_candidates=d.rewrite_candidates,
                rewrite_transforms=tuple(d.rewrite_transforms or TRANSFORMS),
                mutants_per_positive=d.mutants_per_positive,
                train_mutants_per_positive=d.train_mutants_per_positive,
                train_mutant_kinds=tuple(d.train_mutant_kinds or FINE_MUTANT_KINDS),
                max_pairs_per_problem=d.max_pairs_per_problem,
                cross_pairs_per_problem=d.cross_pairs_per_problem,
            ),
            seed=seed,
            workers=d.sandbox_workers,
            time_limit_s=d.sandbox_time_limit_s,
            timeout_retry_factor=d.sandbox_timeout_retry_factor,
            progress=progress,
        )
        pairs, val, held = split["train"], split["validation"], split["held_out"]
    elif d.source == "humaneval":
        from codescaler_jax.data.problems import humaneval_problems
        from codescaler_jax.data.verified import verified_pairs

        problems = humaneval_problems()
        pairs, pstats = verified_pairs(
            problems,
            mutants_per_problem=d.mutants_per_problem,
            line_mutant_fraction=d.line_mutant_fraction,
            max_pairs_per_problem=d.max_pairs_per_problem,
            unaligned_fraction=d.unaligned_fraction,
            workers=d.sandbox_workers,
            time_limit_s=d.sandbox_time_limit_s,
            timeout_retry_factor=d.sandbox_timeout_retry_factor,
            seed=seed,
            progress=progress,
        )
        stats["build"] = pstats.to_dict()
        log.info(
            "verified pairs: %d problems, %d candidates, pass rate %.3f, %d pairs, skipped %s",
            pstats.problems,
            pstats.candidates,
            pstats.pass_rate,
            pstats.pairs,
            pstats.skipped,
        )
    else:
        pairs, counts = read_pairs(
            d.source, skip_bad=d.skip_bad, max_record_bytes=d.max_record_bytes
        )
        stats["read"] = counts
        log.info("read %d pairs from %s (%s)", len(pairs), d.source, counts)
    pairs = [problem_key(p) for p in pairs]
    if d.source == "humaneval" and d.pairs_recipe == "augmented":
        train = pairs
    elif d.eval_source:
        held, counts = read_pairs(
            d.eval_source, skip_bad=d.skip_bad, max_record_bytes=d.max_record_bytes
        )
        held = [problem_key(p) for p in held]
        stats["read_eval"] = counts
        train = pairs
    else:
        train, held = split_by_problem(
            pairs, eval_fraction=d.eval_fraction, seed=seed
        )
    if d.validation_fraction > 0 and not val:
        # carve validation problems from the training ones by the fixed hash rule
        from codescaler_jax.data.splits import split_problem_ids

        which = split_problem_ids(
            [p.problem_id for p in train],
            held_out_fraction=d.validation_fraction / (1.0 - d.eval_fraction),
        )
        val = [p for p in train if which[p.problem_id] == "held_out"]
        train = [p for p in train if which[p.problem_id] != "held_out"]
    if d.max_pairs is not None and len(train) > d.max_pairs:
        random.Random(seed).shuffle(train)
        train = train[: d.max_pairs]
    stats["train_pairs"] = len(train)
    stats["validation_pairs"] = len(val)
    stats["eval_pairs"] = len(held)
    stats["train_problems"] = len({p.problem_id for p in train})
    stats["validation_problems"] = len({p.problem_id for p in val})
    stats["eval_problems"] = len({p.problem_id for p in held})
    if write:
        data_dir.mkdir(parents=True, exist_ok=True)
        for part, path in zip((train, val, held), cached):
            write_pairs_jsonl(part, path)
        (data_dir / "stats.json").write_text(json.dumps(stats, indent=2))
    return train, val, held, stats
