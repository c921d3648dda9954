"""`BackgroundWriter`: batches written in order on one worker thread, a bounded queue, errors raised in the caller."""

from __future__ import annotations

import threading
import time

import pytest

from fusion_cache.cache.background import BackgroundWriter


def test_writes_every_batch_in_order_on_another_thread() -> None:
    seen, threads = [], set()

    def write(batch):
        threads.add(threading.current_thread().name)
        time.sleep(0.001 * (batch % 3))  # uneven work must not reorder anything
        seen.append(batch)

    with BackgroundWriter(write, max_pending=2) as bg:
        for i in range(50):
            bg.submit(i)
    assert seen == list(range(50)) and bg.batches_written == 50
    assert threads == {"fusion-cache-writer"}


def test_queue_is_bounded() -> None:
    release = threading.Event()
    started = threading.Event()

    def write(batch):
        started.set()
        release.wait(5)

    with BackgroundWriter(write, max_pending=2) as bg:
        bg.submit(0)
        started.wait(5)  # batch 0 is being written; two more fit in the queue
        bg.submit(1)
        bg.submit(2)
        blocked = threading.Thread(target=bg.submit, args=(3,))
        blocked.start()
        blocked.join(0.3)
        assert blocked.is_alive()  # the fourth batch waits for room
        release.set()
        blocked.join(5)
        assert not blocked.is_alive()
    assert bg.batches_written == 4


def test_worker_error_is_raised_by_the_next_submit_and_stops_writing() -> None:
    seen = []

    def write(batch):
        if batch == 2:
            raise OSError("disk full")
        seen.append(batch)

    with pytest.raises(RuntimeError, match="background writer failed: disk full") as info:
        with BackgroundWriter(write, max_pending=1) as bg:
            for i in range(100):
                bg.submit(i)
                time.sleep(0.005)
    assert isinstance(info.value.__cause__, OSError)
    assert seen == [0, 1]


def test_worker_error_is_raised_by_close() -> None:
    def write(batch):
        raise ValueError("bad batch")

    bg = BackgroundWriter(write)
    with bg:
        bg.submit("x")
        with pytest.raises(RuntimeError, match="bad batch"):
            bg.close()


def test_caller_error_writes_the_queued_batches_then_propagates() -> None:
    release = threading.Event()
    seen = []

    def write(batch):
        release.wait(5)
        seen.append(batch)

    with pytest.raises(KeyError, match="engine failed"):
        with BackgroundWriter(write, max_pending=2) as bg:
            for i in range(3):
                bg.submit(i)
            threading.Timer(0.2, release.set).start()
            raise KeyError("engine failed")
    assert seen == [0, 1, 2]  # captured rows are not thrown away: a resume has less to redo


def test_caller_error_after_a_worker_error_does_not_hang() -> None:
    def write(batch):
        raise OSError("disk full")

    with pytest.raises(KeyError):
        with BackgroundWriter(write, max_pending=1) as bg:
            bg.submit(0)
            time.sleep(0.2)
            raise KeyError("engine failed")


def test_bad_settings_and_use_outside_the_block() -> None:
    with pytest.raises(ValueError, match="max_pending"):
        BackgroundWriter(print, max_pending=0)
    with pytest.raises(RuntimeError, match="outside its `with` block"):
        BackgroundWriter(print).submit(1)
