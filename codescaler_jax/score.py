"""Score model responses with a CodeScaler RM: JSONL in, JSONL out.

    python -m codescaler_jax.score --rm runs/rm_tiny --input responses.jsonl --output scored.jsonl

Each input line is ``{"problem": ..., "response": ...}`` (``prompt`` / ``question_content``
are accepted for the problem). Each output line is the input record plus ``code`` (the
extracted code, "" for no code), ``valid``, ``language``, ``reason``, ``score`` (the raw RM
score of (problem, code), as the reference scores "" for no code) and ``reward`` (the shaped
reward: softplus(score) for valid code, 0 otherwise, by default). ``--rm`` is a Hugging Face
RM directory or a ``train_rm`` run directory.

A line longer than ``--max-record-bytes`` (1 MiB) is a bad record, named by file and line: an
error, or skipped and counted with ``--skip-bad``; only that many bytes of it are ever read into
memory. Each RM input is cut to a character budget (``max_length`` times the longest token of
the vocabulary) before it is tokenised, so a long record costs no more than ``max_length``
tokens' worth of text.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from codescaler_jax.cli import guarded, positive_int, shaping_choices
from codescaler_jax.code.validity import SUPPORTED_LANGUAGES
from codescaler_jax.data.jsonl import DEFAULT_MAX_RECORD_BYTES, RecordError, iter_jsonl
from codescaler_jax.errors import InputError
from codescaler_jax.fsutil import atomic_output

PROBLEM_KEYS = ("problem", "prompt", "question_content")


class BadInput(InputError):
    """A bad input record; the message names the file and line."""


def _records(
    path: Path, skip_bad: bool, counts: dict[str, int], max_record_bytes: int
) -> Iterator[dict[str, Any]]:
    for where, rec in iter_jsonl(path, max_record_bytes=max_record_bytes):
        try:
            if isinstance(rec, RecordError):
                raise BadInput(str(rec))
            if not isinstance(rec, dict):
                raise BadInput(f"{where}: expected a JSON object")
            key = next((k for k in PROBLEM_KEYS if k in rec), None)
            if key is None:
                raise BadInput(f"{where}: missing field 'problem'")
            for k in (key, "response"):
                if k not in rec:
                    raise BadInput(f"{where}: missing field {k!r}")
                if not isinstance(rec[k], str):
                    raise BadInput(
                        f"{where}: field {k!r} must be a string, got {type(rec[k]).__name__}"
                    )
            rec["_problem"] = rec[key]
        except BadInput as e:
            if not skip_bad:
                raise
            counts["skipped"] += 1
            if counts["skipped"] <= 5:
                print(f"skipped {e}", file=sys.stderr)
            continue
        yield rec


@guarded
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m codescaler_jax.score",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--rm", required=True, help="HF RM directory or train_rm run directory")
    p.add_argument("--input", required=True, type=Path)
    p.add_argument("--output", required=True, type=Path)
    p.add_argument("--tokenizer", default=None, help="RM tokenizer dir (default: the RM's own)")
    p.add_argument(
        "--mode",
        choices=("train", "eval"),
        default="train",
        help="extraction mode (train: exactly one valid block; eval: last block)",
    )
    p.add_argument("--language", default="python", choices=("auto",) + SUPPORTED_LANGUAGES,
                   help="python (the reference), auto (from the fence tag) or a language")
    p.add_argument("--shaping", default="softplus", choices=shaping_choices(),
                   help="reward shaping mode (softplus: the reference)")
    p.add_argument("--max-length", type=positive_int, default=4096)
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--chunk", type=positive_int, default=1024, help="records scored per chunk")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None)
    p.add_argument("--skip-bad", action="store_true", help="skip and count bad records")
    p.add_argument("--max-record-bytes", type=positive_int, default=DEFAULT_MAX_RECORD_BYTES,
                   help="longest input line accepted (default 1 MiB); longer ones are bad "
                   "records (an error, or skipped with --skip-bad)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    # Checked before the model loads: a wrong path fails in a second, not after the load.
    if not args.input.is_file():
        raise InputError(f"--input {args.input}: no such file")

    import numpy as np
    from tqdm.auto import tqdm

    from codescaler_jax.code.extract import extract_code
    from codescaler_jax.rm.scorer import RewardScorer
    from codescaler_jax.rm.shaping import shape_rewards_jit

    scorer = RewardScorer.from_pretrained(
        args.rm,
        tokenizer=args.tokenizer,
        dtype=args.dtype,
        max_length=args.max_length,
        batch_size=args.batch_size,
    )
    counts = {"scored": 0, "skipped": 0, "valid": 0}
    bar = tqdm(desc="score", unit="resp", disable=args.no_progress)

    def flush(chunk: list[dict[str, Any]], out) -> None:
        ex = [extract_code(r["response"], mode=args.mode, language=args.language) for r in chunk]
        scores = scorer.score([r["_problem"] for r in chunk], [e.code for e in ex])
        valid = np.array([e.valid for e in ex])
        rewards = np.asarray(shape_rewards_jit(scores, valid, mode=args.shaping))
        for r, e, s, w in zip(chunk, ex, scores, rewards):
            r.pop("_problem")
            r.update(
                code=e.code,
                valid=e.valid,
                language=e.language,
                reason=e.reason,
                score=float(s),
                reward=float(w),
            )
            out.write(json.dumps(r, ensure_ascii=False) + "\n")
        counts["scored"] += len(chunk)
        counts["valid"] += int(valid.sum())
        bar.update(len(chunk))

    # Written to a temporary file next to the output and moved into place at the end: on any
    # failure nothing is left behind and an existing output is kept as it was.
    try:
        with atomic_output(args.output) as out:
            chunk: list[dict[str, Any]] = []
            for rec in _records(args.input, args.skip_bad, counts, args.max_record_bytes):
                chunk.append(rec)
                if len(chunk) >= args.chunk:
                    flush(chunk, out)
                    chunk = []
            if chunk:
                flush(chunk, out)
    except BadInput as e:
        print(f"error: {e} (use --skip-bad to skip bad records); nothing written to "
              f"{args.output}", file=sys.stderr)
        return 2
    finally:
        bar.close()
    print(json.dumps(counts), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
