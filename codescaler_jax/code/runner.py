"""In-sandbox driver: runs one untrusted program against its tests, one forked child per test.

`codescaler_jax.code.sandbox` starts this file as ``python -I -B runner.py`` in a new session, once
per worker slot: a server that reads jobs from stdin and forks one process per program, so the
interpreter start-up and imports are paid once. It imports only the standard library (``-I``
keeps the package off ``sys.path`` on purpose) and never runs untrusted code itself.

For a job with a sandbox uid (root, the normal case) the program process stays root, outside
the reach of the program, and:
- moves into new network and mount namespaces (no network; a private tmpfs on /tmp that vanishes
  with the namespace; every other mount read-only; /proc remounted with hidepid so other users'
  processes are invisible; directories on the interpreter's path that an unprivileged user could
  not traverse, such as /root, replaced by a tmpfs holding only the interpreter's files);
- becomes a child subreaper, so every process the program leaves behind is re-parented to it;
- forks one child per test, which calls setsid, drops to the sandbox uid (no supplementary
  groups, no-new-privs, parent-death signal), applies rlimits (address space, processes,
  file size, CPU, open files, core 0) and executes the program;
- enforces the wall-clock limit and the output cap itself, and after every test kills every
  process of the sandbox uid at once (a helper that becomes the uid and calls kill(-1, SIGKILL),
  which the kernel applies atomically, so fork bombs and setsid/double-fork escapees die too),
  then reaps them.

Without root it applies what an unprivileged process can: its own session and process group per
test, rlimits, a scrubbed environment, a temporary working directory given by the parent, and
killing every descendant it can find (it is still their subreaper). The program can then reach
the network, write wherever the user can, and kill the runner.

``runner.py --kill-uid UID`` (as root) only kills every process of UID.

Protocol (JSON lines), per job: stdin carries the job line, then one control line per finished
test (``1`` = continue, anything else = stop). stdout carries a ``hello`` line (the isolation
that was achieved), one result line per test, and an ``ended`` line once the program process is
gone. The runner never sees expected outputs: it reports what the program printed or returned
and the parent judges it.
"""

import ctypes
import io
import json
import math
import os
import resource
import select
import signal
import sys
import time
import traceback

# Linux constants (not all exposed by the os module on Python 3.11).
CLONE_NEWNS = 0x00020000
CLONE_NEWNET = 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC = 32, 1024, 2048, 4096, 16384
MS_PRIVATE, MS_RELATIME, MS_STRICTATIME = 1 << 18, 1 << 21, 1 << 24
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 1, 4, 36, 38

STATUS_FD = 3  # where the child writes its one status line
READ_CHUNK = 1 << 16
MESSAGE_CHARS = 2000

# Star-imports the reference harness puts in front of stdio and call-based programs (LeetCode
# style code uses List/Optional and math/collections helpers without importing them). builtins
# comes after the modules whose names shadow builtins (re.compile, io.open).
PRELUDE_MODULES = (
    "string", "re", "datetime", "collections", "heapq", "bisect", "copy", "math", "random",
    "statistics", "itertools", "functools", "operator", "io", "sys", "json",
)
PRELUDE = (
    "".join(f"from {m} import *\n" for m in PRELUDE_MODULES)
    + "from builtins import *\nfrom typing import *\n"
    + "".join(f"import {m}\n" for m in PRELUDE_MODULES)
)
# The reference prelude also raises the recursion limit to 6 * 10**5 (job["recursion_limit"]).

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_char_p]
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                        ctypes.c_ulong]


def _enc(s):
    return None if s is None else os.fsencode(s)


def mount(source, target, fstype, flags, data=None):
    """mount(2); True on success."""
    return _libc.mount(_enc(source), _enc(target), _enc(fstype), flags, _enc(data)) == 0


def prctl(option, arg):
    return _libc.prctl(option, arg, 0, 0, 0) == 0


# ---------------------------------------------------------------------------------------------
# Isolation set-up (runner, root)


def _mountinfo():
    """Mount points and their per-mount options, from /proc/self/mountinfo."""
    points = []
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            fields = line.split(b" ")
            point = fields[4].decode("unicode_escape") if b"\\" in fields[4] else fields[4]
            points.append((os.fsdecode(point), fields[5].decode().split(",")))
    return points


def _remount_readonly():
    """Make every mount of this (private) namespace read-only; failures are skipped."""
    opt_flags = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC,
                 "noatime": MS_NOATIME, "nodiratime": MS_NODIRATIME, "relatime": MS_RELATIME,
                 "strictatime": MS_STRICTATIME}
    for point, options in _mountinfo():
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID
        for opt in options:
            flags |= opt_flags.get(opt, 0)
        mount(None, point, None, flags)


def _blocked_ancestor(path):
    """The shallowest ancestor of ``path`` that others cannot traverse, and the child under it."""
    parts = [p for p in path.split("/") if p]
    current = ""
    for i, part in enumerate(parts[:-1] if len(parts) > 1 else parts):
        current += "/" + part
        try:
            mode = os.stat(current).st_mode
        except OSError:
            return None
        if not mode & 0o001 and i + 1 < len(parts):
            return current, parts[i + 1]
    return None


def _expose_interpreter(paths):
    """Replace untraversable ancestors of the interpreter's paths by a tmpfs holding only them.

    With the interpreter under /root (pyenv), the dropped uid could not import a module that
    was not imported before the drop. The tmpfs also hides the rest of that directory.
    """
    wanted = {}
    for path in paths:
        hit = _blocked_ancestor(os.path.realpath(path))
        if hit is not None:
            wanted.setdefault(hit[0], set()).add(hit[1])
    done = []
    for top in sorted(wanted, key=len):
        if any(top.startswith(d + "/") for d in done):
            continue
        handles = {}
        for child in wanted[top]:
            try:
                handles[child] = os.open(os.path.join(top, child), os.O_PATH)
            except OSError:
                continue
        if mount("tmpfs", top, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755"):
            for child, fd in handles.items():
                target = os.path.join(top, child)
                try:
                    os.mkdir(target, 0o755)
                except OSError:
                    pass
                mount(f"/proc/self/fd/{fd}", target, None, MS_BIND | MS_REC)
            done.append(top)
        for fd in handles.values():
            os.close(fd)


def setup_isolation(job):
    """Namespaces and mounts for the privileged mode; returns the features achieved."""
    achieved = ["uid", "rlimits", "session"]
    if _libc.unshare(CLONE_NEWNS | CLONE_NEWNET) == 0:
        achieved += ["netns", "mntns"]
    elif _libc.unshare(CLONE_NEWNS) == 0:
        achieved.append("mntns")
    # Only with private propagation may anything be mounted: otherwise mounts would leak out.
    if "mntns" in achieved and mount(None, "/", None, MS_REC | MS_PRIVATE):
        keep = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
                os.path.dirname(os.path.realpath(sys.executable))}
        keep.update(p for p in sys.path if p and os.path.isdir(p))
        _expose_interpreter(sorted(keep))
        for hidden in ("/run", "/var/tmp", "/var/run"):
            if os.path.isdir(hidden) and not os.path.islink(hidden):
                mount("tmpfs", hidden, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
        if (mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, "hidepid=invisible")
                or mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, "hidepid=2")):
            achieved.append("hidepid")
        _remount_readonly()
        achieved.append("readonly_fs")
        # The interpreter's own files may live under /tmp (a virtualenv in a temporary clone,
        # as CI makes): keep them visible, read-only, inside the private /tmp.
        under_tmp = []
        for p in sorted((os.path.realpath(p) for p in keep), key=len):
            if p.startswith("/tmp/") and not any(p.startswith(t + "/") for t in under_tmp):
                under_tmp.append(p)
        handles = {}
        for p in under_tmp:
            try:
                handles[p] = os.open(p, os.O_PATH)
            except OSError:
                pass
        tmp_opts = f"size={job['tmpfs_mb']}m,mode=1777"
        if mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, tmp_opts):
            achieved.append("private_tmp")
            for p, fd in handles.items():
                try:
                    os.makedirs(p, 0o755, exist_ok=True)
                except OSError:
                    continue
                if mount(f"/proc/self/fd/{fd}", p, None, MS_BIND | MS_REC):
                    mount(None, p, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID)
        for fd in handles.values():
            os.close(fd)
            if os.path.isdir("/dev/shm"):
                mount("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC,
                      "size=16m,mode=1777")
    if "private_tmp" in achieved:
        workdir = "/tmp/work"
        os.mkdir(workdir, 0o700)
    else:
        workdir = job["workdir"]
    os.chown(workdir, job["uid"], job["gid"])
    return achieved, workdir


# ---------------------------------------------------------------------------------------------
# Cleanup (runner)


def _children_of(pid):
    kids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(b")") + 2 :].split()[1])
        if ppid == pid:
            kids.append(int(entry))
    return kids


def kill_uid(uid):
    """SIGKILL every process of ``uid`` in one kernel pass (kill(-1) as that uid)."""
    if not uid or uid == os.getuid():
        raise RuntimeError("refusing kill(-1) outside a dedicated sandbox uid")
    pid = os.fork()
    if pid == 0:
        try:
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            if os.getuid() == uid and os.geteuid() == uid:
                os.kill(-1, signal.SIGKILL)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)


def user_tasks(uid):
    """Number of tasks (threads) that ``uid`` runs now: the base for an unprivileged NPROC."""
    count = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}").st_uid == uid:
                    count += len(os.listdir(f"/proc/{entry}/task"))
            except OSError:
                continue
    return count


def has_children():
    """Whether this process has any child, alive or zombie (nothing is reaped)."""
    try:
        os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return False
    return True


def cleanup(uid, patience_s=1.0):
    """Kill everything the program left and reap it all; True when nothing is left.

    Every process the program started is in this process's subtree: as child subreaper it
    inherits the orphans, setsid and double-fork ones included. So no child means nothing is
    left, and the common case costs one waitid. Otherwise, with a sandbox uid one kill(-1) as
    that uid catches everything at once; without one, the children are killed one by one
    (their orphans come back to us and are killed in the next round).
    """
    deadline = time.monotonic() + patience_s
    while has_children():
        if uid is not None:
            kill_uid(uid)
        else:
            for kid in _children_of(os.getpid()):
                try:
                    os.kill(kid, signal.SIGKILL)
                except OSError:
                    pass
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return True
            if pid == 0:
                break
        if time.monotonic() > deadline:
            return False
        time.sleep(0.001)
    return True


# ---------------------------------------------------------------------------------------------
# Child side (runs the untrusted program)


def _write_all(fd, data):
    while data:
        n = os.write(fd, data)
        data = data[n:]


def _status(payload):
    try:
        _write_all(STATUS_FD, (json.dumps(payload) + "\n").encode())
    except Exception:  # noqa: BLE001 - the program may have closed or filled the status pipe
        pass


def _exc_payload(exc):
    text = "".join(traceback.format_exception_only(type(exc), exc)).strip()
    errno_ = getattr(exc, "errno", None)
    return {"outcome": "exception", "exc_type": type(exc).__name__,
            "errno": errno_ if isinstance(errno_, int) else None,
            "message": text[-MESSAGE_CHARS:]}


PLAIN_SCALARS = (type(None), bool, int, float, str)


def to_plain(value, top=True):
    """The value as plain JSON data, or raise TypeError (custom types could fake ``==``).

    A top-level tuple becomes a list (the reference does the same); numpy scalars become Python
    scalars. Nested tuples, sets, non-str dict keys and any other type are refused, since they
    can never equal JSON-decoded expected data in the reference either.
    """
    kind = type(value)
    if kind in PLAIN_SCALARS:
        return value
    if kind is list or (top and kind is tuple):
        return [to_plain(v, False) for v in value]
    if kind is dict:
        if not all(type(k) is str for k in value):
            raise TypeError("dict with non-str keys")
        return {k: to_plain(v, False) for k, v in value.items()}
    if kind.__module__ == "numpy" and hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return to_plain(value.item(), top)
    raise TypeError(f"return value of type {kind.__name__} is not plain data")


def _install_stdio():
    sys.stdin = io.TextIOWrapper(io.BufferedReader(io.FileIO(0, "r", closefd=False)),
                                 encoding="utf-8", errors="surrogateescape")
    sys.stdout = io.TextIOWrapper(io.BufferedWriter(io.FileIO(1, "w", closefd=False)),
                                  encoding="utf-8", errors="backslashreplace")
    sys.stderr = io.TextIOWrapper(io.BufferedWriter(io.FileIO(2, "w", closefd=False)),
                                  encoding="utf-8", errors="backslashreplace", line_buffering=True)
    sys.__stdin__, sys.__stdout__, sys.__stderr__ = sys.stdin, sys.stdout, sys.stderr


def _run_program(job, test):
    """Compile and execute the program for one test; report through STATUS_FD."""
    kind = job["kind"]
    try:
        code = compile(job["code"], "<solution>", "exec", dont_inherit=True)
    except BaseException as exc:  # noqa: BLE001 - every compile failure is a syntax error
        payload = _exc_payload(exc)
        payload["outcome"] = "syntax_error"
        _status(payload)
        return
    ns = {"__name__": "__main__" if kind == "stdio" else "solution",
          "__builtins__": __builtins__}
    try:
        if job["prelude"] and kind != "check":
            exec(PRELUDE, ns)
            sys.setrecursionlimit(job["recursion_limit"])
        exec(code, ns)
        if kind == "call":
            fn_name = job["fn_name"]
            target = ns["Solution"]() if "class Solution" in job["code"] else None
            fn = getattr(target, fn_name) if target is not None else ns[fn_name]
            value = fn(*test["args"])
            try:
                encoded = json.dumps(to_plain(value))
            except (TypeError, ValueError) as exc:
                _status({"outcome": "unplain", "message": str(exc)[:MESSAGE_CHARS]})
                return
            _status({"outcome": "ok", "value": encoded})
            return
        if kind == "check":
            exec(compile(test["test"], "<test>", "exec", dont_inherit=True), ns)
            ns["check"](ns[test["entry_point"]])
        sys.stdout.flush()
    except SystemExit:
        if kind != "stdio":
            _status({"outcome": "exception", "exc_type": "SystemExit",
                     "message": "SystemExit before the test finished"})
            return
        try:
            sys.stdout.flush()
        except BaseException as exc:  # noqa: BLE001
            _status(_exc_payload(exc))
            return
    except BaseException as exc:  # noqa: BLE001 - report whatever the program raised
        _status(_exc_payload(exc))
        return
    _status({"outcome": "ok"})


def _child(job, test, fds, privileged, workdir, runner_pid):
    """In the forked child: confine, then run. Never returns."""
    try:
        os.setsid()
        stdin_fd, out_w, err_w, st_w = fds
        os.dup2(stdin_fd, 0)
        os.dup2(out_w, 1)
        os.dup2(err_w, 2)
        os.dup2(st_w, STATUS_FD)
        os.closerange(STATUS_FD + 1, 65536)
        limits = job["limits"]
        cpu = int(math.ceil(job["time_limit_s"])) + 1
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        resource.setrlimit(resource.RLIMIT_NOFILE, (limits["nofile"], limits["nofile"]))
        if limits["fsize"]:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limits["fsize"], limits["fsize"]))
        if limits["stack"]:
            resource.setrlimit(resource.RLIMIT_STACK, (limits["stack"], limits["stack"]))
        if limits["as"]:
            resource.setrlimit(resource.RLIMIT_AS, (limits["as"], limits["as"]))
        # RLIMIT_NPROC counts every task of the real uid: with a uid of our own it is exact,
        # without one it is offset by what the user already runs (root ignores it).
        nproc = limits["nproc"] + (0 if privileged else job["user_tasks"])
        resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
        if privileged:
            uid, gid = job["uid"], job["gid"]
            os.setgroups([])
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
            if os.getuid() != uid or os.geteuid() != uid or os.getgid() != gid:
                os._exit(121)
        prctl(PR_SET_NO_NEW_PRIVS, 1)
        # Set after the uid change, which clears it.
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != runner_pid:
            os._exit(122)
        os.chdir(workdir)
        os.environ.clear()
        os.environ.update({"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": workdir,
                           "TMPDIR": workdir, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"})
        _install_stdio()
        _run_program(job, test)
    except BaseException:  # noqa: BLE001 - a child must never return into the runner
        os._exit(123)
    os._exit(0)


# ---------------------------------------------------------------------------------------------
# One test (runner side)


def _stdin_fd(data):
    """A file descriptor that reads ``data`` from the start (a memfd: nothing on disk)."""
    try:
        fd = os.memfd_create("stdin", 0)
    except (AttributeError, OSError):  # very old kernels: an unlinked temporary file
        import tempfile

        with tempfile.TemporaryFile() as f:
            fd = os.dup(f.fileno())
    _write_all(fd, data.encode("utf-8", "surrogateescape"))
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def run_test(job, test, privileged, workdir):
    """Fork, confine and watch one test; returns the result record (no verdict)."""
    kind = job["kind"]
    stdin_fd = _stdin_fd(test.get("stdin", "")) if kind == "stdio" else os.open(
        os.devnull, os.O_RDONLY)
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    st_r, st_w = os.pipe()
    runner_pid = os.getpid()
    t0 = time.monotonic()
    pid = os.fork()
    if pid == 0:
        _child(job, test, (stdin_fd, out_w, err_w, st_w), privileged, workdir, runner_pid)
    for fd in (stdin_fd, out_w, err_w, st_w):
        os.close(fd)
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        pidfd = None

    cap = job["limits"]["output_bytes"]
    bufs = {out_r: bytearray(), err_r: bytearray(), st_r: bytearray()}
    total = 0
    verdict = None  # runner-imposed outcome: timeout / output_limit
    status = None
    poller = select.poll()
    for fd in bufs:
        poller.register(fd, select.POLLIN)
    if pidfd is not None:
        poller.register(pidfd, select.POLLIN)
    deadline = t0 + job["time_limit_s"]
    open_fds = set(bufs)
    while status is None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            verdict = "timeout"
            break
        wait_ms = remaining * 1000 if pidfd is not None else min(remaining * 1000, 5)
        for fd, _ in poller.poll(max(1, int(math.ceil(wait_ms)))):
            if fd == pidfd:
                continue
            chunk = os.read(fd, READ_CHUNK)
            if not chunk:
                poller.unregister(fd)
                open_fds.discard(fd)
                continue
            total += len(chunk)
            if fd == err_r:
                bufs[fd] = (bufs[fd] + chunk)[-4096:]
            else:
                bufs[fd] += chunk
            if total > cap:
                verdict = "output_limit"
                break
        if verdict:
            break
        done, status_code = os.waitpid(pid, os.WNOHANG)
        if done:
            status = status_code
    wall = time.monotonic() - t0
    if status is None:
        try:
            os.killpg(pid, signal.SIGKILL)
        except OSError:
            pass
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
    else:
        # Drain what the child wrote just before exiting, without waiting on any grandchild
        # that may still hold the pipes open.
        for fd in list(open_fds):
            os.set_blocking(fd, False)
            try:
                while total <= cap:
                    chunk = os.read(fd, READ_CHUNK)
                    if not chunk:
                        break
                    total += len(chunk)
                    bufs[fd] += chunk
            except BlockingIOError:
                pass
        if total > cap:
            verdict = "output_limit"
    for fd in bufs:
        os.close(fd)
    if pidfd is not None:
        os.close(pidfd)

    record = {"wall_s": wall, "stderr": bytes(bufs[err_r][-1000:]).decode("utf-8", "replace")}
    if verdict:
        record["outcome"] = verdict
        return record
    line = bytes(bufs[st_r]).split(b"\n", 1)[0]
    payload = None
    if line:
        try:
            payload = json.loads(line)
        except ValueError:
            payload = None
    if isinstance(payload, dict) and isinstance(payload.get("outcome"), str):
        record.update({k: payload[k] for k in ("outcome", "exc_type", "errno", "message", "value")
                       if k in payload})
    elif os.WIFSIGNALED(status):
        record["outcome"] = "signal"
        record["signal"] = os.WTERMSIG(status)
    else:
        record["outcome"] = "exit"
        record["exit_code"] = os.WEXITSTATUS(status)
    if kind == "stdio":
        record["stdout"] = bytes(bufs[out_r]).decode("utf-8", "replace")
    return record


# ---------------------------------------------------------------------------------------------


class _Lines:
    """Unbuffered-by-contract line reader on a file descriptor.

    Its buffer holds only what was read; the parent never writes past a line before it gets an
    answer, so a forked program process and the server never read each other's bytes.
    """

    def __init__(self, fd):
        self.fd = fd
        self.buf = bytearray()

    def readline(self):
        while True:
            nl = self.buf.find(b"\n")
            if nl >= 0:
                line = bytes(self.buf[:nl])
                del self.buf[: nl + 1]
                return line
            chunk = os.read(self.fd, 1 << 20)
            if not chunk:
                return None
            self.buf += chunk


def _send(obj):
    _write_all(1, (json.dumps(obj) + "\n").encode())


def run_job(job, lines):
    """One program (in its own forked process): isolate, run the tests, clean up."""
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    prctl(PR_SET_CHILD_SUBREAPER, 1)
    privileged = job["uid"] is not None
    if privileged:
        achieved, workdir = setup_isolation(job)
        # No ptrace, no /proc/<pid>/{mem,fd} for anyone without CAP_SYS_PTRACE.
        prctl(PR_SET_DUMPABLE, 0)
    else:
        achieved, workdir = ["rlimits", "session"], job["workdir"]
        job["user_tasks"] = user_tasks(os.getuid())
    _send({"hello": achieved})
    uid = job["uid"] if privileged else None
    last = len(job["tests"]) - 1
    try:
        for i, test in enumerate(job["tests"]):
            record = run_test(job, test, privileged, workdir)
            cleanup(uid)
            record["i"] = i
            _send(record)
            # No control line after the last test: the parent sends none.
            if i == last or lines.readline() != b"1":
                break
    finally:
        clean = cleanup(uid)
    return clean


def serve():
    """Run jobs from stdin until it closes; each job in a fresh forked process.

    The server itself never runs untrusted code, so it stays clean between programs and the
    interpreter start-up and imports are paid once per worker slot, not once per program.
    """
    for name in PRELUDE_MODULES + ("typing",):
        __import__(name)
    prctl(PR_SET_CHILD_SUBREAPER, 1)
    lines = _Lines(0)
    while True:
        line = lines.readline()
        if line is None:
            return 0
        try:
            job = json.loads(line)
            if not isinstance(job, dict) or "tests" not in job:
                raise ValueError("not a job")
        except ValueError as e:
            _send({"ended": True, "error": f"bad job line: {e}"})
            continue
        if job["uid"] is not None and os.geteuid() != 0:
            _send({"ended": True, "error": "privileged mode needs root"})
            continue
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = 0 if run_job(job, lines) else 2
            except BaseException:  # noqa: BLE001 - report through the exit status
                traceback.print_exc()
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        if status != 0 or has_children():
            # The program process died early or could not reap everything: what it left is
            # ours now (subreaper).
            cleanup(job["uid"], patience_s=5.0)
        _send({"ended": True, "status": status})


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--kill-uid":
        # Used by the parent when a server died before cleaning up after its program.
        kill_uid(int(sys.argv[2]))
        sys.exit(0)
    sys.exit(serve())
