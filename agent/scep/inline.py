"""Running the async SCEP flow without an event loop, for one-shot commands.

`enroll()` and `ScepClient` are coroutines so that the daemon and fleets interleave thousands
of devices on one loop. A one-shot command has nothing to interleave: with the blocking
transport (`agent.httpio.BlockingHttp`) and key operations run inline (`enroll(...,
offload=False)`) none of these coroutines ever suspends, so `run_inline` steps one to its
end directly. Importing asyncio (and with it ssl, concurrent.futures, selectors...) and
starting a loop cost a one-shot command more than its HTTP conversation. The protocol code
is the same either way; only the driver differs.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Coroutine, Generator
from typing import Any, Generic, Protocol, TypeVar, cast

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)


class _Result(Protocol[T_co]):
    def result(self, timeout: float | None = None) -> T_co: ...


def run_inline(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine that never suspends to its end; refuse one that does (it needs an
    event loop: something in it awaited real asynchronous I/O or a sleep)."""
    try:
        coro.send(None)
    except StopIteration as done:
        return cast(T, done.value)
    coro.close()
    raise RuntimeError("the coroutine suspended: it needs an event loop (asyncio.run), "
                       "not run_inline")


class Waiting(Generic[T]):
    """An awaitable for `future` (e.g. a key being made in a worker thread) that blocks the
    calling thread until it is done instead of suspending: awaitable under `run_inline`."""

    def __init__(self, future: _Result[T]) -> None:
        self._future = future

    def __await__(self) -> Generator[Any, None, T]:
        yield from ()  # a generator that never yields: the await completes at once
        return self._future.result()


class Background(Generic[T]):
    """`fn(*args)` running in a thread of its own, e.g. a key being made while the command
    imports the SCEP stack and asks the CA; `Waiting(job)` awaits it. (What a one-worker
    ThreadPoolExecutor does, without importing concurrent.futures.)"""

    def __init__(self, fn: Callable[..., T], *args: Any, name: str = "background") -> None:
        self.seconds = 0.0  # how long fn ran
        self._result: T | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn, args), name=name)
        self._thread.start()

    def _run(self, fn: Callable[..., T], args: tuple[Any, ...]) -> None:
        started = time.perf_counter()
        try:
            self._result = fn(*args)
        except BaseException as exc:  # handed to whoever asks for the result
            self._error = exc
        finally:
            self.seconds = time.perf_counter() - started

    def exception(self) -> BaseException | None:
        """Wait for the end; what fn raised, or None."""
        self._thread.join()
        return self._error

    def result(self, timeout: float | None = None) -> T:
        """Wait for the end (`timeout` is not supported); fn's result, or raise its error."""
        if self.exception() is not None:
            raise cast(BaseException, self._error)
        return cast(T, self._result)


async def blocking_sleep(seconds: float) -> None:
    """`asyncio.sleep` for `run_inline`: the thread sleeps (PENDING polls wait minutes)."""
    time.sleep(seconds)
