"""Folders that appear whole or not at all: built under a temporary sibling name, then renamed into place.

A directory rename is atomic on one file system but, unlike a file rename, cannot replace a non-empty directory. So
when two writers build the same new folder at once, the second rename fails; ``build_dir`` reports that as
``FileExistsError`` (the folder is there, made by the other writer) instead of the bare ``OSError`` of ``rename``.

Temporary names carry the builder's process id (``.<name>.tmp-<pid>-<random>``), so a later run can tell a folder
left behind by a killed builder (``stale_temps``) from one that a live process on this machine is still building.
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Callable


def temp_sibling(path: str | os.PathLike) -> Path:
    """A fresh temporary name next to ``path``: ``.<name>.tmp-<pid>-<8 hex digits>`` in the same folder."""
    path = Path(path)
    return path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: existence check only
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def stale_temps(path: str | os.PathLike) -> list[Path]:
    """Temporary siblings of ``path`` whose builder is no longer running on this machine (safe to remove).

    Parameters
    ----------
    path : str or os.PathLike
        The final folder whose temporary siblings are looked for.

    Returns
    -------
    list of Path
        Existing ``.<name>.tmp-*`` entries next to ``path`` whose process id is not a live process (and
        entries whose name carries no process id), sorted by name.
    """
    path = Path(path)
    if not path.parent.is_dir():
        return []
    pattern = re.compile(rf"\.{re.escape(path.name)}\.tmp-(?:(\d+)-)?[0-9a-f]+")
    out = []
    for p in sorted(path.parent.glob(f".{glob.escape(path.name)}.tmp-*")):
        m = pattern.fullmatch(p.name)
        if m is None or m.group(1) is None or not _alive(int(m.group(1))):
            out.append(p)
    return out


def build_dir(path: str | os.PathLike, build: Callable[[Path], None], *, replace: bool = False) -> Path:
    """Build a folder with ``build(tmp)`` under a temporary sibling name, then rename it to ``path``.

    Parameters
    ----------
    path : str or os.PathLike
        The folder to create. Its parent is created if missing.
    build : callable
        Called with the temporary folder's path (not yet created); it must create and fill that folder.
    replace : bool
        Remove an existing ``path`` just before the rename (so the old folder stays until the new one is complete).

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    FileExistsError
        ``path`` exists at the moment of the rename (another writer created it meanwhile; with ``replace``,
        between the removal and the rename). The temporary folder is removed, ``path`` is left as it is.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    try:
        build(tmp)
        if replace and path.exists():
            shutil.rmtree(path)
        try:
            os.rename(tmp, path)
        except OSError as e:
            if path.exists() or path.is_symlink():
                raise FileExistsError(f"{str(path)!r} was created by another writer while this one was being "
                                      f"built") from e
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
