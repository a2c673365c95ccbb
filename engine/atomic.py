"""Atomic file writes: every file rainsweep writes appears whole or not at all.

The data goes to a uniquely named temporary file in the destination's folder (same file system, so the final
``os.replace`` is atomic) and is renamed over the destination. A crash, a SIGKILL or a concurrent writer never leaves
a half-written file under the real name; a failed write removes its temporary file.
"""
from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any, BinaryIO, Callable


def atomic_write(path: str | os.PathLike, data: bytes | Callable[[BinaryIO], None], *, fsync: bool = False) -> Path:
    """Write ``data`` to ``path`` atomically and return ``path`` as a ``Path``.

    Parameters
    ----------
    path : str or os.PathLike
        Destination file. Its folder is created if missing.
    data : bytes or callable
        The file's bytes, or a function that writes them to the open binary file it is given (for writers such as
        ``PIL.Image.save`` or ``torch.save`` that stream into a file object).
    fsync : bool
        Flush the file to stable storage before the rename (for checkpoints that must survive a power loss, not
        only a killed process).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "xb") as f:  # "x": never reuse another writer's temporary file; honours the umask
            if callable(data):
                data(f)
            else:
                f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str, *, fsync: bool = False) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; see ``atomic_write``."""
    return atomic_write(path, text.encode(), fsync=fsync)


def atomic_write_json(path: str | os.PathLike, obj: Any, *, fsync: bool = False, **dumps: Any) -> Path:
    """Write ``json.dumps(obj, **dumps)`` plus a final newline to ``path`` atomically; see ``atomic_write``."""
    return atomic_write_text(path, json.dumps(obj, **dumps) + "\n", fsync=fsync)
