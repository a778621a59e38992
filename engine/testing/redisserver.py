"""A throw-away Redis for tests, benchmarks and ``make cluster``: Debian's ``redis-server``
on a loopback port, its files in a directory of the caller's, stopped and started again at
will (the failure tests stop it under load)."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

from .net import accepts_tcp, free_port

__all__ = ["RedisServer", "redis_server_path"]


def redis_server_path() -> str | None:
    """The ``redis-server`` executable, or None when it is not installed."""
    return shutil.which("redis-server") or (
        "/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None
    )


class RedisServer:
    """``redis-server`` on 127.0.0.1:*port* (a free one by default), without persistence
    (the shared state is rebuilt by use: quota windows refill, idempotency keys are a
    convenience for retries), its log in *directory*. A context manager: started on entry,
    stopped on exit.

    Raises (on start):
        FileNotFoundError: redis-server is not installed.
        RuntimeError: it did not accept connections within *timeout* seconds.
    """

    def __init__(self, directory: Path, port: int | None = None, timeout: float = 20.0) -> None:
        self.directory = Path(directory)
        self.port = port or free_port()
        self.timeout = timeout
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = redis_server_path()
        if binary is None:
            raise FileNotFoundError("redis-server is not installed (Debian: redis-server)")
        self.directory.mkdir(parents=True, exist_ok=True)
        argv = [binary, "--port", str(self.port), "--bind", "127.0.0.1"]
        argv += ["--dir", str(self.directory), "--save", "", "--appendonly", "no"]
        with open(self.directory / "redis.log", "ab") as log:  # the child keeps its own fd
            self.process = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + self.timeout
        while not accepts_tcp(self.port):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"redis-server did not start on port {self.port}: see "
                    f"{self.directory / 'redis.log'}"
                )
            time.sleep(0.05)

    def stop(self) -> None:
        """Stop it at once (SIGKILL: as a crash or a network cut looks to the engines)."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
