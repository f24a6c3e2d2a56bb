"""In-sandbox driver: runs one untrusted program against its tests, one forked child per test.

`codescaler_jax.code.sandbox` starts this file as ``python -I -B runner.py`` in a new session, once
per worker slot: a server that reads jobs from stdin and forks one process per program, so the
interpreter start-up and imports are paid once. It imports only the standard library (``-I``
keeps the package off ``sys.path`` on purpose) and never runs untrusted code itself.

Three modes (``job["mode"]``):

``uid`` (root). The program process stays root, outside the reach of the program, and:
- moves into new network, mount, ipc and uts namespaces and pivots into a new root built from
  scratch (`build_root`: the system directories and the interpreter's own, read-only; a
  minimal /dev; a private tmpfs /tmp and /dev/shm that vanish with the namespace; /proc
  mounted with hidepid so other users' processes are invisible); home directories, the run
  directory and everything else do not exist there;
- becomes a child subreaper, so every process the program leaves behind is re-parented to it;
- forks one child per test, which calls setsid, drops to the sandbox uid (no supplementary
  groups, no-new-privs, parent-death signal), applies rlimits (address space, processes,
  file size, CPU, open files, core 0) and executes the program;
- enforces the wall-clock limit and the output cap itself, and after every test kills every
  process of the sandbox uid at once (a helper that becomes the uid and calls kill(-1, SIGKILL),
  which the kernel applies atomically, so fork bombs and setsid/double-fork escapees die too),
  then reaps them.

``userns`` (an ordinary user; needs unprivileged user namespaces). The program process creates
new user, mount, network, pid, ipc and uts namespaces (the user's uid maps to itself, so files
keep their owner), then forks the namespace's init (pid 1), which:
- pivots into the same new root (`build_root`): /usr, /etc and the top-level links to them
  bound read-only, the interpreter's own directories (prefixes and the ``sys.path`` entries
  under them) bound read-only at their paths, a minimal /dev (null, zero, full, random,
  urandom; a private tmpfs /dev/shm), a fresh /proc of the new pid namespace, and a private
  tmpfs /tmp. Nothing else exists there: home directories, the run directory, /work, /var,
  /run (and its sockets), /mnt, /sys are absent, not merely read-only;
- forbids nested user namespaces (user.max_user_namespaces=0 inside) and sets the hostname;
- forks one child per test, which drops every capability (bounding set included), sets
  no-new-privs and the rlimits (RLIMIT_NPROC counts per user namespace, so it is exact);
- after every test calls kill(-1, SIGKILL) as pid 1, which kills every other process of the
  namespace at once, and reaps them; when init exits the kernel kills whatever is left.
The program cannot signal or see anything outside (another pid namespace), cannot reach the
network (an empty network namespace), and cannot undo the mounts (no capabilities; mounts are
locked in any namespace it could create).

``none`` (weak; only when the configuration accepts it): what an unprivileged process can do
alone: its own session and process group per test, rlimits, a scrubbed environment, a
temporary working directory given by the parent, and killing every descendant it can find (it
is still their subreaper). The program can then reach the network, write wherever the user
can, and kill the runner.

Verdicts. The runner never sees expected outputs for stdio and call-based tests: it reports
what the program printed or returned (return values serialised as JSON of plain data) and the
parent judges it. HumanEval-style tests (``check(candidate)`` with asserts) run in two processes:
the candidate process loads the program and answers calls; a separate judge process runs the
test code with ``candidate`` (and any other program function the test uses that is not a
builtin or defined by the trusted prompt) replaced by proxies that send plain-data arguments to
the candidate process and get plain-data results back, decoded into exact builtin types in the
judge. The candidate is forked before the runner reads the test text from its stdin, so the test
(and its expected values) never enters the candidate's memory; the judge is not dumpable, so
the candidate cannot read or trace it, and its verdict leaves through a pipe the candidate does
not hold. See `codescaler_jax.code.sandbox` for the threat model.

``runner.py --kill-uid UID`` (as root) only kills every process of UID. ``runner.py --probe``
tries the userns set-up in a throw-away child and prints the outcome as JSON.

Protocol, per job: stdin carries the job as a ``<length>\\n<JSON>`` frame (for a check test
followed at once by a frame ``{"test": ..., "prompt": ...}``, which the runner reads only after
forking the candidate process), then one control line per finished test (``1`` = continue,
anything else = stop). stdout carries JSON lines: a ``hello`` line (the isolation that was
achieved) or an ``error`` line, one result line per test, and an ``ended`` line once the program
process is gone.
"""

import builtins
import ctypes
import errno as errno_mod
import fcntl
import io
import json
import math
import os
import platform
import resource
import select
import signal
import sys
import time
import traceback
import types

# Linux constants (not all exposed by the os module on Python 3.11).
CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
USERNS_FLAGS = CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC
USERNS_FLAGS |= CLONE_NEWUTS
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC = 32, 1024, 2048, 4096, 16384
MS_PRIVATE, MS_RELATIME, MS_STRICTATIME = 1 << 18, 1 << 21, 1 << 24
MNT_DETACH = 2
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_CAPBSET_DROP = 1, 4, 24
PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS, PR_CAP_AMBIENT = 36, 38, 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
LINUX_CAPABILITY_VERSION_3 = 0x20080522
SYSCALLS = {"x86_64": {"pivot_root": 155, "capset": 126},
            "aarch64": {"pivot_root": 41, "capset": 91}}

STATUS_FD = 3  # where a child writes its one status line (the judge: its verdict)
CALL_FD = 4  # judge -> candidate requests (the candidate reads it)
REPLY_FD = 5  # candidate -> judge replies (the judge reads it); in the candidate it is fd 3
READ_CHUNK = 1 << 16
MESSAGE_CHARS = 2000
USERNS_NPROC_SLACK = 2  # the program process and init count in the namespace's RLIMIT_NPROC

# Top-level entries of the host root that the userns view keeps (read-only): the system's
# programs, libraries and configuration. Everything else is absent.
SYSTEM_DIRS = ("usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32", "etc")
DEV_NODES = ("null", "zero", "full", "random", "urandom")

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
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


class IsolationError(OSError):
    """A step of the userns set-up failed: ``step`` names it, ``errno`` says why."""

    def __init__(self, step, err=None):
        err = ctypes.get_errno() if err is None else err
        super().__init__(err, f"{step}: {os.strerror(err) if err else 'failed'}")
        self.step = step


def _enc(s):
    return None if s is None else os.fsencode(s)


def mount(source, target, fstype, flags, data=None):
    """mount(2); True on success."""
    return _libc.mount(_enc(source), _enc(target), _enc(fstype), flags, _enc(data)) == 0


def must_mount(source, target, fstype, flags, data=None):
    if not mount(source, target, fstype, flags, data):
        raise IsolationError(f"mount {fstype or source} on {target}")


def prctl(option, arg, arg2=0):
    return _libc.prctl(option, arg, arg2, 0, 0) == 0


def _syscall(name, *args):
    number = SYSCALLS.get(platform.machine(), {}).get(name)
    if number is None:
        ctypes.set_errno(errno_mod.ENOSYS)
        return -1
    return _libc.syscall(number, *args)


def _pivot_root(new_root, put_old):
    if hasattr(_libc, "pivot_root"):
        return _libc.pivot_root(_enc(new_root), _enc(put_old))
    return _syscall("pivot_root", ctypes.c_char_p(_enc(new_root)), ctypes.c_char_p(_enc(put_old)))


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def drop_capabilities():
    """Empty the bounding, ambient, effective, permitted and inheritable capability sets."""
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            last = int(f.read())
    except (OSError, ValueError):
        last = 63
    for cap in range(last + 1):
        prctl(PR_CAPBSET_DROP, cap)
    prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    header, data = _CapHeader(LINUX_CAPABILITY_VERSION_3, 0), (_CapData * 2)()
    if hasattr(_libc, "capset"):
        rc = _libc.capset(ctypes.byref(header), data)
    else:
        rc = _syscall("capset", ctypes.byref(header), data)
    return rc == 0


# ---------------------------------------------------------------------------------------------
# Isolation set-up: the filesystem view (both modes)


def _mountinfo():
    """Mount points and their per-mount options, from /proc/self/mountinfo."""
    points = []
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            fields = line.split(b" ")
            point = fields[4].decode("unicode_escape") if b"\\" in fields[4] else fields[4]
            points.append((os.fsdecode(point), fields[5].decode().split(",")))
    return points


def _remount_readonly(writable=()):
    """Make every mount of this (private) namespace read-only except ``writable`` points.

    Returns the points that could not be remounted. A mount inherited into a user namespace
    keeps its locked flags (nosuid, nodev, noexec, atime), so they are passed back unchanged.
    """
    opt_flags = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC,
                 "noatime": MS_NOATIME, "nodiratime": MS_NODIRATIME, "relatime": MS_RELATIME,
                 "strictatime": MS_STRICTATIME}
    failed = []
    for point, options in _mountinfo():
        if point in writable:
            continue
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID
        for opt in options:
            flags |= opt_flags.get(opt, 0)
        if not mount(None, point, None, flags):
            failed.append(point)
    return failed


def interpreter_paths():
    """The directories the interpreter needs, as a minimal set of real paths.

    Its prefixes (a virtualenv and its base), the executable's directory, and the ``sys.path``
    entries under those prefixes or named site-/dist-packages. Entries outside (a checkout put
    on the path by an editable install, say) are left out: the program needs the standard
    library and the installed packages, not the user's files.
    """
    prefixes = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix,
                                               sys.base_exec_prefix)}
    prefixes.add(os.path.dirname(os.path.realpath(sys.executable)))
    keep = set(prefixes)
    for p in sys.path:
        if not p or not os.path.isdir(p):
            continue
        real = os.path.realpath(p)
        if (any(real == q or real.startswith(q.rstrip("/") + "/") for q in prefixes)
                or os.path.basename(real) in ("site-packages", "dist-packages")):
            keep.add(real)
    keep.discard("/")
    cover = []
    for p in sorted(keep, key=len):
        if not any(p == c or p.startswith(c + "/") for c in cover):
            cover.append(p)
    return cover


def _in_system_dirs(path):
    """Whether ``path`` (a real path) is visible in the new root through a system directory."""
    return path.strip("/").split("/", 1)[0] in SYSTEM_DIRS


def _bind(fd, target, *, is_dir=True):
    if is_dir:
        os.makedirs(target, 0o755, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(target), 0o755, exist_ok=True)
        os.close(os.open(target, os.O_CREAT | os.O_WRONLY, 0o644))
    must_mount(f"/proc/self/fd/{fd}", target, None, MS_BIND | MS_REC)


def _mount_proc(target, options):
    for opts in options:
        if mount("proc", target, "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, opts):
            return opts
    raise IsolationError(f"mount proc on {target}")


def build_root(job, proc_options):
    """In a private mount namespace: build a new root from scratch and pivot into it.

    The new root holds only: the system directories (`SYSTEM_DIRS`, bound recursively), the
    interpreter's directories (`interpreter_paths`) at their own paths (inside the private /tmp
    when they live under /tmp, as a virtualenv in a temporary clone does), a minimal /dev with
    a private /dev/shm, a fresh /proc (mounted with the first of ``proc_options`` that works)
    and a private tmpfs /tmp. Intermediate directories are new (mode 0755), so a dropped uid
    can reach the interpreter under /root without seeing anything else there. It is a tmpfs
    mounted on /tmp, so host /tmp is never visible; every source is opened (O_PATH) before
    anything is mounted over it and bound from its descriptor. Everything is remounted
    read-only except /tmp and /dev/shm. Returns the proc options used.
    """
    must_mount(None, "/", None, MS_REC | MS_PRIVATE)
    sources = {}  # path -> O_PATH descriptor, bound at the same path in the new root
    links, devs = {}, {}
    try:
        for name in sorted(os.listdir("/")):
            if name not in SYSTEM_DIRS:
                continue
            path = "/" + name
            if os.path.islink(path):
                links[name] = os.readlink(path)
            elif os.path.isdir(path):
                sources[path] = os.open(path, os.O_PATH)
        for path in interpreter_paths():
            if not _in_system_dirs(path):
                sources[path] = os.open(path, os.O_PATH)
        for name in DEV_NODES:
            if os.path.exists(f"/dev/{name}"):
                devs[name] = os.open(f"/dev/{name}", os.O_PATH)
        root = "/tmp"
        must_mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
        for name, target in links.items():
            os.symlink(target, f"{root}/{name}")
        # System directories first, then the interpreter's (which may lie under /tmp, i.e.
        # inside the private /tmp mounted in between).
        for path in sorted(p for p in sources if _in_system_dirs(p)):
            _bind(sources[path], root + path)
        os.makedirs(f"{root}/tmp", 0o755)
        must_mount("tmpfs", f"{root}/tmp", "tmpfs", MS_NOSUID | MS_NODEV,
                   f"size={job['tmpfs_mb']}m,mode=1777")
        for path in sorted(p for p in sources if not _in_system_dirs(p)):
            _bind(sources[path], root + path)
        os.makedirs(f"{root}/dev", 0o755)
        must_mount("tmpfs", f"{root}/dev", "tmpfs", MS_NOSUID | MS_NOEXEC, "size=64k,mode=0755")
        for name, fd in devs.items():
            _bind(fd, f"{root}/dev/{name}", is_dir=False)
        for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                             ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
            os.symlink(target, f"{root}/dev/{name}")
        os.makedirs(f"{root}/dev/shm", 0o755)
        must_mount("tmpfs", f"{root}/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC,
                   f"size={job['shm_mb']}m,mode=1777")
        os.makedirs(f"{root}/proc", 0o755)
        used = _mount_proc(f"{root}/proc", proc_options)
    finally:
        for fd in list(sources.values()) + list(devs.values()):
            os.close(fd)
    os.chdir(root)
    # pivot_root(".", "."): the old root ends up on top of the new one and is detached at once.
    if _pivot_root(".", ".") != 0:
        raise IsolationError("pivot_root")
    if _libc.umount2(b".", MNT_DETACH) != 0:
        raise IsolationError("umount old root")
    os.chdir("/")
    return used


def setup_isolation(job):
    """uid mode (root): namespaces and the new root; returns the features and the workdir.

    Without a mount namespace (seccomp, some containers) the working directory is a host
    temporary directory owned by the sandbox uid, and the missing features are reported.
    """
    achieved = ["uid", "rlimits", "session"]
    if _libc.unshare(CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS) == 0:
        achieved += ["netns", "mntns", "ipcns", "utsns"]
        _libc.sethostname(b"sandbox", 7)
    elif _libc.unshare(CLONE_NEWNS) == 0:
        achieved.append("mntns")
    workdir = job["workdir"]
    if "mntns" in achieved:
        proc_options = build_root(job, ("hidepid=invisible", "hidepid=2", None))
        achieved += ["new_root", "private_tmp", "private_shm", "hidepid"] if proc_options else [
            "new_root", "private_tmp", "private_shm"]
        failed = _remount_readonly(writable=("/tmp", "/dev/shm"))
        if failed:
            raise IsolationError(f"remount read-only {failed[0]}", errno_mod.EPERM)
        achieved.append("readonly_fs")
        workdir = "/tmp/work"
        os.mkdir(workdir, 0o700)
    os.chown(workdir, job["uid"], job["gid"])
    return achieved, workdir


# ---------------------------------------------------------------------------------------------
# Isolation set-up: userns mode (runner is an ordinary user)


def enter_userns():
    """unshare(2) user/mount/net/pid/ipc/uts namespaces and map the caller's uid/gid to itself."""
    uid, gid = os.getuid(), os.getgid()
    if _libc.unshare(USERNS_FLAGS) != 0:
        raise IsolationError("unshare(CLONE_NEWUSER|NEWNS|NEWNET|NEWPID|NEWIPC|NEWUTS)")
    for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1\n"),
                       ("gid_map", f"{gid} {gid} 1\n")):
        try:
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
        except OSError as e:
            raise IsolationError(f"write /proc/self/{name}", e.errno) from None


def setup_userns(job):
    """As init (pid 1) of the new namespaces: the new root and the rest; features, workdir."""
    build_root(job, (None,))
    achieved = ["userns", "mntns", "netns", "pidns", "ipcns", "utsns", "rlimits", "session",
                "no_caps", "new_root", "private_tmp", "private_shm"]
    # No nested user namespaces: one less kernel surface for the program (the mounts would
    # stay locked in one anyway). This is our user namespace's own limit, not the host's.
    try:
        with open("/proc/sys/user/max_user_namespaces", "w") as f:
            f.write("0")
        achieved.append("no_nested_userns")
    except OSError:
        pass
    _libc.sethostname(b"sandbox", 7)
    failed = _remount_readonly(writable=("/tmp", "/dev/shm"))
    if failed:
        raise IsolationError(f"remount read-only {failed[0]}", errno_mod.EPERM)
    achieved.append("readonly_fs")
    workdir = "/tmp/work"
    os.mkdir(workdir, 0o700)
    return achieved, workdir


def probe_userns():
    """Try the whole userns set-up in a throw-away child; returns {"ok", "features"|"error"}."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        result = {"ok": False, "error": "unknown failure"}
        try:
            enter_userns()
            init = os.fork()
            if init == 0:
                try:
                    features, _ = setup_userns({"tmpfs_mb": 1, "shm_mb": 1})
                    payload = {"ok": True, "features": features}
                except OSError as e:
                    payload = {"ok": False, "error": str(e), "errno": e.errno}
                except Exception as e:  # noqa: BLE001 - reported, never raised into the caller
                    payload = {"ok": False, "error": repr(e)}
                _write_all(w, json.dumps(payload).encode())
                os._exit(0)
            os.waitpid(init, 0)
            os._exit(0)
        except OSError as e:
            result = {"ok": False, "error": str(e), "errno": e.errno}
        except Exception as e:  # noqa: BLE001
            result = {"ok": False, "error": repr(e)}
        _write_all(w, json.dumps(result).encode())
        os._exit(0)
    os.close(w)
    data = b""
    while chunk := os.read(r, READ_CHUNK):
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    try:
        return json.loads(data)
    except ValueError:
        return {"ok": False, "error": "the probe process died"}


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


def _kill_everything(mode, uid):
    if mode == "uid":
        kill_uid(uid)
    elif mode == "userns" and os.getpid() == 1:
        # As init of our own pid namespace: every other process of the namespace, at once.
        os.kill(-1, signal.SIGKILL)
    else:
        for kid in _children_of(os.getpid()):
            try:
                os.kill(kid, signal.SIGKILL)
            except OSError:
                pass


def cleanup(mode, uid, patience_s=1.0):
    """Kill everything the program left and reap it all; True when nothing is left.

    Every process the program started is in this process's subtree: as child subreaper (or
    init of the pid namespace) it inherits the orphans, setsid and double-fork ones included.
    So no child means nothing is left, and the common case costs one waitid. Otherwise one
    kill(-1) catches everything at once (as the sandbox uid, or as init of the namespace);
    without either, the children are killed one by one (their orphans come back to us and are
    killed in the next round).
    """
    deadline = time.monotonic() + patience_s
    while has_children():
        _kill_everything(mode, uid)
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
# Plain data: what may cross from the program to a verdict


PLAIN_SCALARS = (type(None), bool, int, float, str)


def _numpy_scalar(value):
    kind = type(value)
    return (getattr(kind, "__module__", "") == "numpy" and hasattr(value, "item")
            and getattr(value, "ndim", 1) == 0)


def to_plain(value, top=True):
    """The value as plain JSON data, or raise TypeError (custom types could fake ``==``).

    For call-based tests, whose expected values are JSON. A top-level tuple becomes a list (the
    reference does the same); numpy scalars become Python scalars. Nested tuples, sets, non-str
    dict keys and any other type are refused, since they can never equal JSON-decoded expected
    data in the reference either. Runs in the program's process, so it only gives good error
    messages: the parent decodes the JSON itself, which can only ever be plain data.
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
    if _numpy_scalar(value):
        return to_plain(value.item(), top)
    raise TypeError(f"return value of type {kind.__name__} is not plain data")


def encode_plain(value):
    """Exact builtin data (None, bool, int, float, complex, str, bytes, list, tuple, dict, set,
    frozenset; numpy scalars as Python scalars) as JSON-able tagged data; TypeError otherwise.

    JSON lists are lists; every other container is a one-key object naming its type, so a
    tuple stays a tuple and dict keys may be any plain hashable value.
    """
    kind = type(value)
    if kind in PLAIN_SCALARS:
        return value
    if kind is list:
        return [encode_plain(v) for v in value]
    if kind is tuple:
        return {"tuple": [encode_plain(v) for v in value]}
    if kind is dict:
        return {"dict": [[encode_plain(k), encode_plain(v)] for k, v in value.items()]}
    if kind is set or kind is frozenset:
        return {kind.__name__: [encode_plain(v) for v in value]}
    if kind is bytes:
        return {"bytes": value.hex()}
    if kind is complex:
        return {"complex": [value.real, value.imag]}
    if _numpy_scalar(value):
        return encode_plain(value.item())
    raise TypeError(f"a value of type {kind.__name__} is not plain data")


def decode_plain(obj):
    """Inverse of `encode_plain` on JSON-decoded data; ValueError on anything else.

    Builds exact builtin objects only, so whatever bytes the program sent, ``==``, ``hash``,
    ``len`` and ``isinstance`` on the result are the builtin ones.
    """
    kind = type(obj)
    if kind in PLAIN_SCALARS:
        return obj
    if kind is list:
        return [decode_plain(v) for v in obj]
    if kind is dict and len(obj) == 1:
        ((tag, v),) = obj.items()
        if tag == "bytes" and type(v) is str:
            return bytes.fromhex(v)
        if type(v) is not list:
            raise ValueError(f"bad {tag!r} value")
        if tag == "tuple":
            return tuple(decode_plain(x) for x in v)
        if tag == "dict":
            if not all(type(p) is list and len(p) == 2 for p in v):
                raise ValueError("bad dict items")
            return {decode_plain(k): decode_plain(x) for k, x in v}
        if tag == "set":
            return {decode_plain(x) for x in v}
        if tag == "frozenset":
            return frozenset(decode_plain(x) for x in v)
        if tag == "complex" and len(v) == 2 and all(type(x) in (int, float) for x in v):
            return complex(v[0], v[1])
    raise ValueError(f"not plain data: {kind.__name__}")


# ---------------------------------------------------------------------------------------------
# Child side (runs the untrusted program, or the judge)


def _write_all(fd, data):
    while data:
        n = os.write(fd, data)
        data = data[n:]


def _status(payload, fd=STATUS_FD):
    try:
        _write_all(fd, (json.dumps(payload) + "\n").encode())
    except Exception:  # noqa: BLE001 - the program may have closed or filled the status pipe
        pass


def _reply(payload):
    """A candidate's message to the judge; if the program broke the means to send it (patched
    json, builtins, a closed pipe), end the process so the judge sees it gone, not silent."""
    try:
        _write_all(STATUS_FD, (json.dumps(payload) + "\n").encode())
    except BaseException:  # noqa: BLE001
        os._exit(125)


def _exc_payload(exc):
    text = "".join(traceback.format_exception_only(type(exc), exc)).strip()
    errno_ = getattr(exc, "errno", None)
    return {"outcome": "exception", "exc_type": type(exc).__name__,
            "errno": errno_ if isinstance(errno_, int) else None,
            "message": text[-MESSAGE_CHARS:]}


def _install_stdio():
    sys.stdin = io.TextIOWrapper(io.BufferedReader(io.FileIO(0, "r", closefd=False)),
                                 encoding="utf-8", errors="surrogateescape")
    sys.stdout = io.TextIOWrapper(io.BufferedWriter(io.FileIO(1, "w", closefd=False)),
                                  encoding="utf-8", errors="backslashreplace")
    sys.stderr = io.TextIOWrapper(io.BufferedWriter(io.FileIO(2, "w", closefd=False)),
                                  encoding="utf-8", errors="backslashreplace", line_buffering=True)
    sys.__stdin__, sys.__stdout__, sys.__stderr__ = sys.stdin, sys.stdout, sys.stderr


def _compile_program(job):
    """The program's code object, or None after reporting a syntax error on STATUS_FD."""
    try:
        return compile(job["code"], "<solution>", "exec", dont_inherit=True)
    except BaseException as exc:  # noqa: BLE001 - every compile failure is a syntax error
        payload = _exc_payload(exc)
        payload["outcome"] = "syntax_error"
        _status(payload)
        return None


def _run_program(job, test):
    """Compile and execute the program for one stdio or call test; report through STATUS_FD."""
    kind = job["kind"]
    code = _compile_program(job)
    if code is None:
        return
    ns = {"__name__": "__main__" if kind == "stdio" else "solution", "__builtins__": builtins}
    try:
        if job["prelude"]:
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
        sys.stdout.flush()
    except SystemExit:
        if kind != "stdio":
            _status({"outcome": "exit_early", "message": "SystemExit before the test finished"})
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


def _no_int_digit_limit():
    # Values cross as JSON text: a big int must survive the trip, as it would in-process.
    if hasattr(sys, "set_int_max_str_digits"):
        sys.set_int_max_str_digits(0)


class _LineReader:
    """Newline-framed reads from a raw fd, refusing lines over ``cap`` bytes."""

    def __init__(self, fd, cap):
        self.fd, self.cap, self.buf = fd, cap, bytearray()

    def readline(self):
        while True:
            nl = self.buf.find(b"\n")
            if nl >= 0:
                line = bytes(self.buf[:nl])
                del self.buf[: nl + 1]
                return line
            if len(self.buf) > self.cap:
                raise ValueError(f"message over {self.cap} bytes")
            chunk = os.read(self.fd, READ_CHUNK)
            if not chunk:
                return None
            self.buf += chunk


def _serve_candidate(job):
    """Candidate side of a check test: load the program, then answer calls from the judge.

    Replies go to STATUS_FD (here: the reply pipe), requests come on CALL_FD. Nothing here is
    trusted by the judge beyond its plain-data content.
    """
    _no_int_digit_limit()
    code = _compile_program(job)
    if code is None:
        return
    ns = {"__name__": "solution", "__builtins__": builtins}
    try:
        exec(code, ns)
    except SystemExit:
        _status({"outcome": "exit_early", "message": "SystemExit while loading the program"})
        return
    except BaseException as exc:  # noqa: BLE001
        _status(_exc_payload(exc))
        return
    callables = sorted(k for k, v in ns.items() if type(k) is str and callable(v))
    _reply({"loaded": True, "callables": callables})
    requests = _LineReader(CALL_FD, job["limits"]["output_bytes"])
    while True:
        line = requests.readline()
        if line is None:
            return
        request = json.loads(line)
        try:
            fn = ns[request["call"]]
            args = decode_plain(request["args"])
            kwargs = decode_plain(request["kwargs"])
            value = fn(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - the judge re-raises it on its side
            payload = _exc_payload(exc)
            _reply({"raised": payload["exc_type"], "errno": payload["errno"],
                    "message": payload["message"]})
            if isinstance(exc, SystemExit | KeyboardInterrupt):
                return
            continue
        try:
            encoded = encode_plain(value)
        except (TypeError, ValueError, RecursionError) as exc:
            _reply({"unplain": str(exc)[:MESSAGE_CHARS]})
            continue
        _reply({"value": encoded})


class CandidateFailed(BaseException):  # noqa: N818 - not an Exception: tests cannot catch it
    """Raised in the judge when the candidate cannot give a plain answer (or is gone).

    A BaseException, so a test's ``except Exception`` cannot swallow it and pass anyway.
    """


class _Judge:
    """Judge side of a check test: proxies that call into the candidate process."""

    def __init__(self, cap):
        self.replies = _LineReader(REPLY_FD, cap)
        self.failure = None  # (outcome, message) once the candidate failed to answer plainly

    def fail(self, outcome, message):
        if self.failure is None:
            self.failure = (outcome, message)
        raise CandidateFailed(message)

    def read(self):
        try:
            line = self.replies.readline()
        except (OSError, ValueError) as e:
            self.fail("unplain", f"unreadable reply from the program ({e})")
        if line is None:
            self.fail("candidate_ended", "the program's process ended before the test finished")
        try:
            msg = json.loads(line)
        except (ValueError, RecursionError):
            self.fail("unplain", "the program sent a reply that is not JSON")
        if type(msg) is not dict:
            self.fail("unplain", "the program sent a reply that is not an object")
        return msg

    def call(self, name, args, kwargs):
        if self.failure is not None:
            raise CandidateFailed(self.failure[1])
        try:
            request = json.dumps({"call": name, "args": encode_plain(args),
                                  "kwargs": encode_plain(kwargs)})
        except (TypeError, ValueError) as e:
            raise _HarnessLimit(f"the test passes a value the sandbox cannot send to the "
                                f"program ({e})") from None
        try:
            _write_all(CALL_FD, (request + "\n").encode())
        except OSError:
            self.fail("candidate_ended", "the program's process ended before the test finished")
        msg = self.read()
        if "value" in msg:
            try:
                return decode_plain(msg["value"])
            except (ValueError, TypeError, RecursionError) as e:
                self.fail("unplain", f"{name} returned something that is not plain data ({e})")
        if "raised" in msg:
            if msg["raised"] in ("SystemExit", "KeyboardInterrupt", "GeneratorExit"):
                self.fail("exit_early", f"{msg['raised']} raised by {name} during the test")
            raise _mirror_exception(msg)
        if "unplain" in msg:
            self.fail("unplain", f"{name} returned {str(msg['unplain'])[:MESSAGE_CHARS]}")
        self.fail("unplain", "the program sent an unexpected reply")

    def proxy(self, name):
        def candidate_proxy(*args, **kwargs):
            return self.call(name, args, kwargs)

        candidate_proxy.__name__ = candidate_proxy.__qualname__ = name
        return candidate_proxy


class _HarnessLimit(Exception):  # noqa: N818
    """The test needs something the two-process check cannot do (reported as sandbox_error)."""


def _mirror_exception(msg):
    """The program's exception re-created in the judge: the builtin Exception class of that
    name (so a test expecting ValueError sees one), else a RuntimeError naming it."""
    name, text = str(msg.get("raised", "")), str(msg.get("message", ""))[:MESSAGE_CHARS]
    cls = getattr(builtins, name, None)
    if isinstance(cls, type) and issubclass(cls, Exception):
        errno_ = msg.get("errno")
        if issubclass(cls, OSError) and isinstance(errno_, int):
            return cls(errno_, text)
        try:
            return cls(text)
        except Exception:  # noqa: BLE001 - e.g. UnicodeDecodeError needs five arguments
            pass
    return RuntimeError(f"{name}: {text}")


def _referenced_names(code):
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _referenced_names(const)
    return names


def _judge_check(job, test):
    """Run ``check(candidate)`` against proxies; the verdict goes to STATUS_FD."""
    _no_int_digit_limit()
    judge = _Judge(job["limits"]["output_bytes"])
    try:
        loaded = judge.read()
    except CandidateFailed:
        _status({"outcome": judge.failure[0], "message": judge.failure[1]})
        return
    if loaded.get("loaded") is not True:
        # The program failed to load: relay what it said, but only as a failure.
        outcome = loaded.get("outcome")
        payload = {"outcome": outcome if outcome in ("syntax_error", "exception", "exit_early")
                   else "unplain", "message": str(loaded.get("message", ""))[:MESSAGE_CHARS]}
        if outcome == "exception":
            payload["exc_type"] = str(loaded.get("exc_type", ""))
            payload["errno"] = loaded["errno"] if type(loaded.get("errno")) is int else None
        _status(payload)
        return
    callables = loaded.get("callables")
    callables = {c for c in callables if type(c) is str} if type(callables) is list else set()
    entry = test["entry_point"]
    ns = {"__name__": "__check__", "__builtins__": builtins}
    try:
        test_code = compile(test["test"], "<test>", "exec", dont_inherit=True)
        if test.get("prompt"):
            # The problem's prompt is trusted data: its helpers (HumanEval's poly,
            # encode_cyclic, ...) are the judge's own, not ones the program may have rigged.
            exec(compile(test["prompt"], "<prompt>", "exec", dont_inherit=True), ns)
    except BaseException as exc:  # noqa: BLE001
        _status({"outcome": "harness_error", "message": f"the test does not load: {exc!r}"})
        return
    # Program functions the test calls by name (never builtins: a program's own `abs` or
    # `isinstance` must not replace the test's), then the entry point itself.
    for name in (_referenced_names(test_code) & callables) - set(dir(builtins)) - set(ns):
        ns[name] = judge.proxy(name)
    if entry in callables:
        ns[entry] = judge.proxy(entry)
    try:
        exec(test_code, ns)
        if entry not in callables:
            raise NameError(f"name {entry!r} is not defined")
        ns["check"](judge.proxy(entry))
    except CandidateFailed:
        pass
    except _HarnessLimit as exc:
        _status({"outcome": "harness_error", "message": str(exc)})
        return
    except BaseException as exc:  # noqa: BLE001 - the test's own verdict (AssertionError, ...)
        if judge.failure is None:
            _status(_exc_payload(exc))
            return
    if judge.failure is not None:
        _status({"outcome": judge.failure[0], "message": judge.failure[1]})
        return
    _status({"outcome": "ok"})


def _remap_fds(mapping):
    """dup2 ``{target: source}`` safely (sources may sit on targets), close everything else."""
    base = max(max(mapping), *mapping.values()) + 1
    high = {t: fcntl.fcntl(s, fcntl.F_DUPFD, base) for t, s in mapping.items()}
    for target, fd in high.items():
        os.dup2(fd, target)
    os.closerange(max(mapping) + 1, 65536)


def _child(job, fds, mode, workdir, runner_pid, body, *, dumpable=True):
    """In a forked child: confine, then run ``body()``. Never returns."""
    try:
        os.setsid()
        _remap_fds(fds)
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
        # in a user namespace it counts that namespace only (plus the program process and
        # init), without either it is offset by what the user already runs (root ignores it).
        nproc = limits["nproc"] + {"uid": 0, "userns": USERNS_NPROC_SLACK}.get(
            mode, job.get("user_tasks", 0))
        resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
        if mode == "uid":
            uid, gid = job["uid"], job["gid"]
            os.setgroups([])
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
            if os.getuid() != uid or os.geteuid() != uid or os.getgid() != gid:
                os._exit(121)
        elif mode == "userns" and not drop_capabilities():
            os._exit(124)
        prctl(PR_SET_NO_NEW_PRIVS, 1)
        # Set after the uid change, which clears it.
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if not dumpable:
            prctl(PR_SET_DUMPABLE, 0)
        if os.getppid() != runner_pid:
            os._exit(122)
        os.chdir(workdir)
        os.environ.clear()
        os.environ.update({"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": workdir,
                           "TMPDIR": workdir, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"})
        _install_stdio()
        body()
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


def _watch(pid, t0, job, out_r, err_r, st_r):
    """Wait for ``pid`` under the wall-clock limit and the output cap, collecting its pipes.

    Returns (wall, wait status, verdict or None, {fd: bytes}).
    """
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
    return wall, status, verdict, {fd: bytes(b) for fd, b in bufs.items()}


def _record(wall, status, verdict, status_line, stderr):
    record = {"wall_s": wall, "stderr": stderr[-1000:].decode("utf-8", "replace")}
    if verdict:
        record["outcome"] = verdict
        return record
    line = status_line.split(b"\n", 1)[0]
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
    return record


def run_test(job, test, mode, workdir):
    """Fork, confine and watch one stdio or call test; returns the result record (no verdict)."""
    stdin_fd = _stdin_fd(test.get("stdin", "")) if job["kind"] == "stdio" else os.open(
        os.devnull, os.O_RDONLY)
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    st_r, st_w = os.pipe()
    runner_pid = os.getpid()
    t0 = time.monotonic()
    pid = os.fork()
    if pid == 0:
        _child(job, {0: stdin_fd, 1: out_w, 2: err_w, STATUS_FD: st_w}, mode, workdir,
               runner_pid, lambda: _run_program(job, test))
    for fd in (stdin_fd, out_w, err_w, st_w):
        os.close(fd)
    wall, status, verdict, bufs = _watch(pid, t0, job, out_r, err_r, st_r)
    record = _record(wall, status, verdict, bufs[st_r], bufs[err_r])
    if job["kind"] == "stdio" and not verdict:
        record["stdout"] = bufs[out_r].decode("utf-8", "replace")
    return record


def run_check_test(job, test, mode, workdir, lines):
    """A check test: fork the candidate, only then fetch the test text, fork the judge."""
    devnull = os.open(os.devnull, os.O_RDONLY)
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    call_r, call_w = os.pipe()
    reply_r, reply_w = os.pipe()
    runner_pid = os.getpid()
    t0 = time.monotonic()
    candidate = os.fork()
    if candidate == 0:
        _child(job, {0: devnull, 1: out_w, 2: err_w, STATUS_FD: reply_w, CALL_FD: call_r}, mode,
               workdir, runner_pid, lambda: _serve_candidate(job))
    # The candidate exists now: the test text read below never enters its memory.
    frame = lines.read_frame()
    test = dict(test, **json.loads(frame)) if frame else None
    if not isinstance(test, dict) or not isinstance(test.get("test"), str):
        raise RuntimeError("no test text from the parent")
    st_r, st_w = os.pipe()
    judge = os.fork()
    if judge == 0:
        _child(job, {0: devnull, 1: out_w, 2: err_w, STATUS_FD: st_w, CALL_FD: call_w,
                     REPLY_FD: reply_r}, mode, workdir, runner_pid,
               lambda: _judge_check(job, test), dumpable=False)
    for fd in (devnull, out_w, err_w, call_r, call_w, reply_r, reply_w, st_w):
        os.close(fd)
    wall, status, verdict, bufs = _watch(judge, t0, job, out_r, err_r, st_r)
    record = _record(wall, status, verdict, bufs[st_r], bufs[err_r])
    done, cstatus = os.waitpid(candidate, os.WNOHANG)
    if record.get("outcome") == "candidate_ended" and done and os.WIFSIGNALED(cstatus):
        record["signal"] = os.WTERMSIG(cstatus)
    if not done:
        os.kill(candidate, signal.SIGKILL)
        os.waitpid(candidate, 0)
    return record


# ---------------------------------------------------------------------------------------------


class _Lines:
    """Exact reads from the parent: never a byte past the current line or frame.

    So what follows in the pipe stays there for whoever reads next: the server reads only the
    job frame, the program process (forked from it) the rest; and a check test's text, which
    the parent sends right after the job, is still unread (in no process's memory) when the
    candidate process is forked.
    """

    def __init__(self, fd):
        self.fd = fd

    def readline(self):
        """A short control line, read a byte at a time; None at end of input."""
        line = bytearray()
        while True:
            b = os.read(self.fd, 1)
            if not b:
                return None
            if b == b"\n":
                return bytes(line)
            line += b
            if len(line) > 64:
                raise ValueError("control line too long")

    def read_frame(self):
        """A ``<length>\\n<bytes>`` frame; None at end of input."""
        header = self.readline()
        if header is None:
            return None
        size = int(header)
        data = bytearray()
        while len(data) < size:
            chunk = os.read(self.fd, min(size - len(data), 1 << 20))
            if not chunk:
                return None
            data += chunk
        return bytes(data)


def _send(obj):
    _write_all(1, (json.dumps(obj) + "\n").encode())


def _run_tests(job, lines, mode, workdir, uid):
    """The test loop of one program; True when everything was cleaned up."""
    last = len(job["tests"]) - 1
    try:
        for i, test in enumerate(job["tests"]):
            if job["kind"] == "check":
                record = run_check_test(job, test, mode, workdir, lines)
            else:
                record = run_test(job, test, mode, workdir)
            cleanup(mode, uid)
            record["i"] = i
            _send(record)
            # No control line after the last test: the parent sends none.
            if i == last or lines.readline() != b"1":
                break
    finally:
        clean = cleanup(mode, uid)
    return clean


def run_job(job, lines):
    """One program (in its own forked process): isolate, run the tests, clean up."""
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    prctl(PR_SET_CHILD_SUBREAPER, 1)
    mode = job["mode"]
    if mode == "userns":
        try:
            enter_userns()
        except OSError as e:
            _send({"error": f"user namespace set-up failed: {e}"})
            return False
        init = os.fork()
        if init == 0:
            code = 1
            try:
                prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
                try:
                    achieved, workdir = setup_userns(job)
                except OSError as e:
                    _send({"error": f"user namespace set-up failed: {e}"})
                    os._exit(1)
                # No ptrace, no /proc/1/{mem,fd} for the program (it has no capabilities).
                prctl(PR_SET_DUMPABLE, 0)
                _send({"hello": achieved})
                code = 0 if _run_tests(job, lines, mode, workdir, None) else 2
            except BaseException:  # noqa: BLE001 - report through the exit status
                traceback.print_exc()
            finally:
                os._exit(code)
        _, status = os.waitpid(init, 0)
        return status == 0
    if mode == "uid":
        achieved, workdir = setup_isolation(job)
        # No ptrace, no /proc/<pid>/{mem,fd} for anyone without CAP_SYS_PTRACE.
        prctl(PR_SET_DUMPABLE, 0)
    else:
        achieved, workdir = ["rlimits", "session"], job["workdir"]
        job["user_tasks"] = user_tasks(os.getuid())
    _send({"hello": achieved})
    return _run_tests(job, lines, mode, workdir, job["uid"] if mode == "uid" else None)


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
        try:
            frame = lines.read_frame()
        except ValueError as e:
            _send({"ended": True, "error": f"bad job frame: {e}"})
            return 1
        if frame is None:
            return 0
        try:
            job = json.loads(frame)
            if not isinstance(job, dict) or "tests" not in job:
                raise ValueError("not a job")
        except ValueError as e:
            _send({"ended": True, "error": f"bad job line: {e}"})
            continue
        if job.get("mode") == "uid" and os.geteuid() != 0:
            _send({"ended": True, "error": "uid mode needs root"})
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
            # ours now (subreaper). In userns mode the namespace died with its init.
            mode = job.get("mode")
            cleanup(mode if mode == "uid" else "none", job.get("uid"), patience_s=5.0)
        _send({"ended": True, "status": status})


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--kill-uid":
        # Used by the parent when a server died before cleaning up after its program.
        kill_uid(int(sys.argv[2]))
        sys.exit(0)
    if len(sys.argv) == 2 and sys.argv[1] == "--probe":
        print(json.dumps(probe_userns()))
        sys.exit(0)
    sys.exit(serve())
