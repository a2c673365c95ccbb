"""Run a subprocess and stream its output line by line: appended to a log file and handed to a callback as it
arrives, so a training run's progress shows while it runs instead of after it ends."""
from __future__ import annotations

import collections
import os
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence


@dataclass(frozen=True)
class Finished:
    """How a logged subprocess ended.

    Attributes
    ----------
    returncode : int
        Its exit status (negative: killed by that signal).
    tail : tuple of str
        Its last output lines (stdout and stderr merged), without line ends.
    """

    returncode: int
    tail: tuple[str, ...]


def run_logged(argv: Sequence[str], log_path: str | os.PathLike, *, env: Mapping[str, str] | None = None,
               on_line: Callable[[str], None] | None = None, tail: int = 5,
               preexec_fn: Callable[[], None] | None = None) -> Finished:
    """Run ``argv`` to its end, streaming its merged stdout and stderr.

    Parameters
    ----------
    argv : sequence of str
        The command.
    log_path : str or os.PathLike
        Log file, opened for appending (its folder is created). It gets ``$ <command>`` and then every output
        line, flushed line by line so it can be followed while the command runs.
    env : mapping, optional
        The command's environment (default: this process's).
    on_line : callable, optional
        Called with each output line (without its line end) as it arrives. A carriage return ends a line too, so
        a progress line that redraws itself arrives as one line per redraw.
    tail : int
        How many last lines to return.
    preexec_fn : callable, optional
        Run in the child before the command starts (``subprocess.Popen``'s), e.g. to tie its life to this one's.

    Returns
    -------
    Finished
        The exit status and the last ``tail`` lines. If this process is interrupted while waiting, the command is
        killed before the exception propagates.
    """
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    last: collections.deque[str] = collections.deque(maxlen=tail)
    with open(log_path, "a", encoding="utf-8") as log:
        log.write("$ " + shlex.join(argv) + "\n")
        log.flush()
        proc = subprocess.Popen(list(argv), env=None if env is None else dict(env), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, encoding="utf-8", errors="replace", bufsize=1,
                                preexec_fn=preexec_fn)
        try:
            assert proc.stdout is not None
            for raw in proc.stdout:
                log.write(raw)
                log.flush()
                line = raw.rstrip("\n")
                last.append(line)
                if on_line is not None:
                    on_line(line)
            returncode = proc.wait()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        finally:
            if proc.stdout is not None:
                proc.stdout.close()
    return Finished(returncode, tuple(last))


__all__ = ["Finished", "run_logged"]
