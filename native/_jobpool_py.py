"""Reply bodies encoded off the event loop (reference): :class:`ReplyPool`.

The contract both implementations keep (the native one: ``ReplyPool`` in ``_walker.pxi``
over ``src/jobpool.c``, whose threads never take the GIL):

- ``ReplyPool(threads=2)``: *threads* worker threads (1..64), named ``reply-encode``.
- ``submit_encode(...)`` takes exactly the arguments of :func:`encode_sign_batch_result`
  and raises its argument errors (TypeError, ValueError) at once; it returns a job. The
  inputs must not change until the job is collected (the native threads read them).
- ``fileno()``: a file descriptor that is readable while finished jobs wait; ``collect()``
  returns them (oldest first; ``[]`` if none) and makes it unreadable until the next one.
- ``job.result()``: the body :func:`encode_sign_batch_result` returns for those arguments,
  or the error it raises (``BodyError``, ``ZlibError``).
- ``close()``: the submitted jobs finish, the threads stop; jobs not collected are dropped.
  After it every call but ``close`` raises ValueError.
"""

from __future__ import annotations

import os
import queue
import threading
from typing import Any

from ._reply_py import check_reply_arguments, encode_sign_batch_result

__all__ = ["ReplyJob", "ReplyPool", "check_threads"]

MAX_THREADS = 64


def check_threads(threads: object) -> None:
    """The rule both implementations share for the number of threads."""
    if type(threads) is not int or not 1 <= threads <= MAX_THREADS:
        raise ValueError(f"threads must be an int from 1 to {MAX_THREADS}")


class ReplyJob:
    """One reply body being encoded (see the module docstring)."""

    __slots__ = ("_args", "_error", "_kwargs", "_ran", "_value")

    def __init__(self, args: tuple[Any, ...], single: bool) -> None:
        self._args = args
        self._kwargs = {"single": single}
        self._ran = False
        self._value: bytes | None = None
        self._error: BaseException | None = None

    def _run(self) -> None:
        try:
            self._value = encode_sign_batch_result(*self._args, **self._kwargs)
        except Exception as exc:  # handed to result(), as the native job keeps its code
            self._error = exc
        self._args = ()
        self._ran = True

    def result(self) -> bytes:
        if not self._ran:
            raise RuntimeError("the reply has not been encoded yet")
        if self._error is not None:
            raise self._error
        assert self._value is not None
        return self._value


class ReplyPool:
    """Python threads and an eventfd (see the module docstring)."""

    def __init__(self, threads: int = 2) -> None:
        check_threads(threads)
        self.threads = threads
        self._efd: int | None = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._jobs: queue.SimpleQueue[ReplyJob | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._done: list[ReplyJob] = []
        self._in_flight = 0
        self._workers = [
            threading.Thread(target=self._work, name="reply-encode", daemon=True)
            for _ in range(threads)
        ]
        for worker in self._workers:
            worker.start()

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            job._run()
            with self._lock:
                self._done.append(job)
                if len(self._done) == 1:  # one wake-up per batch of finished jobs
                    assert self._efd is not None
                    os.eventfd_write(self._efd, 1)

    def _open(self) -> int:
        if self._efd is None:
            raise ValueError("the pool is closed")
        return self._efd

    def fileno(self) -> int:
        return self._open()

    @property
    def pending(self) -> int:
        """Jobs submitted and not yet collected."""
        return self._in_flight

    def submit_encode(
        self, protected: Any, kids: Any, protected_of: Any, payloads: Any,
        payload_offsets: Any, signatures: Any, signature_offsets: Any, refusals: Any,
        level: Any = 9, *, single: bool = False,
    ) -> ReplyJob:  # fmt: skip
        self._open()
        args = (protected, kids, protected_of, payloads, payload_offsets, signatures,
                signature_offsets, refusals, level)  # fmt: skip
        check_reply_arguments(*args, single)
        job = ReplyJob(args, bool(single))
        self._in_flight += 1
        self._jobs.put(job)
        return job

    def collect(self) -> list[ReplyJob]:
        efd = self._open()
        with self._lock:
            try:
                os.eventfd_read(efd)
            except BlockingIOError:
                pass
            done, self._done = self._done, []
        self._in_flight -= len(done)
        return done

    def close(self) -> None:
        if self._efd is None:
            return
        for _ in self._workers:
            self._jobs.put(None)
        for worker in self._workers:
            worker.join()
        os.close(self._efd)
        self._efd = None
        self._done = []
        self._in_flight = 0
