"""Execution sandbox: run untrusted programs against tests, with isolation, limits and a pool.

Used to label preference data (which candidates pass), as the binary execution reward of the
RL baseline, and for evaluation (recipe section 5.6). Test formats: stdin/stdout cases, call-based
cases (function name + arguments + expected value, LiveCodeBench / TACO / DeepCoder style, LeetCode
``class Solution`` included) and HumanEval-style ``check(candidate)`` programs. Outputs are judged
as the reference harness judges them (`codescaler_jax.code.compare`); the test specifications
and their parsing from dataset records live in `codescaler_jax.code.tests`.

Each program runs under `runner.py` (see its docstring for the mechanics) in its own session, in
a fresh working directory, one forked child per test, with a per-test wall-clock limit and limits
on memory (address space), processes, file size and output size. Isolation modes
(`SandboxConfig.isolation`; ``auto`` picks ``uid`` as root, else ``userns``):

``uid`` (root, as here and in CI):
  - the program runs as a dedicated unprivileged uid per worker slot (62000+, claimed with a lock
    file so concurrent sandboxes never share one), with no supplementary groups and no-new-privs;
  - no network (a new network namespace with only a down loopback), new IPC and UTS
    namespaces;
  - a new root built from scratch (the same view as ``userns`` below): /usr, /etc and the
    interpreter's own directories read-only, a minimal /dev, a private tmpfs /tmp (working
    directory) and /dev/shm, gone when the program ends; home directories, the run directory
    and everything else do not exist in it; /proc shows only its own processes (hidepid);
  - after every test every process of the uid is killed in one atomic kill(-1) (fork bombs,
    setsid / double-fork escapees) and reaped; RLIMIT_NPROC bounds fork bombs;
  - it cannot signal, trace or read the environment of the harness (different uid, runner not
    dumpable) and sees only a scrubbed environment.
  If a namespace cannot be created (seccomp, containers) that feature is missing and reported
  in `ProgramResult.isolation`; without a mount namespace the working directory is a host
  temporary directory owned by the sandbox uid, removed afterwards.
``userns`` (an ordinary user, e.g. on a TPU VM; needs unprivileged user namespaces):
  - new user, mount, network, pid, ipc and uts namespaces; the program has no capabilities;
  - a new root built from scratch: /usr, /etc and the interpreter's own directories read-only,
    a minimal /dev, a private /tmp (working directory) and /dev/shm; home directories, the run
    directory and everything else (/work, /var, /run, /mnt, /sys) do not exist in it;
  - no network (an empty network namespace); its own pid namespace (host processes are
    invisible and cannot be signalled; /proc is the namespace's);
  - rlimits as above (RLIMIT_NPROC counts the namespace's processes only, so it is exact);
    after every test everything in the namespace is killed at once by its init.
  Where the kernel forbids unprivileged user namespaces (``kernel.unprivileged_userns_clone=0``,
  ``user.max_user_namespaces=0``, Ubuntu's ``kernel.apparmor_restrict_unprivileged_userns=1``,
  a seccomp filter) the sandbox logs once which setting is in the way and refuses to run, unless
  the configuration accepts weak isolation (`SandboxConfig.allow_weak_isolation`, or
  ``CODESCALER_SANDBOX_ALLOW_WEAK=1`` for the command-line tools).
``none`` (weak; only with ``allow_weak_isolation``): own session and process group per test,
  rlimits, scrubbed environment, temporary working directory removed afterwards, all
  descendants killed (the runner is their subreaper). The program keeps the user's network and
  file access, can kill the runner (reported as a runtime error) and RLIMIT_NPROC is only
  relative to the user's other processes.
``python -m codescaler_jax.sandbox_check`` prints which protections are in force.

Statuses per test: passed, failed, timeout, runtime_error, memory_limit, syntax_error,
output_limit (stdout+stderr over the cap, or the file-size limit hit), skipped (not run after an
earlier failure with ``stop_on_first_failure``) and sandbox_error (the harness itself failed).

Threat model for verdicts. The program is hostile and knows this harness; the tests, expected
values and (for HumanEval) the prompt are trusted data, but the test code still runs only in
the sandbox. A verdict of ``passed`` must mean the program computed values equal to the
expected ones, compared with builtin semantics outside the program's reach:
  - stdio: the parent compares the captured stdout; expected outputs never enter the sandbox.
  - call-based: the return value must be plain JSON data (exact builtin types, checked with
    ``type(x) is ...``), crosses as JSON text, and the parent compares the decoded value; the
    expected value never enters the sandbox. Whatever the program writes where, the parent only
    ever sees some plain value, which an honest program could have returned.
  - check (HumanEval): ``check(candidate)`` runs in a judge process apart from the program's
    process; ``candidate`` (and any other program function the test calls, but never a builtin
    name, and never a helper the trusted prompt defines) is a proxy that sends plain-data
    arguments to the program's process and decodes the reply into exact builtin objects (a
    tuple stays a tuple; anything else, such as an object with a rigged ``__eq__``, ``__hash__``
    or ``__len__``, an ``int``/``str``/``list`` subclass, a generator, is a failure the test
    cannot catch). The asserts thus compare builtin data with the judge's own, unpatched
    builtins (the program may patch ``isinstance``, ``AssertionError``, ``sys.settrace``,
    ``sys.modules`` or anything else in its own process only). The program's process is forked
    before the runner reads the test text, so it cannot read the expected values from memory; the
    judge is not dumpable (no ptrace, no /proc/<pid>/mem), and its verdict leaves through a
    pipe the program does not hold, so fake status lines, printed success markers, writes to
    any descriptor, ``os._exit(0)`` / ``sys.exit(0)`` / ``SystemExit`` before or during the
    asserts, and killing the judge or the runner all end as ``failed``.
Not covered: a program that really computes the answers (or guesses them); the program
learning the test's inputs (it must, to answer); helpers a test calls that no trusted prompt
defines are the program's own, as in the reference; timing side channels; kernel exploits (no
seccomp filter); a hostile test or prompt (they are trusted, though confined like the program).
Semantics of the two-process check: arguments are copies (a test that inspects an argument the
program mutated sees the original) and must be plain data (else ``sandbox_error``).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import pwd
import queue
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from codescaler_jax.code import compare
from codescaler_jax.code.tests import (  # noqa: F401  (re-exported: the specs' old home)
    CallTests,
    CheckTest,
    StdioTests,
    Tests,
    num_tests,
    tests_from_record,
)
from codescaler_jax.errors import RefusedError

log = logging.getLogger(__name__)

RUNNER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "runner.py")

STATUSES = (
    "passed",
    "failed",
    "timeout",
    "runtime_error",
    "memory_limit",
    "syntax_error",
    "output_limit",
    "skipped",
    "sandbox_error",
)
_SIGNAL_STATUS = {24: "timeout", 25: "output_limit"}  # SIGXCPU, SIGXFSZ
_ERRNO_STATUS = {27: "output_limit", 28: "output_limit"}  # EFBIG (file-size limit), ENOSPC
ISOLATION_MODES = ("auto", "uid", "userns", "none")
ALLOW_WEAK_ENV = "CODESCALER_SANDBOX_ALLOW_WEAK"
_STARTUP_S = 20.0  # safety net only: the runner itself enforces every limit precisely
_MESSAGE_CHARS = 500


# ---------------------------------------------------------------------------------------------
# Configuration and results


@dataclass(frozen=True)
class SandboxConfig:
    """Limits and pool settings. Limits apply per test; ``memory_mb`` is address space."""

    time_limit_s: float = 2.0
    memory_mb: int = 1024
    max_processes: int = 32
    max_file_mb: int = 16
    max_output_mb: int = 16
    workers: int = 1
    stop_on_first_failure: bool = True
    import_prelude: bool = True  # the reference's star-imports before stdio/call programs
    recursion_limit: int = 600_000  # set with the prelude, as the reference does
    isolation: str = "auto"  # "auto": "uid" when root else "userns"; "uid"; "userns"; "none"
    # Run untrusted code with weak isolation ("none") where user namespaces are unavailable
    # (or when isolation="none" is asked for). Off by default: the sandbox refuses instead.
    allow_weak_isolation: bool = field(
        default_factory=lambda: os.environ.get(ALLOW_WEAK_ENV, "") == "1")
    uid_base: int = 62000  # sandbox uids: [uid_base, uid_base + uid_count), never real users
    uid_count: int = 512
    tmpfs_mb: int = 256  # size of the private /tmp (working directory)
    shm_mb: int = 16  # size of the private /dev/shm
    stack_mb: int = 64
    max_open_files: int = 256
    python: str = sys.executable

    def __post_init__(self) -> None:
        positive = ("time_limit_s", "memory_mb", "max_processes", "max_file_mb", "max_output_mb",
                    "workers", "uid_count", "tmpfs_mb", "shm_mb", "stack_mb", "max_open_files",
                    "recursion_limit")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"SandboxConfig.{name} must be > 0, got {getattr(self, name)!r}")
        if self.isolation not in ISOLATION_MODES:
            raise ValueError(f"SandboxConfig.isolation must be one of {', '.join(ISOLATION_MODES)}"
                             f", got {self.isolation!r}")
        if not isinstance(self.allow_weak_isolation, bool):
            raise ValueError(f"SandboxConfig.allow_weak_isolation must be true or false, got "
                             f"{self.allow_weak_isolation!r}")
        if self.isolation == "none" and not self.allow_weak_isolation:
            raise ValueError("SandboxConfig.isolation='none' runs untrusted code without "
                             "isolation; it needs SandboxConfig.allow_weak_isolation=True (or "
                             f"{ALLOW_WEAK_ENV}=1)")
        if self.uid_base < 1000:
            raise ValueError("SandboxConfig.uid_base must be >= 1000 (system uids are off limits)")


@dataclass(frozen=True)
class TestResult:
    """One test: ``status`` (see `STATUSES`), the child's wall time, a short message."""

    __test__ = False  # not a pytest class

    status: str
    wall_s: float
    message: str = ""


@dataclass(frozen=True)
class ProgramResult:
    """One program: ``passed`` iff every test passed; ``status`` = first non-passed test status.

    ``wall_s`` is the whole program in the harness (start, tests, cleanup); ``isolation`` lists
    the isolation features that were in force.
    """

    passed: bool
    status: str
    tests: list[TestResult]
    wall_s: float
    isolation: tuple[str, ...] = field(default=())


# ---------------------------------------------------------------------------------------------
# Uid slots


def _uids_in_use() -> set[int]:
    uids = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                uids.add(os.stat(f"/proc/{entry}").st_uid)
            except OSError:
                pass
    return uids


class _UidPool:
    """Claims ``n`` sandbox uids with non-blocking flocks (released when closed or on exit)."""

    def __init__(self, config: SandboxConfig, n: int):
        lock_dir = os.path.join(tempfile.gettempdir(), "codescaler-sandbox-locks")
        os.makedirs(lock_dir, mode=0o700, exist_ok=True)
        busy = _uids_in_use()
        self.locks: dict[int, int] = {}
        for uid in range(config.uid_base, config.uid_base + config.uid_count):
            if len(self.locks) == n:
                break
            if uid in busy or _is_known_uid(uid):
                continue
            fd = os.open(os.path.join(lock_dir, f"uid-{uid}.lock"),
                         os.O_CREAT | os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            if uid in _uids_in_use():  # a process appeared between the scan and the lock
                os.close(fd)
                continue
            self.locks[uid] = fd
        if len(self.locks) < n:
            self.close()
            raise RuntimeError(f"could not claim {n} free sandbox uids in "
                               f"[{config.uid_base}, {config.uid_base + config.uid_count})")
        self.free: queue.Queue[int] = queue.Queue()
        for uid in self.locks:
            self.free.put(uid)

    def close(self) -> None:
        for fd in self.locks.values():
            os.close(fd)
        self.locks = {}


def _is_known_uid(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
    except KeyError:
        return False
    return True


# ---------------------------------------------------------------------------------------------
# Isolation mode: which one this user gets


class WeakIsolationError(RefusedError):
    """Untrusted code would run with weak isolation and the configuration does not accept it."""


@dataclass(frozen=True)
class UsernsSupport:
    """Whether the userns set-up works for this user; ``reason`` says why not (the setting in
    the way and how to change it), ``features`` what a successful probe achieved."""

    available: bool
    reason: str = ""
    features: tuple[str, ...] = ()


_SYSCTLS = (
    # (file, value that forbids, setting, how to allow)
    ("/proc/sys/kernel/unprivileged_userns_clone", "0", "kernel.unprivileged_userns_clone=0",
     "sudo sysctl -w kernel.unprivileged_userns_clone=1"),
    ("/proc/sys/user/max_user_namespaces", "0", "user.max_user_namespaces=0",
     "sudo sysctl -w user.max_user_namespaces=15000"),
    ("/proc/sys/kernel/apparmor_restrict_unprivileged_userns", "1",
     "kernel.apparmor_restrict_unprivileged_userns=1 (Ubuntu's AppArmor restriction)",
     "sudo sysctl -w kernel.apparmor_restrict_unprivileged_userns=0, or an AppArmor profile "
     "that allows `userns,` for {python}"),
)


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def userns_diagnosis(error: str, python: str = sys.executable,
                     read: Callable[[str], str | None] = _read) -> str:
    """Why user namespaces fail here: the kernel setting in the way and how to change it.

    ``read`` reads a /proc/sys file (None when absent); injectable for tests.
    """
    found = [f"{setting} (to allow: {how.format(python=python)})"
             for path, bad, setting, how in _SYSCTLS if read(path) == bad]
    if found:
        return f"{error}; in the way: " + "; ".join(found)
    return (f"{error}; no sysctl forbids it, so a seccomp filter or a container runtime "
            "probably does (for Docker: --security-opt seccomp=unconfined, or run as root)")


_USERNS_CACHE: dict[str, UsernsSupport] = {}
_WARNED: set[str] = set()


def probe_userns(python: str = sys.executable) -> UsernsSupport:
    """Try the real userns set-up once per interpreter (in a throw-away runner process)."""
    if python not in _USERNS_CACHE:
        try:
            out = subprocess.run([python, "-I", "-B", RUNNER, "--probe"], capture_output=True,
                                 env={"PATH": "/usr/bin:/bin"}, cwd="/", timeout=60, check=False)
            result = json.loads(out.stdout.decode() or "{}")
        except (OSError, ValueError, subprocess.TimeoutExpired) as e:
            result = {"ok": False, "error": f"the probe did not run ({e})"}
        if result.get("ok"):
            support = UsernsSupport(True, features=tuple(result.get("features", ())))
        else:
            support = UsernsSupport(False, userns_diagnosis(
                str(result.get("error", "unknown failure")), python))
        _USERNS_CACHE[python] = support
    return _USERNS_CACHE[python]


def resolve_isolation(config: SandboxConfig, *, euid: int | None = None,
                      userns: UsernsSupport | None = None) -> str:
    """The isolation mode a sandbox with ``config`` gets: "uid", "userns" or "none".

    ``euid`` and ``userns`` default to this process's and to `probe_userns` (injectable for
    tests). Raises WeakIsolationError when only weak isolation is possible and the config does
    not accept it; warns once per reason when it does.
    """
    euid = os.geteuid() if euid is None else euid
    mode = config.isolation
    if mode == "uid" and euid != 0:
        raise RuntimeError("SandboxConfig.isolation='uid' needs root")
    if mode == "userns" and euid == 0:
        raise RuntimeError("SandboxConfig.isolation='userns' is for unprivileged users; as root "
                           "use 'uid' (or 'auto'), which gives the program a uid of its own")
    if mode == "auto" and euid == 0:
        return "uid"
    if mode in ("auto", "userns"):
        support = userns if userns is not None else probe_userns(config.python)
        if support.available:
            return "userns"
        message = ("the sandbox cannot isolate untrusted code for this user: unprivileged user "
                   f"namespaces are unavailable ({support.reason})")
        if message not in _WARNED:
            _WARNED.add(message)
            log.warning("%s", message)
        if mode == "userns" or not config.allow_weak_isolation:
            raise WeakIsolationError(
                f"{message}. Refusing to run untrusted code with weak isolation (the program "
                "could read and delete your files, reach the network and see your processes). "
                "Fix the setting above, run as root, or accept weak isolation explicitly with "
                f"SandboxConfig.allow_weak_isolation=True ({ALLOW_WEAK_ENV}=1 for the "
                "command-line tools)")
        return "none"
    return mode


# ---------------------------------------------------------------------------------------------
# The sandbox


class _Lines:
    """Newline-delimited reads from a pipe with a deadline."""

    def __init__(self, fd: int):
        self.fd = fd
        self.buf = bytearray()

    def next(self, timeout_s: float) -> bytes | None:
        deadline = time.monotonic() + timeout_s
        while True:
            nl = self.buf.find(b"\n")
            if nl >= 0:
                line = bytes(self.buf[:nl])
                del self.buf[: nl + 1]
                return line
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            ready, _, _ = select.select([self.fd], [], [], remaining)
            if not ready:
                return None
            chunk = os.read(self.fd, 1 << 20)
            if not chunk:
                return None
            self.buf += chunk


def _short(text: str) -> str:
    return text if len(text) <= _MESSAGE_CHARS else text[: _MESSAGE_CHARS - 3] + "..."


class _Slot:
    """A worker slot: its sandbox uid (or None) and its long-lived runner server."""

    def __init__(self, uid: int | None):
        self.uid = uid
        self.proc: subprocess.Popen | None = None
        self.lines: _Lines | None = None
        self.errlog = None

    def server(self, python: str) -> tuple[subprocess.Popen, _Lines]:
        if self.proc is None or self.proc.poll() is not None:
            self.stop(python)
            self.errlog = tempfile.TemporaryFile()
            self.proc = subprocess.Popen(
                [python, "-I", "-B", RUNNER],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=self.errlog,
                env={"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8",
                     "LC_ALL": "C.UTF-8"},
                cwd="/",
                start_new_session=True,
                close_fds=True,
            )
            self.lines = _Lines(self.proc.stdout.fileno())
        return self.proc, self.lines

    def stderr_tail(self) -> str:
        if self.errlog is None:
            return ""
        self.errlog.seek(0, os.SEEK_END)
        size = self.errlog.tell()
        self.errlog.seek(max(0, size - 300))
        return self.errlog.read().decode("utf-8", "replace").strip()

    def stop(self, python: str, *, kill: bool = True) -> None:
        """Stop the server (closing its stdin ends it; a stuck one is killed with its group)."""
        proc, self.proc = self.proc, None
        if proc is not None:
            for stream in (proc.stdin, proc.stdout):
                try:
                    stream.close()
                except OSError:
                    pass
            try:
                proc.wait(timeout=0.05 if kill else 5.0)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, 9)
                except OSError:
                    pass
                proc.wait()
            if kill and self.uid is not None:
                # The server may have died mid-program: kill the uid's leftovers from here.
                subprocess.run([python, "-I", "-B", RUNNER, "--kill-uid", str(self.uid)],
                               env={}, cwd="/", check=False, timeout=30)
        if self.errlog is not None:
            self.errlog.close()
            self.errlog = None


class Sandbox:
    """Runs programs against tests; ``run`` for one, ``run_many`` for a batch on the pool.

    Each worker slot keeps one runner server (started on first use) that forks a fresh,
    isolated process per program. Use as a context manager (or call `close`) to stop the
    servers and release the claimed uids.
    """

    def __init__(self, config: SandboxConfig | None = None, *,
                 userns: UsernsSupport | None = None):
        self.config = config or SandboxConfig()
        mode = resolve_isolation(self.config, userns=userns)
        self.mode = mode
        self._uids = _UidPool(self.config, self.config.workers) if mode == "uid" else None
        uids = list(self._uids.locks) if self._uids is not None else [None] * self.config.workers
        self._all_slots = [_Slot(uid) for uid in uids]
        self._slots: queue.Queue[_Slot] = queue.Queue()
        for slot in self._all_slots:
            self._slots.put(slot)
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    @property
    def uids(self) -> list[int]:
        """The sandbox uids this instance holds (empty in ``none`` mode)."""
        return [s.uid for s in self._all_slots if s.uid is not None]

    # -- public API -----------------------------------------------------------------------

    def run(self, code: str, tests: Tests) -> ProgramResult:
        """Run ``code`` against ``tests`` (a spec or anything `tests_from_record` parses)."""
        if not isinstance(tests, StdioTests | CallTests | CheckTest):
            tests = tests_from_record(tests)
        if not isinstance(code, str):
            raise TypeError(f"code must be str, got {type(code).__name__}")
        slot = self._slots.get()
        try:
            return self._run_one(code, tests, slot)
        finally:
            self._slots.put(slot)

    def run_for_output(self, code: str, stdin: str = "") -> tuple[ProgramResult, str]:
        """Run ``code`` once on ``stdin`` and return its stdout (up to 64 KB) beside the
        result, for diagnostics (`codescaler_jax.sandbox_check`); verdicts never need it."""
        outputs: list[str] = []
        slot = self._slots.get()
        try:
            result = self._run_one(code, StdioTests((stdin,), ("",)), slot, outputs)
        finally:
            self._slots.put(slot)
        return result, outputs[0] if outputs else ""

    def run_many(self, items: Iterable[tuple[str, Tests]]) -> list[ProgramResult]:
        """Run many ``(code, tests)`` pairs on ``config.workers`` workers; results in order."""
        items = [(c, t if isinstance(t, StdioTests | CallTests | CheckTest)
                  else tests_from_record(t)) for c, t in items]
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.config.workers,
                                                thread_name_prefix="sandbox")
        return list(self._pool.map(lambda item: self.run(*item), items))

    def close(self) -> None:
        """Stop the pool and the servers, release the sandbox uids."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        for slot in self._all_slots:
            slot.stop(self.config.python, kill=False)
        if self._uids is not None:
            self._uids.close()
            self._uids = None

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- one program ----------------------------------------------------------------------

    def _job(self, code: str, tests: Tests, uid: int | None, workdir: str) -> dict[str, Any]:
        cfg = self.config
        mb = 1 << 20
        if isinstance(tests, StdioTests):
            kind, cases = "stdio", [{"stdin": x} for x in tests.inputs]
        elif isinstance(tests, CallTests):
            kind, cases = "call", [{"args": list(a)} for a in tests.inputs]
        else:
            # The test text travels in a frame of its own, after the job (see _run_one).
            kind, cases = "check", [{"entry_point": tests.entry_point}]
        return {
            "code": code,
            "kind": kind,
            "fn_name": tests.fn_name if isinstance(tests, CallTests) else None,
            "tests": cases,
            "time_limit_s": cfg.time_limit_s,
            "prelude": cfg.import_prelude and kind != "check",
            "recursion_limit": cfg.recursion_limit,
            "mode": self.mode,
            "uid": uid,
            "gid": uid,
            "workdir": workdir,
            "tmpfs_mb": cfg.tmpfs_mb,
            "shm_mb": cfg.shm_mb,
            "limits": {
                "as": cfg.memory_mb * mb,
                "nproc": cfg.max_processes,
                "fsize": cfg.max_file_mb * mb,
                "output_bytes": cfg.max_output_mb * mb,
                "stack": cfg.stack_mb * mb,
                "nofile": cfg.max_open_files,
            },
        }

    def _judge(self, record: dict[str, Any], tests: Tests, i: int) -> TestResult:
        wall = float(record.get("wall_s", 0.0))
        outcome = record.get("outcome")
        message = _short(str(record.get("message", "")))
        check = isinstance(tests, CheckTest)
        if outcome in ("timeout", "output_limit", "syntax_error"):
            return TestResult(outcome, wall, message)
        if outcome in ("unplain", "exit_early"):
            return TestResult("failed", wall, message)
        if outcome == "harness_error":
            return TestResult("sandbox_error", wall, message)
        if outcome == "candidate_ended":
            # The program's process died: a crash (signal) is a runtime error; exiting on its
            # own before answering (os._exit, closing its pipe) only dodges the asserts.
            sig = record.get("signal")
            if isinstance(sig, int) and sig not in (signal.SIGKILL,):
                status = _SIGNAL_STATUS.get(sig, "runtime_error")
                return TestResult(status, wall, f"{message} (killed by signal {sig})")
            return TestResult("failed", wall, message)
        if outcome == "exception":
            exc = record.get("exc_type")
            if exc == "MemoryError":
                return TestResult("memory_limit", wall, message)
            if record.get("errno") in _ERRNO_STATUS:
                return TestResult(_ERRNO_STATUS[record["errno"]], wall, message)
            if exc == "AssertionError" and isinstance(tests, CheckTest):
                return TestResult("failed", wall, message or "AssertionError")
            return TestResult("runtime_error", wall, message)
        if outcome == "signal":
            sig = int(record.get("signal", 0))
            if check and sig not in _SIGNAL_STATUS:
                # The judge process was killed: only the program could have done that.
                return TestResult("failed", wall, f"the test's judge process was killed by "
                                                  f"signal {sig}")
            status = _SIGNAL_STATUS.get(sig, "runtime_error")
            return TestResult(status, wall, f"killed by signal {sig}")
        if outcome == "exit" and not (isinstance(tests, StdioTests)
                                      and record.get("exit_code") == 0):
            stderr = record.get("stderr", "")
            # stdio: a crash. call / check: the status line never came, so the program left
            # (os._exit) before its result was taken: that is no pass, and no crash either.
            status = "runtime_error" if isinstance(tests, StdioTests) else "failed"
            return TestResult(status, wall, _short(
                f"exited with status {record.get('exit_code')} before finishing. {stderr}"))
        if outcome not in ("ok", "exit"):
            return TestResult("sandbox_error", wall, f"unknown outcome {outcome!r}")
        if isinstance(tests, CheckTest):
            return TestResult("passed", wall)
        if isinstance(tests, StdioTests):
            got = record.get("stdout", "")
            if compare.stdio_match(got, tests.outputs[i]):
                return TestResult("passed", wall)
            return TestResult("failed", wall, _short(
                f"expected {tests.outputs[i][:200]!r}, got {got[:200]!r}"))
        try:
            value = json.loads(record.get("value", ""))
        except ValueError as e:
            return TestResult("failed", wall, f"unreadable return value ({e})")
        if compare.call_match(value, tests.outputs[i]):
            return TestResult("passed", wall)
        return TestResult("failed", wall, _short(
            f"expected {tests.outputs[i]!r}, got {value!r}"))

    def _run_one(self, code: str, tests: Tests, slot: _Slot,
                 outputs: list[str] | None = None) -> ProgramResult:
        cfg = self.config
        t0 = time.monotonic()
        n = num_tests(tests)
        results: list[TestResult] = []
        isolation: tuple[str, ...] = ()
        workdir = tempfile.mkdtemp(prefix="codescaler-sandbox-")
        healthy = False
        try:
            proc, lines = slot.server(cfg.python)
            frames = [json.dumps(self._job(code, tests, slot.uid, workdir)).encode()]
            if isinstance(tests, CheckTest):
                # Read by the runner only once the program's process exists (see runner.py).
                frames.append(json.dumps({"test": tests.test, "prompt": tests.prompt}).encode())
            proc.stdin.write(b"".join(b"%d\n%s" % (len(f), f) for f in frames))
            proc.stdin.flush()
            hello = _message(lines, _STARTUP_S)
            if "hello" not in hello:
                raise _HarnessError(f"runner did not start: {hello}")
            isolation = tuple(hello["hello"])
            per_test = cfg.time_limit_s + 5.0  # cleanup patience + slack; limits are the runner's
            for i in range(n):
                record = _message(lines, per_test)
                if "ended" in record:
                    raise _HarnessError(f"program process ended early (status "
                                        f"{record.get('status')})")
                result = self._judge(record, tests, i)
                results.append(result)
                if outputs is not None:
                    outputs.append(str(record.get("stdout", ""))[:1 << 16])
                stop = result.status != "passed" and (
                    cfg.stop_on_first_failure or result.status == "syntax_error")
                if i == n - 1:
                    break  # the runner expects no control line after the last test
                proc.stdin.write(b"0\n" if stop else b"1\n")
                proc.stdin.flush()
                if stop:
                    break
            healthy = "ended" in _message(lines, per_test)
        except (_HarnessError, OSError, ValueError) as e:
            # A dead runner (or one the program killed, in "none" mode) fails the test it was on.
            status = "runtime_error" if self.mode == "none" else "sandbox_error"
            results.append(TestResult(status, time.monotonic() - t0,
                                      _short(f"{e}; {slot.stderr_tail()}")))
        finally:
            if not healthy:
                slot.stop(cfg.python)
            shutil.rmtree(workdir, ignore_errors=True)
        if results and results[-1].status == "syntax_error":
            results += [TestResult("syntax_error", 0.0, results[-1].message)] * (n - len(results))
        results += [TestResult("skipped", 0.0)] * (n - len(results))
        first_bad = next((r.status for r in results if r.status != "passed"), "passed")
        return ProgramResult(first_bad == "passed", first_bad, results,
                             time.monotonic() - t0, isolation)


def _message(lines: _Lines, timeout_s: float) -> dict[str, Any]:
    line = lines.next(timeout_s)
    if line is None:
        raise _HarnessError("runner stopped answering")
    msg = json.loads(line)
    if not isinstance(msg, dict):
        raise _HarnessError(f"bad runner message {line[:100]!r}")
    return msg


class _HarnessError(RuntimeError):
    pass

