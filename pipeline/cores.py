"""Cores of their own for the stages (and the draft) that share a machine, so
that one many-core machine is a faithful N-node CPU cluster: a stage
computes with as many torch threads as it has cores, pinned to them."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

log = logging.getLogger(__name__)


def machine_cores() -> list[int]:
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))


def default_cores_per_stage(num_stages: int) -> int:
    """Stages that share this machine split its cores."""
    return max(1, len(machine_cores()) // num_stages)


def split_cores(counts: list[int]) -> list[list[int]]:
    """Consecutive cores of this machine for each count (wrapping around
    when there are fewer than asked for)."""
    cores, groups, at = machine_cores(), [], 0
    for count in counts:
        groups.append([cores[(at + i) % len(cores)] for i in range(max(1, count))])
        at += max(1, count)
    return groups


def shares_cores(groups: list[list[int]], group: list[int]) -> bool:
    """Whether `group` overlaps any of `groups` (split_cores wrapped around)."""
    return any(set(group) & set(other) for other in groups)


def own_cores(cores: list[int], whole_process: bool = False) -> None:
    """Compute with len(cores) torch threads, pinned to those cores: the
    calling thread (and the threads it starts later), or every thread of this
    process (a stage actor or rank, whose runtime started threads already)."""
    torch.set_num_threads(len(cores))
    if not hasattr(os, "sched_setaffinity"):
        return
    threads = [int(t.name) for t in Path("/proc/self/task").iterdir()] if whole_process else [0]
    for tid in threads:
        try:
            os.sched_setaffinity(tid, cores)
        except OSError as exc:  # a thread that ended meanwhile, or a restricted container
            log.debug("could not pin thread %d to %s: %s", tid, cores, exc)


def use_cores(cores: list[int] | None, num_cpus: float, whole_process: bool = False) -> None:
    """A stage's or draft's compute: pinned to `cores` where it was given
    some of this machine's (own_cores), else num_cpus torch threads wherever
    the OS puts them (a process on a node of its own, or placed by mpiexec)."""
    if cores:
        own_cores(cores, whole_process)
    else:
        torch.set_num_threads(max(1, int(num_cpus)))
