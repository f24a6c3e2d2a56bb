"""Output files users keep: written whole or not at all, with the mode their umask asks for.

``atomic_output(path)`` writes to a hidden temporary file next to ``path`` and moves it into place
only when the block finishes; on any failure (bad input, a crash, Ctrl-C) the temporary file is
removed and an existing ``path`` is left as it was. Temporary files made by ``tempfile`` and by
``safetensors`` are created with mode 0600; ``apply_umask`` gives a finished file the mode an
ordinary ``open(path, "w")`` would have (0666 minus the umask), so other users and tools see what
they expect.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO

_umask_lock = threading.Lock()


def current_umask() -> int:
    """The process umask (read by setting and restoring it; serialised across threads)."""
    with _umask_lock:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def apply_umask(path: str | os.PathLike, base: int = 0o666) -> None:
    """Set ``path``'s mode to ``base`` minus the umask (what ``open(path, "w")`` would give)."""
    os.chmod(path, base & ~current_umask())


@contextlib.contextmanager
def atomic_output(
    path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8"
) -> Iterator[IO]:
    """Open a temporary file next to ``path``; on success it replaces ``path``, else it is removed.

    The parent directory is created if needed. ``mode`` is ``"w"`` (text) or ``"wb"``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as f:
            yield f
        apply_umask(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
