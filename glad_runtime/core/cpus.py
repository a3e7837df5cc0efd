"""The CPU cores this process may use, and the one rule that sizes every thread pool from them (issue 19, item 3).

A line PC or a container rarely owns the whole machine: CPU affinity (``taskset``, Kubernetes static CPU manager)
and a cgroup CPU quota (Docker ``--cpus``, Kubernetes ``resources.limits.cpu``) both cap what a process can use,
while ONNX Runtime's default (one thread per *physical* core of the machine), OpenVINO's and torch's ignore the
quota. More busy threads than cores make them take turns, and a thread that spins waiting for work (ONNX Runtime's
default) burns the time slice another one needed: measured here, torch training went from about 1 s to 4-12 s per
VAE step when another process took one of the two cores.

The rule, used by the ONNX Runtime and OpenVINO engines, the served ONNX Runtime models and training:

* :func:`usable_cores` = the affinity set's size, capped by the tightest cgroup quota over the process's cgroup
  and its ancestors (rounded down, at least 1);
* a pool of ``instances`` concurrent users gets ``max(1, usable_cores() // instances)`` threads
  (:func:`threads_for`);
* ONNX Runtime threads do not spin (``session.intra_op.allow_spinning = 0``): they sleep when idle, so another pool
  or process sharing the cores gets them (:func:`ort_spinning`).
"""

from __future__ import annotations

import os
from pathlib import Path

from glad_runtime.errors import UsageError

__all__ = ["affinity_cores", "cgroup_cpu_limit", "usable_cores", "threads_for", "ort_spinning"]


def affinity_cores() -> int:
    """Cores in this process's CPU affinity set (``os.sched_getaffinity``; ``os.cpu_count`` where the platform has
    no affinity call), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _quota_v2(folder: Path) -> float | None:
    try:
        quota, period = (folder / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        return None


def _quota_v1(folder: Path) -> float | None:
    try:
        quota_us = int((folder / "cpu.cfs_quota_us").read_text())
        period_us = int((folder / "cpu.cfs_period_us").read_text())
        return None if quota_us <= 0 or period_us <= 0 else quota_us / period_us
    except (OSError, ValueError):
        return None


def _own_paths(proc_cgroup: str | os.PathLike) -> tuple[str, str]:
    """``(v2 path, v1 cpu path)`` of this process's cgroups from ``/proc/self/cgroup`` (``"/"`` when unknown)."""
    v2 = v1 = "/"
    try:
        for line in Path(proc_cgroup).read_text().splitlines():
            hid, controllers, path = (line.split(":", 2) + ["", ""])[:3]
            if hid == "0" and controllers == "":
                v2 = path or "/"
            elif "cpu" in controllers.split(","):
                v1 = path or "/"
    except OSError:
        pass
    return v2, v1


def cgroup_cpu_limit(root: str | os.PathLike = "/sys/fs/cgroup",
                     proc_cgroup: str | os.PathLike = "/proc/self/cgroup") -> float | None:
    """The tightest cgroup CPU quota over this process's cgroup and its ancestors, in cores (``quota / period``),
    or None when there is none.

    cgroup v2: ``cpu.max`` (``"max 100000"`` = none, ``"150000 100000"`` = 1.5 cores) in ``<root>/<own path>`` and
    each parent up to ``<root>``; cgroup v1: ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` (quota -1 = none) in
    ``<root>/cpu[,cpuacct]/<own path>`` and its parents. The own paths come from ``proc_cgroup``; inside a
    container with its own cgroup namespace they are ``/``. Unreadable files count as no quota.
    """
    root = Path(root)
    v2, v1 = _own_paths(proc_cgroup)
    limits = []
    for base, own, read in ((root, v2, _quota_v2), (root / "cpu", v1, _quota_v1), (root / "cpu,cpuacct", v1,
                                                                                      _quota_v1)):
        folder = base / own.strip("/")
        while True:
            q = read(folder)
            if q is not None:
                limits.append(q)
            if folder == base or base not in folder.parents:
                break
            folder = folder.parent
    return min(limits) if limits else None


def usable_cores(root: str | os.PathLike = "/sys/fs/cgroup", proc_cgroup: str | os.PathLike = "/proc/self/cgroup"
                 ) -> int:
    """Cores this process may use: :func:`affinity_cores` capped by :func:`cgroup_cpu_limit` (rounded down; at
    least 1). ``GLAD_CPU_CORES`` (a positive integer) overrides both."""
    env = os.environ.get("GLAD_CPU_CORES", "").strip()
    if env:
        try:
            if int(env) >= 1:
                return int(env)
        except ValueError:
            pass
    cores = affinity_cores()
    limit = cgroup_cpu_limit(root, proc_cgroup)
    if limit is not None:
        cores = min(cores, max(1, int(limit)))
    return cores


def threads_for(instances: int = 1, requested: int = 0) -> int:
    """Threads of one pool: ``requested`` when > 0, else ``max(1, usable_cores() // instances)`` (the cores shared
    among ``instances`` pools that may run at once). Raises UsageError for ``instances`` < 1 or ``requested`` < 0."""
    if instances < 1 or requested < 0:
        raise UsageError(f"instances must be >= 1 and requested >= 0, got {instances}, {requested}")
    return int(requested) if requested else max(1, usable_cores() // int(instances))


def ort_spinning(options, allow: bool = False):
    """Set ONNX Runtime's intra- and inter-op spinning on ``options`` (``onnxruntime.SessionOptions``); off by
    default (idle threads sleep and leave the cores to other pools and processes). Returns ``options``."""
    value = "1" if allow else "0"
    options.add_session_config_entry("session.intra_op.allow_spinning", value)
    options.add_session_config_entry("session.inter_op.allow_spinning", value)
    return options
