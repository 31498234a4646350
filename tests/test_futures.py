"""ProcessPool against the standard executors' expectations, plus crashes they cannot survive."""

from __future__ import annotations

import concurrent.futures
import faulthandler
import os
import signal
from concurrent.futures import ProcessPoolExecutor, as_completed, wait
from concurrent.futures.process import BrokenProcessPool

import pytest
from helpers import crash_on, interval, raise_value_error, sleep_then, square

from procorch import ProcessPool, StepFailedError

pytestmark = pytest.mark.usefixtures("no_leaked_processes")


def test_submit_returns_a_future_with_the_result() -> None:
    """submit runs the call with its arguments and resolves the future."""
    with ProcessPool(2) as pool:
        assert pool.submit(square, 7).result(timeout=60) == 49
        assert pool.submit(pow, 2, exp=10).result(timeout=60) == 1024


def test_lambdas_and_closures_travel() -> None:
    """cloudpickle ships callables the standard pool cannot."""
    offset = 5
    with ProcessPool(2) as pool:
        assert pool.submit(lambda x: x + offset, 1).result(timeout=60) == 6


def test_map_keeps_order_and_accepts_chunksize() -> None:
    """map yields results in input order, with or without chunksize."""
    with ProcessPool(2) as pool:
        assert list(pool.map(square, range(50))) == [x * x for x in range(50)]
        assert list(pool.map(square, range(10), chunksize=4)) == [x * x for x in range(10)]


def test_map_timeout() -> None:
    """map raises TimeoutError when a result is not ready in time."""
    with ProcessPool(1) as pool:
        results = pool.map(sleep_then, [1], [1.5], timeout=0.2)
        with pytest.raises(TimeoutError):
            list(results)


def test_exception_keeps_its_type_and_remote_traceback() -> None:
    """An exception raised by the call comes back as itself, with the worker's traceback."""
    with ProcessPool(2) as pool:
        future = pool.submit(raise_value_error, "bad value")
        with pytest.raises(ValueError, match="bad value") as caught:
            future.result(timeout=60)
        assert "raise_value_error" in str(caught.value.__cause__)


def test_segfault_fails_only_its_future_and_the_pool_goes_on() -> None:
    """A crashing call fails its own future; every other future completes."""
    with ProcessPool(2) as pool:
        futures = [pool.submit(crash_on, x, 3) for x in range(8)]
        for x, future in enumerate(futures):
            if x == 3:
                with pytest.raises(StepFailedError, match="SIGSEGV") as caught:
                    future.result(timeout=60)
                assert caught.value.error is not None
                assert caught.value.error.signal == "SIGSEGV"
                assert caught.value.error.exit_code == -signal.SIGSEGV
            else:
                assert future.result(timeout=60) == x
        assert pool.submit(square, 3).result(timeout=60) == 9


def test_the_standard_pool_breaks_where_procorch_does_not() -> None:
    """The same crash leaves ProcessPoolExecutor broken (the reason ProcessPool exists)."""
    # faulthandler.disable: the workers would print pytest's crash dump to our stderr.
    with ProcessPoolExecutor(2, initializer=faulthandler.disable) as standard:
        futures = [standard.submit(crash_on, x, 3) for x in range(8)]
        outcomes = []
        for future in futures:
            try:
                outcomes.append(future.result(timeout=60))
            except BrokenProcessPool:
                outcomes.append("broken")
        assert "broken" in outcomes
        with pytest.raises(BrokenProcessPool):
            standard.submit(square, 3)


def test_as_completed_wait_and_callbacks() -> None:
    """The module-level helpers and done callbacks work on its futures."""
    called = []
    with ProcessPool(2) as pool:
        futures = [pool.submit(sleep_then, x, 0.05 * (3 - x)) for x in range(3)]
        futures[0].add_done_callback(lambda f: called.append(f.result()))
        assert sorted(f.result() for f in as_completed(futures, timeout=60)) == [0, 1, 2]
        done, not_done = wait(futures, timeout=60)
        assert len(done) == 3 and not not_done
    assert called == [0]


def test_shutdown_waits_and_refuses_new_work() -> None:
    """After shutdown, running work has finished and submit raises."""
    pool = ProcessPool(2)
    future = pool.submit(sleep_then, 1, 0.3)
    pool.shutdown(wait=True)
    assert future.done() and future.result() == 1
    with pytest.raises(RuntimeError, match="cannot schedule new futures after shutdown"):
        pool.submit(square, 2)


def test_shutdown_can_cancel_pending_futures() -> None:
    """cancel_futures=True cancels what has not been handed out yet."""
    pool = ProcessPool(1)
    futures = [pool.submit(sleep_then, x, 0.2) for x in range(200)]
    pool.shutdown(wait=True, cancel_futures=True)
    assert any(f.cancelled() for f in futures)
    assert all(f.done() for f in futures)


def test_max_workers_bounds_concurrency() -> None:
    """Never more than max_workers calls run at once."""
    with ProcessPool(2) as pool:
        spans = list(pool.map(interval, [0.2] * 6))
    edges = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans])
    active = peak = 0
    for _, change in edges:
        active += change
        peak = max(peak, active)
    assert peak == 2


def test_step_timeout_applies_to_calls() -> None:
    """A guard given to the pool applies to each call."""
    with ProcessPool(2, step_timeout=0.5) as pool:
        slow = pool.submit(sleep_then, 1, 30)
        quick = pool.submit(square, 4)
        with pytest.raises(StepFailedError, match="timed out"):
            slow.result(timeout=60)
        assert quick.result(timeout=60) == 16


def test_unpicklable_call_is_refused_at_submit() -> None:
    """A call that cannot be pickled raises at once, naming the problem."""
    import threading

    with ProcessPool(1) as pool, pytest.raises(TypeError, match="the call cannot be pickled"):
        pool.submit(square, threading.Lock())


def test_is_a_concurrent_futures_executor() -> None:
    """It can stand wherever an Executor is expected."""
    assert issubclass(ProcessPool, concurrent.futures.Executor)
    with pytest.raises(ValueError, match="max_workers must be an int >= 1"):
        ProcessPool(0)
    assert os.cpu_count()
