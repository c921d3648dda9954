"""Runs a build's encoding and writing on a worker thread, so the teacher engine never waits on I/O.

The engine thread hands each captured batch to `BackgroundWriter.submit`; one worker thread calls the write
function on the batches in submission order. The queue is bounded (``max_pending`` batches), so a slow disk
slows the engine down instead of filling memory. An error in the worker is raised again in the engine thread by
the next `submit` or by `close`, with the worker's traceback chained. When the engine thread fails instead (or is
interrupted), the batches already queued are still written before its error propagates.

Crash safety is unchanged: the worker calls `fusion_cache.cache.writer.ShardWriter.write_rows` in input order,
and only parts it has fsynced and recorded count as complete, so a build killed with batches still queued resumes
from the last complete part and captures the queued rows again.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

_STOP = object()  # the sentinel `close` queues after the last batch
_POLL_SECONDS = 0.1  # how often a blocked `submit` checks whether the worker has died


class BackgroundWriter:
    """Context manager that calls ``write(batch)`` on one worker thread, in submission order.

    Example:
        with ShardWriter(work, provenance) as shards, BackgroundWriter(shards.write_rows) as bg:
            for rows in batches:
                bg.submit(rows)
        # leaving the block without an error waits for every batch to be written

    Args:
        write: called with each submitted batch on the worker thread.
        max_pending: batches queued but not yet written, at most (>= 1); `submit` blocks beyond that.

    Raises:
        ValueError: ``max_pending < 1``.
    """

    def __init__(self, write: Callable[[Any], None], *, max_pending: int = 2):
        if max_pending < 1:
            raise ValueError(f"max_pending: must be >= 1, got {max_pending}")
        self._write = write
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="fusion-cache-writer", daemon=True)
        self._started = False
        self._closed = False
        self.batches_written = 0
        self.busy_seconds = 0.0  # time the worker spent in ``write``
        self.wait_seconds = 0.0  # time `submit` blocked on a full queue (the engine waiting on I/O)

    def __enter__(self) -> BackgroundWriter:
        self._thread.start()
        self._started = True
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            # The engine side failed (or was interrupted): still write the batches already captured, so a resume
            # has less to redo, then let the engine's error propagate (a worker error is only logged then).
            self._closed = True
            self._stop_thread()
            if self._error is not None:
                log.warning("the background writer failed as well: %r", self._error)

    def _run(self) -> None:
        while True:
            batch = self._queue.get()
            if batch is _STOP:
                return
            try:
                t0 = time.perf_counter()
                self._write(batch)
                self.busy_seconds += time.perf_counter() - t0
                self.batches_written += 1
            except BaseException as err:  # noqa: BLE001 - handed to the engine thread, which raises it
                self._error = err
                return

    def _raise_worker_error(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"the background writer failed: {self._error}") from self._error

    def submit(self, batch: Any) -> None:
        """Queue ``batch`` for writing; blocks while ``max_pending`` batches are waiting.

        Raises:
            RuntimeError: the worker failed on an earlier batch (the cause is chained).
        """
        if not self._started:
            raise RuntimeError("BackgroundWriter.submit outside its `with` block")
        t0 = time.perf_counter()
        try:
            while True:
                self._raise_worker_error()
                if not self._thread.is_alive():
                    raise RuntimeError("the background writer has stopped")
                try:
                    self._queue.put(batch, timeout=_POLL_SECONDS)
                    return
                except queue.Full:
                    continue
        finally:
            self.wait_seconds += time.perf_counter() - t0

    def close(self) -> None:
        """Wait until every submitted batch is written and stop the worker.

        Raises:
            RuntimeError: the worker failed (the cause is chained); raised once, a second `close` is a no-op.
        """
        if self._closed:
            return
        self._closed = True
        self._stop_thread()
        self._raise_worker_error()

    def _stop_thread(self) -> None:
        if not self._started:
            return
        self._started = False
        while self._thread.is_alive():  # a worker that failed has stopped reading the queue
            try:
                self._queue.put(_STOP, timeout=_POLL_SECONDS)
                break
            except queue.Full:
                continue
        self._thread.join()
