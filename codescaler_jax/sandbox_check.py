"""Print which sandbox protections are in force for the current user, checked from inside.

    python -m codescaler_jax.sandbox_check [--json]

Resolves the isolation mode the sandbox gives this user (root: a dedicated uid, "uid"; an
ordinary user: user namespaces, "userns", where the kernel allows them; otherwise weak, which
is refused unless accepted with ``CODESCALER_SANDBOX_ALLOW_WEAK=1``), then runs a probe program
in the sandbox that tests each protection from the inside rather than trusting the feature
list: the namespaces (their inode numbers differ from this process's), a private /tmp and
/dev/shm (markers left on the host are invisible), a read-only root, hidden paths (this user's
home and the current directory, where runs and checkpoints live), the network (a listener on
the host's loopback and outside addresses), host processes (this process's pid), capabilities
and rlimits. Exit status 0 when every protection of the mode holds, 1 otherwise (weak or refused
isolation included).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import uuid
from typing import Any

from codescaler_jax.code import runner
from codescaler_jax.code.sandbox import (
    Sandbox,
    SandboxConfig,
    UsernsSupport,
    WeakIsolationError,
    resolve_isolation,
)

NAMESPACES = ("user", "mnt", "net", "pid", "ipc", "uts")
RLIMITS = ("AS", "NPROC", "FSIZE", "CPU", "NOFILE", "STACK", "CORE")
# Protections that must hold, per mode (the uid mode gives the program a uid of its own
# instead of a user namespace, and hides other users' processes with hidepid instead of a pid
# namespace).
REQUIRED = {
    "uid": ("mnt namespace", "net namespace", "ipc namespace", "own uid", "private /tmp",
            "private /dev/shm", "read-only root", "hidden paths", "no network",
            "host processes hidden", "no capabilities", "rlimits"),
    "userns": ("user namespace", "mnt namespace", "net namespace", "pid namespace",
               "ipc namespace", "private /tmp", "private /dev/shm", "read-only root",
               "hidden paths", "no network", "host processes hidden", "no capabilities",
               "rlimits"),
}

PROBE = r'''
import json, os, resource, socket
token, tmp_marker, shm_marker, port, host_pid = TOKEN, TMP_MARKER, SHM_MARKER, PORT, HOST_PID
r = {"uid": os.getuid(), "ns": {}, "writable": {}, "listing": {}}
for n in NAMESPACES:
    try:
        r["ns"][n] = os.stat("/proc/self/ns/" + n).st_ino
    except OSError:
        r["ns"][n] = None
with open("/proc/self/status") as f:
    r["cap_eff"] = int([l for l in f if l.startswith("CapEff:")][0].split()[1], 16)
r["tmp_marker"] = os.path.exists(tmp_marker)
r["shm_marker"] = os.path.exists(shm_marker)
for d in ("/", "/usr", "/etc", "/tmp", "/dev/shm", HOME, CWD):
    p = os.path.join(d, ".codescaler-check-" + token)
    try:
        with open(p, "w") as f:
            f.write("x")
        r["writable"][d] = True
    except OSError:
        r["writable"][d] = False
for d in SENSITIVE:
    try:
        r["listing"][d] = sorted(n for n in os.listdir(d) if token not in n)
    except OSError as e:
        r["listing"][d] = e.strerror
r["network"] = []
for addr in (("127.0.0.1", port), ("1.1.1.1", 53), ("8.8.8.8", 443)):
    try:
        socket.create_connection(addr, timeout=0.5).close()
        r["network"].append("%s:%d" % addr)
    except OSError:
        pass
try:
    os.kill(host_pid, 0)
    r["host_pid"] = True
except OSError:
    r["host_pid"] = os.path.exists("/proc/%d" % host_pid)
r["procs"] = len([p for p in os.listdir("/proc") if p.isdigit()])
r["rlimits"] = {n: resource.getrlimit(getattr(resource, "RLIMIT_" + n))[0] for n in RLIMITS}
print(json.dumps(r))
'''


def _allowed_children(path: str, keep: list[str]) -> set[str]:
    """Names under ``path`` that the sandbox shows on purpose: the way to the interpreter, and
    in /tmp (a home or run directory may be /tmp itself) the sandbox's own working directory."""
    prefix = path.rstrip("/") + "/"
    names = {k[len(prefix):].split("/", 1)[0] for k in keep if k.startswith(prefix)}
    return names | {"work"} if path.rstrip("/") == "/tmp" else names


def check(config: SandboxConfig | None = None, *, euid: int | None = None,
          userns: UsernsSupport | None = None) -> dict[str, Any]:
    """Run the probe; returns {"mode", "protections": {name: [ok, detail]}, "ok", "error"}.

    ``euid`` and ``userns`` are injectable, as for `resolve_isolation`.
    """
    config = config or SandboxConfig(time_limit_s=10.0, workers=1)
    try:
        mode = resolve_isolation(config, euid=euid, userns=userns)
    except WeakIsolationError as e:
        return {"mode": "weak (refused)", "ok": False, "error": str(e), "protections": {}}
    token = uuid.uuid4().hex
    home, cwd = os.path.expanduser("~"), os.getcwd()
    sensitive = sorted({home, cwd, "/root", "/home", "/var", "/run", "/mnt", "/work"})
    markers = []
    for d in ("/tmp", "/dev/shm"):
        fd, path = tempfile.mkstemp(prefix=f"codescaler-check-{token}-", dir=d)
        os.close(fd)
        os.chmod(path, 0o644)
        markers.append(path)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    outside = {n: os.stat(f"/proc/self/ns/{n}").st_ino for n in NAMESPACES}
    values = {"TOKEN": token, "TMP_MARKER": markers[0], "SHM_MARKER": markers[1],
              "PORT": listener.getsockname()[1], "HOST_PID": os.getpid(), "HOME": home,
              "CWD": cwd, "SENSITIVE": sensitive, "NAMESPACES": NAMESPACES, "RLIMITS": RLIMITS}
    code = "".join(f"{k} = {v!r}\n" for k, v in values.items()) + PROBE
    try:
        with Sandbox(config) as sandbox:
            result, stdout = sandbox.run_for_output(code)
    finally:
        listener.close()
        for path in markers:
            os.unlink(path)
    # What the probe wrote must not be on the host (home and the run directory may lie under
    # /tmp, where the sandbox has a private copy of the path: writable there, never here).
    leaked = []
    for d in ("/", "/usr", "/etc", home, cwd, "/tmp", "/dev/shm"):
        path = os.path.join(d, f".codescaler-check-{token}")
        if os.path.lexists(path):
            leaked.append(d)
            os.unlink(path)
    report: dict[str, Any] = {"mode": "weak (accepted)" if mode == "none" else mode,
                              "features": list(result.isolation)}
    try:
        inside = json.loads(stdout)
    except ValueError:
        report.update(ok=False, protections={}, error=f"the probe did not run: {result.status}: "
                                                      f"{result.tests[0].message}")
        return report
    keep = runner.interpreter_paths()
    prot: dict[str, list] = {}
    for n in NAMESPACES:
        new = inside["ns"].get(n) not in (None, outside[n])
        prot[f"{n} namespace"] = [new, "new" if new else "the host's"]
    prot["own uid"] = [inside["uid"] != os.getuid() and inside["uid"] != 0,
                       f"uid {inside['uid']} (yours: {os.getuid()})"]
    prot["private /tmp"] = [not inside["tmp_marker"] and inside["writable"]["/tmp"],
                            "host /tmp invisible, a private tmpfs is writable"]
    prot["private /dev/shm"] = [not inside["shm_marker"] and inside["writable"]["/dev/shm"],
                                "host /dev/shm invisible, a private tmpfs is writable"]
    ro = [d for d in ("/", "/usr", "/etc") if not inside["writable"][d]]
    prot["read-only root"] = [len(ro) == 3 and not leaked,
                              f"not writable: {', '.join(ro)}; nothing written reached the host"
                              if not leaked else f"writes reached the host in {leaked}"]
    shown = {}
    for d, listing in inside["listing"].items():
        if isinstance(listing, list):
            extra = sorted(set(listing) - _allowed_children(d, keep))
            if extra:
                shown[d] = extra[:5]
    prot["hidden paths"] = [not shown, ("hidden: " + ", ".join(sensitive)) if not shown
                            else f"visible: {shown}"]
    prot["no network"] = [not inside["network"], "unreachable: host loopback listener, "
                          "1.1.1.1:53, 8.8.8.8:443" if not inside["network"]
                          else f"reached: {inside['network']}"]
    prot["host processes hidden"] = [not inside["host_pid"],
                                     f"{inside['procs']} processes visible inside"]
    prot["no capabilities"] = [inside["cap_eff"] == 0, f"CapEff={inside['cap_eff']:#x}"]
    lim = inside["rlimits"]
    mb = 1 << 20
    prot["rlimits"] = [all(lim[n] != -1 for n in ("AS", "NPROC", "FSIZE", "CPU")),
                       f"AS {lim['AS'] // mb} MB, NPROC {lim['NPROC']}, FSIZE "
                       f"{lim['FSIZE'] // mb} MB, CPU {lim['CPU']} s, NOFILE {lim['NOFILE']}"]
    report["protections"] = prot
    required = REQUIRED.get(mode, ())
    report["ok"] = bool(required) and all(prot[name][0] for name in required)
    report["required"] = list(required)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    report = check()
    if args.json:
        print(json.dumps(report, indent=1))
        return 0 if report["ok"] else 1
    print(f"sandbox isolation for uid {os.getuid()}: {report['mode']}")
    if report.get("error"):
        print(report["error"])
    required = set(report.get("required", ()))
    for name, (ok, detail) in report["protections"].items():
        flag = "yes" if ok else "NO "
        need = "" if name in required or ok else " (not part of this mode)"
        print(f"  {flag}  {name:<22} {detail}{need}")
    print("all protections of this mode hold" if report["ok"]
          else "some protections are missing")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
