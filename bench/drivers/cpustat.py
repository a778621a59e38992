"""CPU time per process and per thread, from ``/proc`` (Linux), for the benchmarks.

The targets of issue 14 are CPU microseconds per certificate *for each process and thread*
on the same two cores: the load generator, the engine (main thread, worker threads) and
keyd. Wall-clock rates on a shared machine cannot say which of them a certificate's time
went to; the kernel's accounting can: ``utime + stime`` of each task in
``/proc/<pid>/task/<tid>/stat``, in clock ticks (``SC_CLK_TCK``, 100 per second here, so a
thread's figure is exact to 10 ms: over a measured phase of 10 s or more that is well under
1 % of any figure reported).

:func:`snapshot` reads a set of processes at once -- the caller's own, those named, and
their children (the engine's keyd) -- and :func:`delta` turns two snapshots and a number of
certificates into the report. A process's total is read from its own ``stat``, which keeps
the time of threads that have exited; the difference with the sum over its live threads is
reported as ``exited threads``. Threads are named by their ``comm`` (Python threads all
carry the process's name, so the main thread is the one whose tid is the pid).

No reading raises: a process that has gone (or cannot be read) is reported as missing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "CLK_TCK",
    "ProcessCpu",
    "Snapshot",
    "delta",
    "read_process",
    "snapshot",
    "summary_lines",
]

CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _ticks(stat_line: str) -> tuple[str, int] | None:
    """(comm, utime + stime) of one ``stat`` line; None if it does not parse."""
    # comm is in parentheses and may hold spaces or parentheses itself: split at the last.
    left, sep, rest = stat_line.rpartition(")")
    if not sep or "(" not in left:
        return None
    fields = rest.split()
    try:
        # After comm: state is field 3 of proc(5); utime and stime are fields 14 and 15.
        return left.split("(", 1)[1], int(fields[11]) + int(fields[12])
    except (IndexError, ValueError):
        return None


@dataclass(frozen=True)
class ProcessCpu:
    """One process at one moment: its total ticks and each live thread's (tid -> comm,
    ticks)."""

    pid: int
    name: str
    cmdline: str
    ticks: int
    threads: dict[int, tuple[str, int]] = field(default_factory=dict)


def read_process(pid: int) -> ProcessCpu | None:
    """*pid* now, or None if it cannot be read (gone, not Linux)."""
    base = Path(f"/proc/{pid}")
    try:
        total = _ticks(base.joinpath("stat").read_text())
        raw_cmd = base.joinpath("cmdline").read_bytes()
    except OSError:
        return None
    if total is None:
        return None
    threads: dict[int, tuple[str, int]] = {}
    try:
        tids = [int(t) for t in os.listdir(base / "task")]
    except (OSError, ValueError):
        tids = []
    for tid in tids:
        try:
            got = _ticks(base.joinpath("task", str(tid), "stat").read_text())
        except OSError:
            continue  # exited meanwhile
        if got is not None:
            threads[tid] = got
    cmdline = raw_cmd.replace(b"\0", b" ").decode("utf-8", "replace").strip()
    return ProcessCpu(pid, total[0], cmdline, total[1], threads)


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            out += [int(c) for c in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
        except (OSError, ValueError):
            continue
    return out


@dataclass(frozen=True)
class Snapshot:
    """Processes by role at one moment (``time.monotonic()``)."""

    at: float
    processes: dict[str, ProcessCpu | None]


def snapshot(named: dict[str, int], *, include_self: str | None = "generator") -> Snapshot:
    """Read this process (as role *include_self*, unless None), each process of *named*
    (role -> pid) and every child of those (role ``<role>.child<pid>``, or ``keyd`` for an
    engine's child whose command line names keyd)."""
    import time

    at = time.monotonic()
    out: dict[str, ProcessCpu | None] = {}
    if include_self is not None:
        out[include_self] = read_process(os.getpid())
    for role, pid in named.items():
        out[role] = read_process(pid)
        for child in _children(pid):
            proc = read_process(child)
            name = f"{role}.child{child}"
            if proc is not None and "keyd" in proc.cmdline and "keyd" not in out:
                name = "keyd"
            out[name] = proc
    return Snapshot(at, out)


def delta(
    before: Snapshot, after: Snapshot, certs: int, *, sent: int | None = None
) -> dict[str, Any]:
    """The CPU each process and thread used between two snapshots, in seconds and in
    microseconds per certificate (*certs*: the certificates signed in that interval; 0 gives
    None per certificate). With *sent* (the certificates sent, BUSY or refused ones
    included), each process also gets ``us_per_sent_cert``: under overload a generator and
    an engine spend CPU on frames that sign nothing. A process in only one snapshot is
    reported as missing there."""
    wall = after.at - before.at

    def per_cert(seconds: float, n: int | None = certs) -> float | None:
        return round(seconds / n * 1e6, 3) if n else None

    processes: dict[str, Any] = {}
    for role, end in after.processes.items():
        start = before.processes.get(role)
        if end is None or start is None or start.pid != end.pid:
            processes[role] = {"missing": "not running at both ends of the interval"}
            continue
        total = (end.ticks - start.ticks) / CLK_TCK
        threads = []
        live = 0.0
        for tid, (comm, ticks) in sorted(end.threads.items()):
            used = (ticks - start.threads.get(tid, (comm, 0))[1]) / CLK_TCK
            live += used
            threads.append(
                {
                    "tid": tid,
                    "name": "main" if tid == end.pid else comm,
                    "cpu_s": round(used, 3),
                    "us_per_cert": per_cert(used),
                }
            )
        exited = max(0.0, total - live)
        if exited > 0:
            threads.append(
                {
                    "tid": None,
                    "name": "exited threads",
                    "cpu_s": round(exited, 3),
                    "us_per_cert": per_cert(exited),
                }
            )
        processes[role] = {
            "pid": end.pid,
            "name": end.name,
            "cpu_s": round(total, 3),
            "cpu_share": round(total / wall, 3) if wall > 0 else None,
            "us_per_cert": per_cert(total),
            "us_per_sent_cert": per_cert(total, sent),
            "threads": threads,
        }
    return {
        "source": "/proc/<pid>/task/*/stat utime+stime",
        "clk_tck": CLK_TCK,
        "wall_s": round(wall, 3),
        "certs": certs,
        "certs_sent": sent,
        "processes": processes,
    }


def summary_lines(cpu: dict[str, Any] | None) -> list[str]:
    """Printable lines of a :func:`delta` report: one per process, its busiest threads."""
    if not cpu:
        return []
    sent = cpu.get("certs_sent")
    lines = [
        f"  CPU per certificate signed ({cpu['certs']:,} signed"
        + (f", {sent:,} sent" if sent is not None else "")
        + f", {cpu['wall_s']:.1f} s):"
    ]
    for role, p in cpu["processes"].items():
        if "missing" in p:
            lines.append(f"    {role:<14} missing ({p['missing']})")
            continue
        us = p["us_per_cert"]
        busy = sorted(p["threads"], key=lambda t: -t["cpu_s"])
        top = ", ".join(
            f"{t['name']} {t['us_per_cert']:.2f}" for t in busy[:4] if t["us_per_cert"] is not None
        )
        per_sent = p.get("us_per_sent_cert")
        lines.append(
            f"    {role:<14} {us if us is not None else float('nan'):8.2f} us/cert "
            + (f"({per_sent:.2f} per sent) " if per_sent is not None else "")
            + f"({p['cpu_share']:.0%} of a core; threads: {top or '-'})"
        )
    return lines
