"""Run a command as an unprivileged user, with this interpreter and this checkout readable.

    python tests/as_user.py [--user nobody] [--expose PATH ...] -- CMD [ARG ...]

Needs root. The test suite runs as root (here and in CI), but the sandbox's userns mode is for
ordinary users, so the tests run it as ``nobody``. ``nobody`` cannot traverse /root (where
pyenv keeps the interpreter here) or a 0700 temporary clone (CI clones into ``mktemp -d``), so
this helper, in a private mount namespace of its own, covers each untraversable ancestor of
the interpreter's directories, the checkout and the ``--expose`` paths with a tmpfs holding only
the needed child (bound from the original, permissions unchanged). Nothing outside that mount
namespace changes; the files themselves must be readable by others (as git and venv make them
under the usual umask 022). Then it drops to the user (its primary group, no supplementary
groups) and execs CMD with the environment it was given.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import pwd
import sys

CLONE_NEWNS = 0x00020000
MS_BIND, MS_REC, MS_PRIVATE, MS_NOSUID, MS_NODEV = 4096, 16384, 1 << 18, 2, 4
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_char_p]


def _mount(source: str | None, target: str, fstype: str | None, flags: int,
           data: str | None = None) -> None:
    enc = (lambda s: None if s is None else os.fsencode(s))
    if _libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {source or fstype} on {target}: {os.strerror(err)}")


def _traversable(path: str, uid: int, gid: int) -> bool:
    st = os.stat(path)
    if st.st_uid == uid:
        return bool(st.st_mode & 0o100)
    if st.st_gid == gid:
        return bool(st.st_mode & 0o010)
    return bool(st.st_mode & 0o001)


def needed_paths(extra: list[str]) -> list[str]:
    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
             os.path.dirname(os.path.realpath(sys.executable)), REPO, *extra}
    paths.update(p for p in sys.path if p and os.path.exists(p))
    return sorted({os.path.realpath(p) for p in paths})


def expose(paths: list[str], uid: int, gid: int) -> None:
    """Make every ancestor of ``paths`` traversable for uid/gid in this mount namespace."""
    for _ in range(64):
        blocked: dict[str, set[str]] = {}
        for path in paths:
            parts = [p for p in path.split("/") if p]
            current = ""
            for part, child in zip(parts, parts[1:], strict=False):
                current += "/" + part
                if not _traversable(current, uid, gid):
                    blocked.setdefault(current, set()).add(child)
                    break
        if not blocked:
            return
        # Shallowest first; deeper ones are seen again next round, through the new tmpfs.
        tops = [t for t in sorted(blocked, key=len)
                if not any(t.startswith(o + "/") for o in blocked if o != t)]
        for top in tops:
            handles = {c: os.open(os.path.join(top, c), os.O_PATH) for c in blocked[top]}
            _mount("tmpfs", top, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
            for child, fd in handles.items():
                target = os.path.join(top, child)
                if os.path.isdir(f"/proc/self/fd/{fd}"):
                    os.mkdir(target, 0o755)
                else:
                    os.close(os.open(target, os.O_CREAT | os.O_WRONLY, 0o644))
                _mount(f"/proc/self/fd/{fd}", target, None, MS_BIND | MS_REC)
                os.close(fd)
    raise RuntimeError("could not make the interpreter's paths traversable")


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--user", default="nobody")
    parser.add_argument("--expose", action="append", default=[])
    parser.add_argument("--cwd", default="/")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command")
    if os.geteuid() != 0:
        sys.exit("as_user.py needs root")
    user = pwd.getpwnam(args.user)
    if _libc.unshare(CLONE_NEWNS) != 0:
        sys.exit(f"unshare(CLONE_NEWNS): {os.strerror(ctypes.get_errno())}")
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    expose(needed_paths(args.expose), user.pw_uid, user.pw_gid)
    os.setgroups([])
    os.setresgid(user.pw_gid, user.pw_gid, user.pw_gid)
    os.setresuid(user.pw_uid, user.pw_uid, user.pw_uid)
    if os.getuid() != user.pw_uid or os.geteuid() != user.pw_uid:
        sys.exit("could not drop to the user")
    os.chdir(args.cwd)
    os.execvp(command[0], command)


if __name__ == "__main__":
    main(sys.argv[1:])
