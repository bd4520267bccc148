"""The live status line of `kvx generate --jsonl` on stderr: what a long batched run is doing now.

Shown only on a terminal (a pipeline's log stays clean) and never with --quiet. The input is streamed, so
there is no total: the line counts results written, lines failed, sequences running and waiting, the
KV pool's bytes in use and the generated tokens per second so far. Per-line error messages print above it.
"""

from __future__ import annotations

import sys
import time


class BatchProgress:
    def __init__(self, console=None):
        from rich.console import Console
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        self.console = console or Console(stderr=True)
        self._progress = Progress(SpinnerColumn(), TimeElapsedColumn(), TextColumn("{task.description}"),
                                  console=self.console, transient=True)
        self._task = self._progress.add_task("loading the first requests", total=None)
        self._t0 = time.perf_counter()
        self.written = 0
        self.failed = 0

    @classmethod
    def for_stderr(cls, quiet: bool) -> "BatchProgress | None":
        return None if quiet or not sys.stderr.isatty() else cls()

    def __enter__(self) -> "BatchProgress":
        self._progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self._progress.stop()

    def update(self, stats: dict) -> None:
        """After an engine step: stats is BatchEngine.stats()."""
        from kvx.runtime.memory import human_bytes

        rate = stats["generated_tokens"] / max(time.perf_counter() - self._t0, 1e-9)
        text = (f"{self.written} done, {self.failed} failed · {stats['running']} running, {stats['waiting']} "
                f"waiting · KV {human_bytes(stats['bytes_used'])} · {rate:.1f} tok/s")
        self._progress.update(self._task, description=text)

    def note(self, message: str) -> None:
        """A message printed above the status line."""
        self.console.print(message, markup=False, highlight=False, soft_wrap=True)
