"""Kills what a private Ray cluster leaves behind, on every exit path.

Processes are named by (pid, start time), so a pid that the kernel reuses
for someone else's process is never touched. The owner of a private cluster
(pipeline/ray_cluster.py) reports every process of it, as it appears, to a
reaper: `python -m pipeline.reaper DIR` reading "PID START" lines on stdin.
When the owner ends, however it ends (SIGKILL included), the pipe closes and
the reaper kills what is still running and removes DIR. It imports nothing
heavy, so it costs a few MB while it waits.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import time
from pathlib import Path

PROC = Path("/proc")

Proc = tuple[int, int]  # (pid, start time in clock ticks since boot)


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (field 3 onwards)."""
    try:
        return (PROC / str(pid) / "stat").read_text().rsplit(") ", 1)[1].split()
    except (OSError, IndexError):
        return None


def identify(pid: int) -> Proc | None:
    fields = _stat_fields(pid)
    return None if fields is None else (pid, int(fields[19]))


def descendants(roots: list[int]) -> list[Proc]:
    """The roots and every process under them, as they are now."""
    children: dict[int, list[int]] = {}
    for entry in PROC.iterdir() if PROC.is_dir() else ():
        if entry.name.isdigit() and (fields := _stat_fields(int(entry.name))) is not None:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], list(roots)
    while todo:
        pid = todo.pop()
        if (proc := identify(pid)) is not None:
            found.append(proc)
            todo += children.get(pid, [])
    return found


def is_alive(proc: Proc) -> bool:
    """Still the same process, and not a zombie (that has exited; its parent reaps it)."""
    fields = _stat_fields(proc[0])
    return fields is not None and int(fields[19]) == proc[1] and fields[0] != "Z"


def kill(procs: list[Proc], timeout_s: float = 5.0) -> list[Proc]:
    """SIGKILL those still running and wait until they are gone. -> the ones killed."""
    killed = [proc for proc in procs if is_alive(proc)]
    for pid, _ in killed:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout_s
    while any(is_alive(proc) for proc in killed) and time.monotonic() < deadline:
        time.sleep(0.02)
    return killed


def using(directory: Path) -> list[Proc]:
    """Processes other than this one whose command line names `directory`:
    every process of a private Ray does (its session dir lies inside), those
    started since the owner's last report included."""
    needle, found = str(directory).encode(), []
    for entry in PROC.iterdir() if PROC.is_dir() else ():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            named = needle in (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if named and (proc := identify(int(entry.name))) is not None:
            found.append(proc)
    return found


def main() -> None:
    directory = Path(sys.argv[1])
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C meant for the server is not for us
    procs = []
    for line in sys.stdin:  # ends at EOF: the owner has stopped or died
        pid, start = line.split()
        procs.append((int(pid), int(start)))
    kill(procs + using(directory))
    deadline = time.monotonic() + 5.0
    while True:  # a process still writing there makes a removal fail: kill it and try again
        shutil.rmtree(directory, ignore_errors=True)
        if not directory.exists() or time.monotonic() > deadline:
            break
        kill(using(directory))
        time.sleep(0.1)


if __name__ == "__main__":
    main()
