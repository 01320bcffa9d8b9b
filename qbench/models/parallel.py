"""How the numpy models use the machine's cores, without letting the core count change a result.

Two kinds of parallelism, and the rule that keeps results bit-identical on any machine size:

* a threaded BLAS for the big GEMMs (linear layers, im2col convolutions): OpenBLAS splits those
  over the output's rows and columns, so every element is still summed by one thread in one
  order, and the result is the same on 1 or N threads;
* Python threads over independent pieces of work (encoder windows, attention heads, feature
  encoder chunks): numpy releases the GIL inside BLAS calls and ufunc loops, so two threads
  run on two cores. Inside those threads the BLAS is held at one thread (`parallel_map` does
  it): some small GEMMs, such as an attention head's `[512, T] @ [T, 64]`, round differently
  when OpenBLAS threads them.

`using_threads(n)` sets the count for the work inside it (a run's `--threads`), else the
`QBENCH_THREADS` environment variable, else every CPU this process may run on. The setting is
a context variable, not a process global: two runs in two threads of one process (a sweep) each
keep their own count, and nothing outlives the block. On a machine loaded by other work a
threaded BLAS can be far slower than one thread (a sleeping BLAS thread waits for a scheduler
tick): set `QBENCH_THREADS=1` there.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from contextvars import ContextVar, copy_context
from functools import lru_cache
from typing import TypeVar

from threadpoolctl import ThreadpoolController

from qbench.errors import QBenchError

T = TypeVar("T")
R = TypeVar("R")


class ThreadCountError(QBenchError, ValueError):
    """A thread count that is not a positive integer."""


_THREADS: ContextVar[int | None] = ContextVar("qbench_threads", default=None)


@contextmanager
def using_threads(threads: int | None) -> Iterator[None]:
    """Run the block on `threads` threads (None: keep the surrounding setting)."""
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ThreadCountError(f"threads must be a positive integer, got {threads!r}")
    token = _THREADS.set(threads if threads is not None else _THREADS.get())
    try:
        yield
    finally:
        _THREADS.reset(token)


def compute_threads() -> int:
    """The thread count the models use: `using_threads`, else `QBENCH_THREADS`, else every CPU."""
    scoped = _THREADS.get()
    if scoped:
        return scoped
    env = os.environ.get("QBENCH_THREADS", "").strip()
    if env:
        if not env.isdigit() or int(env) < 1:
            raise ThreadCountError(f"QBENCH_THREADS must be a positive integer, got {env!r}")
        return int(env)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@lru_cache(maxsize=1)
def _blas_controller() -> ThreadpoolController:
    return ThreadpoolController()


def refresh_blas_libraries() -> None:
    """Look for BLAS libraries again at the next cap: call it after importing a package that
    brings its own (scipy ships an OpenBLAS of its own), so that one is capped too."""
    _blas_controller.cache_clear()


@contextmanager
def blas_threads_at_most(n: int) -> Iterator[None]:
    """Cap the BLAS thread pool at `n` inside the block (never raises it)."""
    blas = _blas_controller().select(user_api="blas")
    if all(lib["num_threads"] <= n for lib in blas.info()):
        yield
        return
    with blas.limit(limits=n):
        yield


def parallel_map(fn: Callable[[T], R], items: Iterable[T], threads: int) -> list[R]:
    """`[fn(item) for item in items]` on up to `threads` Python threads, BLAS single-threaded.

    The results are in the order of `items`; a worker's exception is raised here. One thread
    (or one item) runs in the caller's thread, still with the BLAS capped, so that the result
    never depends on `threads`.
    """
    items = list(items)
    with blas_threads_at_most(1):
        if threads <= 1 or len(items) <= 1:
            return [fn(item) for item in items]
        # workers start with an empty context: give each a copy of the caller's (its thread count)
        caller = copy_context()
        with ThreadPoolExecutor(min(threads, len(items)), thread_name_prefix="qbench") as pool:
            return list(pool.map(lambda item: caller.copy().run(fn, item), items))
