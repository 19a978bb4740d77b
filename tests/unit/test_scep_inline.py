"""agent.scep.inline: driving the SCEP coroutines without an event loop (one-shot commands)."""

from __future__ import annotations

import asyncio
import threading
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor

import pytest

from agent.scep.inline import Background, Waiting, blocking_sleep, run_inline


async def _nested(x: int) -> int:
    async def inner() -> int:
        return x * 2

    return await inner() + 1


def test_run_inline_returns_what_the_coroutine_returns() -> None:
    assert run_inline(_nested(20)) == 41


def test_run_inline_propagates_exceptions() -> None:
    async def boom() -> None:
        raise KeyError("k")

    with pytest.raises(KeyError):
        run_inline(boom())


def test_a_coroutine_that_suspends_is_refused_and_closed() -> None:
    cleaned: list[bool] = []

    async def needs_a_loop() -> None:
        try:
            await asyncio.sleep(0)
        finally:
            cleaned.append(True)

    coro = needs_a_loop()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "coroutine was never awaited"
        with pytest.raises(RuntimeError, match="needs an event loop"):
            run_inline(coro)
    assert cleaned == [True]  # closed: its finally ran


def test_waiting_blocks_until_the_worker_is_done() -> None:
    async def use(key: Waiting[str]) -> str:
        return await key + "!"

    def make_key() -> str:
        time.sleep(0.05)
        return "key"

    with ThreadPoolExecutor(max_workers=1) as pool:
        started = time.perf_counter()
        future = pool.submit(make_key)
        assert run_inline(use(Waiting(future))) == "key!"
        assert time.perf_counter() - started >= 0.05


def test_waiting_raises_what_the_worker_raised() -> None:
    future: Future[str] = Future()
    future.set_exception(ValueError("no key"))

    async def use() -> str:
        return await Waiting(future)

    with pytest.raises(ValueError, match="no key"):
        run_inline(use())


def test_blocking_sleep_sleeps_without_a_loop() -> None:
    started = time.perf_counter()
    run_inline(blocking_sleep(0.02))
    assert time.perf_counter() - started >= 0.02


def test_background_runs_in_its_own_thread_and_times_itself() -> None:
    def work(x: int) -> tuple[int, str]:
        time.sleep(0.02)
        return x + 1, threading.current_thread().name

    job = Background(work, 41, name="keygen")
    assert job.result() == (42, "keygen")
    assert job.exception() is None
    assert job.seconds >= 0.02


def test_background_hands_its_error_over() -> None:
    def fail() -> None:
        raise OSError("disk full")

    job = Background(fail)
    assert isinstance(job.exception(), OSError)
    with pytest.raises(OSError, match="disk full"):
        job.result()

    async def use() -> None:
        await Waiting(job)

    with pytest.raises(OSError, match="disk full"):
        run_inline(use())
