"""Process facts and hardening for keyd and the engine (Linux; elsewhere each says it cannot).

* :func:`make_non_dumpable`: ``prctl(PR_SET_DUMPABLE, 0)``. keyd calls it before it reads a
  passphrase or decrypts a key: other processes of its uid can then no longer read its memory
  (``/proc/PID/mem``), its environment or attach to it with ptrace (root with
  ``CAP_SYS_PTRACE`` still can), the kernel makes its ``/proc/PID`` files root-owned, and it
  writes no core dump.
* :func:`take_environ_secret`: read a variable once and wipe it from this process, including
  the original environment block that ``/proc/PID/environ`` shows (``del os.environ[NAME]``
  alone leaves it there).
* :func:`name_this_thread`: the OS name of the calling thread (``/proc/PID/task/TID/comm``),
  so that per-thread CPU figures (``dccsign.bench.cpustat``, ``top -H``) say which thread is which.
* :func:`record_holder` / :func:`lock_holder`: a lock file that says who holds it. The flock is
  the lock; the record (pid, process start time, boot id) only describes the holder, and is
  believed only while a process with that pid and start time is running.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import datetime as dt
import os
import sys
from pathlib import Path

__all__ = [
    "PASSPHRASE_ENV",
    "dumpable",
    "lock_holder",
    "make_non_dumpable",
    "name_this_thread",
    "process_start",
    "record_holder",
    "take_environ_secret",
]

#: The variable that may carry the keystore passphrase (``keystore.resolve_passphrase``).
PASSPHRASE_ENV = "DCCSIGN_KEYSTORE_PASSPHRASE"
PR_SET_DUMPABLE = 4
PR_GET_DUMPABLE = 3
PR_SET_NAME = 15


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)


# ----------------------------------------------------------------------------- hardening


def make_non_dumpable() -> str | None:
    """``prctl(PR_SET_DUMPABLE, 0)`` for this process: None when done, else why not (not Linux,
    or prctl failed). Survives until this process exits or calls execve."""
    if not sys.platform.startswith("linux"):
        return f"PR_SET_DUMPABLE is Linux-only (this is {sys.platform})"
    libc = _libc()
    if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        return f"prctl(PR_SET_DUMPABLE, 0) failed: {os.strerror(ctypes.get_errno())}"
    return None


def dumpable() -> int | None:
    """``prctl(PR_GET_DUMPABLE)`` of this process (0, 1 or 2), or None off Linux."""
    if not sys.platform.startswith("linux"):
        return None
    return int(_libc().prctl(PR_GET_DUMPABLE, 0, 0, 0, 0))


def name_this_thread(name: str) -> None:
    """Give the calling thread the OS name *name* (cut to 15 bytes, the kernel's limit);
    nothing off Linux or when prctl fails (a name is a diagnostic, never a requirement)."""
    if sys.platform.startswith("linux"):
        _libc().prctl(PR_SET_NAME, name.encode()[:15], 0, 0, 0)


def take_environ_secret(name: str = PASSPHRASE_ENV) -> bytes | None:
    """The value of environment variable *name* (None when unset or empty), removed from this
    process: the bytes of the value are overwritten with zeros where libc's ``environ`` points
    (for a variable inherited at exec, the original block that ``/proc/PID/environ`` shows),
    then the variable is unset (``os.environ`` and libc). Child processes started afterwards
    do not inherit it.

    Call it early, while no other thread runs (``setenv``/``getenv`` are not thread-safe).
    """
    key = os.fsencode(name)
    value = os.environb.get(key) if hasattr(os, "environb") else None
    if value is None and name in os.environ:
        value = os.fsencode(os.environ[name])
    if value is None:
        return None
    if sys.platform.startswith("linux"):
        _wipe_environ_value(key)
    os.environ.pop(name, None)  # unsetenv too
    return bytes(value) or None


def _wipe_environ_value(key: bytes) -> None:
    libc = _libc()
    environ = ctypes.POINTER(ctypes.c_void_p).in_dll(libc, "environ")
    prefix = key + b"="
    i = 0
    while environ[i]:
        address = environ[i]
        entry = ctypes.string_at(address)
        if entry.startswith(prefix) and len(entry) > len(prefix):
            ctypes.memset(address + len(prefix), 0, len(entry) - len(prefix))
        i += 1


# ----------------------------------------------------------------------------- lock records


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "-"


def process_start(pid: int) -> int | None:
    """The start time of process *pid* in clock ticks after boot (``/proc/PID/stat`` field 22),
    or None when there is no such process (or no /proc)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    # Field 2 (the command name) is in parentheses and may contain spaces or ")".
    fields = stat[stat.rfind(b")") + 2 :].split()
    try:
        return int(fields[19])  # field 22 counted from 1 with pid and comm removed: 22 - 3
    except (IndexError, ValueError):
        return None


def record_holder(fd: int) -> None:
    """Write this process's identity into the lock file *fd* (whose lock it holds):
    ``pid=N start=TICKS boot=BOOT-ID``. Best effort: the flock is the lock, not this record."""
    pid = os.getpid()
    record = f"pid={pid} start={process_start(pid)} boot={_boot_id()}\n".encode()
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, record, 0)
    except OSError:
        pass


def _started(ticks: int) -> str:
    """Process start *ticks* as a UTC time, with its age."""
    try:
        btime = next(
            int(line.split()[1])
            for line in Path("/proc/stat").read_text().splitlines()
            if line.startswith("btime ")
        )
        when = btime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, StopIteration, ValueError, IndexError):
        return f"{ticks} ticks after boot"
    stamp = dt.datetime.fromtimestamp(when, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    age = max(0.0, dt.datetime.now(dt.UTC).timestamp() - when)
    return f"{stamp} ({age:,.0f} s ago)"


def _cmdline(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError as exc:
        return f"(cmdline unreadable: {exc.strerror})"
    text = raw.rstrip(b"\0").replace(b"\0", b" ").decode("utf-8", "replace")
    return text[:300] + ("..." if len(text) > 300 else "") or "(no cmdline)"


def lock_holder(path: str | os.PathLike[str]) -> str:
    """Who holds the flock on *path*, for an error message: ``held by pid N, started ...,
    running: CMDLINE`` when the record in the file names a running process (same pid, start
    time and boot), else what is known and that it is stale information."""
    try:
        text = Path(path).read_text(errors="replace").strip()
    except OSError as exc:
        return f"held by a process that cannot be named ({path}: {exc.strerror})"
    fields = dict(part.partition("=")[::2] for part in text.split())
    try:
        pid, start = int(fields["pid"]), int(fields["start"])
    except (KeyError, ValueError):
        return "held by a process that did not record itself in the lock file"
    if fields.get("boot") == _boot_id() and process_start(pid) == start:
        return f"held by pid {pid}, started {_started(start)}, running: {_cmdline(pid)}"
    return (
        f"held by a process that did not record itself; the lock file names pid {pid} "
        f"(started {_started(start) if fields.get('boot') == _boot_id() else 'before a reboot'}), "
        "which is no longer running: stale information"
    )
