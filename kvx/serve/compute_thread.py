"""The one thread that runs tensor work in a server: it loads the model, builds the engine, then steps it.

PyTorch's CPU kernels run their parallel parts on an OpenMP team, and each thread that runs a parallel op
gets a team of its own. Once a second thread has one, every parallel op gets slower: on the project's 2-core
machine a 4-row int8 linear took 1.5x as long, a decode attention matmul 2.2x, and a whole batched decode
step 44 → 60-67 ms, when the model was loaded on the main thread and stepped on the engine thread, against
loading and stepping it on one thread either way (benchmarks/engine_thread.py, docs/benchmarks.md). So
nothing of the model runs on the event loop's thread: the server hands its build to this thread (`run`),
then its engine loop (`start`).
"""

from __future__ import annotations

import queue
import threading
from typing import Callable, TypeVar

T = TypeVar("T")
_END = object()


class ComputeThread:
    """A daemon thread that runs the callables it is given, one after another, in order."""

    def __init__(self, name: str = "kvx-engine"):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def run(self, fn: Callable[[], T]) -> T:
        """fn() on this thread; waits for it and returns its result or raises its exception here."""
        done = threading.Event()
        box: dict = {}
        self._jobs.put((fn, box, done))
        done.wait()
        if "error" in box:
            raise box["error"]
        return box["result"]

    def start(self, fn: Callable[[], None]) -> None:
        """Run fn() (a loop) on this thread without waiting; the thread ends when fn returns."""
        self._jobs.put((fn, None, None))
        self._jobs.put((_END, None, None))

    def close(self) -> None:
        """End the thread once what it was given has run."""
        self._jobs.put((_END, None, None))

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def _serve(self) -> None:
        while True:
            fn, box, done = self._jobs.get()
            if fn is _END:
                return
            if box is None:  # start(): the engine loop handles its own errors
                fn()
                continue
            try:
                box["result"] = fn()
            except BaseException as exc:  # noqa: BLE001 - handed to the caller of run()
                box["error"] = exc
            finally:
                done.set()
