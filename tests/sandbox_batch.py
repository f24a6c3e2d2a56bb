"""Run a batch of programs in the sandbox and print the results as JSON (a test helper).

    python tests/sandbox_batch.py < {"config": {SandboxConfig fields}, "items": [[code, tests]]}

``tests`` is any record `tests_from_record` parses. Prints {"mode", "results": [{"status",
"passed", "messages", "isolation", "wall_s"}]}. The tests run it as ``nobody`` through
``tests/as_user.py``, to exercise the sandbox as an ordinary user sees it.
"""

import json
import sys

from codescaler_jax.code.sandbox import Sandbox, SandboxConfig


def main() -> None:
    job = json.load(sys.stdin)
    with Sandbox(SandboxConfig(**job.get("config", {}))) as sandbox:
        results = sandbox.run_many([(code, tests) for code, tests in job["items"]])
        mode = sandbox.mode
    json.dump({"mode": mode, "results": [
        {"status": r.status, "passed": r.passed, "messages": [t.message for t in r.tests],
         "isolation": list(r.isolation), "wall_s": r.wall_s} for r in results]}, sys.stdout)


if __name__ == "__main__":
    main()
