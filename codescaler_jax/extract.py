"""Extract code from model responses in a JSONL file, optionally run it against tests.

    python -m codescaler_jax.extract --input in.jsonl --output out.jsonl \\
        [--mode train|eval] [--language python|auto|<lang>] [--run-tests] [--workers N]

Each input line is a JSON object with ``problem`` (str), ``response`` (str) and optionally
``tests`` (any form `codescaler_jax.code.sandbox.tests_from_record` parses). Each output line is
the input object plus ``line`` (1-based input line), ``code``, ``valid``, ``language``,
``reason`` and, with ``--run-tests`` and tests present, ``execution``: ``{passed, status,
wall_s, tests: [{status, wall_s, message}]}`` (status ``no_code`` when nothing was extracted).

All input is checked before any work starts: a bad line (longer than ``--max-record-bytes``,
1 MiB by default; invalid JSON; not an object; a missing field, a field of the wrong type,
unparseable tests) stops the run with an error naming the file and line, unless ``--skip-bad``
skips and counts such lines. The output is written to a
temporary file and moved into place at the end, so an existing output is never half-replaced.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from dataclasses import asdict
from typing import Any

from codescaler_jax.cli import guarded, positive_float, positive_int
from codescaler_jax.code import validity
from codescaler_jax.code.extract import MODES, extract_code
from codescaler_jax.code.sandbox import Sandbox, SandboxConfig, Tests, tests_from_record
from codescaler_jax.data.jsonl import DEFAULT_MAX_RECORD_BYTES, RecordError, iter_jsonl
from codescaler_jax.errors import InputError
from codescaler_jax.fsutil import atomic_output

EXIT_BAD_INPUT = 2


class BadInput(InputError):
    """A problem with the input, already phrased for the user (file and line included)."""


def _record_problem(obj: Any, run_tests: bool) -> str | None:
    if not isinstance(obj, dict):
        return f"record must be a JSON object, got {type(obj).__name__}"
    for name in ("problem", "response"):
        if name not in obj:
            return f"missing field {name!r}"
        if not isinstance(obj[name], str):
            return f"field {name!r} must be a string, got {type(obj[name]).__name__}"
    if run_tests and obj.get("tests") is not None:
        try:
            tests_from_record(obj["tests"])
        except ValueError as e:
            return f"field 'tests': {e}"
    return None


def read_records(
    path: str, *, run_tests: bool, skip_bad: bool, max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES
) -> tuple[list, list[str]]:
    """All good records as ``(line_number, record)`` and the messages of skipped bad lines."""
    good, bad = [], []
    try:
        records = list(_numbered(path, max_record_bytes))
    except OSError as e:
        raise BadInput(f"cannot read {path}: {e.strerror}") from None
    for line_no, where, obj in records:
        problem = str(obj).split(": ", 1)[1] if isinstance(obj, RecordError) else None
        if problem is None:
            problem = _record_problem(obj, run_tests)
        if problem is None:
            good.append((line_no, obj))
            continue
        message = f"{where}: {problem}"
        if not skip_bad:
            raise BadInput(message)
        bad.append(message)
    return good, bad


def _numbered(path: str, max_record_bytes: int):
    for where, obj in iter_jsonl(path, max_record_bytes=max_record_bytes):
        yield int(where.rsplit(":", 1)[1]), where, obj


def _execution(result) -> dict[str, Any]:
    return {
        "passed": result.passed,
        "status": result.status,
        "wall_s": round(result.wall_s, 6),
        "tests": [asdict(t) for t in result.tests],
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Do the work; returns a summary. Raises BadInput for bad input."""
    from tqdm import tqdm

    records, skipped = read_records(args.input, run_tests=args.run_tests, skip_bad=args.skip_bad,
                                    max_record_bytes=args.max_record_bytes)
    outputs = []
    to_run: list[tuple[int, str, Tests]] = []
    progress = tqdm(records, desc="extracting", unit="rec", file=sys.stderr,
                    disable=args.no_progress or None, mininterval=0.5)
    for index, (line_no, record) in enumerate(progress):
        ex = extract_code(record["response"], mode=args.mode, language=args.language,
                          fallback_language=args.fallback_language)
        out = dict(record)
        out.update(line=line_no, code=ex.code, valid=ex.valid, language=ex.language,
                   reason=ex.reason)
        if args.run_tests and record.get("tests") is not None:
            if ex.code:
                to_run.append((index, ex.code, tests_from_record(record["tests"])))
            else:
                out["execution"] = {"passed": False, "status": "no_code", "wall_s": 0.0,
                                    "tests": []}
        outputs.append(out)

    if to_run:
        config = SandboxConfig(time_limit_s=args.time_limit, memory_mb=args.memory_mb,
                               workers=args.workers)
        chunk = max(8 * args.workers, 32)
        with Sandbox(config) as sandbox, tqdm(total=len(to_run), desc="executing", unit="prog",
                                              disable=args.no_progress or None,
                                              file=sys.stderr) as bar:
            for start in range(0, len(to_run), chunk):
                part = to_run[start : start + chunk]
                results = sandbox.run_many([(code, tests) for _, code, tests in part])
                for (index, _, _), result in zip(part, results, strict=True):
                    outputs[index]["execution"] = _execution(result)
                bar.update(len(part))

    # A temporary file next to the output, moved into place when complete, with the mode the
    # umask asks for (not tempfile's 0600).
    with atomic_output(args.output) as f:
        for out in outputs:
            f.write(json.dumps(out, ensure_ascii=False) + "\n")
    executed = [o["execution"] for o in outputs if "execution" in o]
    return {
        "records": len(outputs),
        "skipped_bad": len(skipped),
        "skipped_messages": skipped[:5],
        "valid": sum(o["valid"] for o in outputs),
        "reasons": dict(collections.Counter(o["reason"] for o in outputs)),
        "executed": len(executed),
        "passed": sum(e["passed"] for e in executed),
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m codescaler_jax.extract",
        description="Extract code from responses (JSONL) and optionally run it against tests.",
    )
    p.add_argument("--input", required=True, help="JSONL with problem, response[, tests]")
    p.add_argument("--output", required=True, help="JSONL to write")
    p.add_argument("--mode", choices=MODES, default="train",
                   help="train: exactly one valid block; eval: last block (default: train)")
    p.add_argument("--language", default="python",
                   choices=("auto",) + validity.SUPPORTED_LANGUAGES,
                   help="judge every block as this language, or 'auto' from the fence tag")
    p.add_argument("--fallback-language", default="python",
                   help="language of untagged blocks with --language auto (default: python)")
    p.add_argument("--run-tests", action="store_true", help="run extracted code on its tests")
    p.add_argument("--workers", type=int, default=1, help="sandbox workers (default: 1)")
    p.add_argument("--time-limit", type=positive_float, default=2.0,
                   help="seconds per test (default 2)")
    p.add_argument("--memory-mb", type=positive_int, default=1024, help="memory per program (MB)")
    p.add_argument("--skip-bad", action="store_true", help="skip and count bad lines")
    p.add_argument("--max-record-bytes", type=positive_int, default=DEFAULT_MAX_RECORD_BYTES,
                   help="longest input line accepted (default 1 MiB); longer ones are bad lines")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


@guarded
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.workers < 1:
        print("error: --workers must be >= 1", file=sys.stderr)
        return EXIT_BAD_INPUT
    if normalize_fallback(args.fallback_language) is None:
        print(f"error: --fallback-language {args.fallback_language!r} is not supported",
              file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        summary = run(args)
    except BadInput as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(json.dumps(summary), file=sys.stderr)
    return 0


def normalize_fallback(name: str) -> str | None:
    lang = validity.normalize_language(name, "python")
    return lang if lang in validity.SUPPORTED_LANGUAGES else None


if __name__ == "__main__":
    sys.exit(main())
