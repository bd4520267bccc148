"""Live status on a terminal's stderr, for work that takes long: never on a pipe, never with --quiet.

BatchProgress is `kvx generate --jsonl`'s line. The input is streamed, so there is no total: it counts
results written, lines failed, sequences running and waiting, the KV pool's bytes in use and the generated
tokens per second so far; per-line error messages print above it. PrefillStatus is a single prompt's
spinner while it is prefilled and compressed (minutes for a long prompt on a CPU), gone at the first token.
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
        self._t0 = time.perf_counter()  # the rate counts from the first request, not from the model load
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


# Shorter prompts are prefilled in about a second on a CPU: a spinner would only flicker.
PREFILL_STATUS_MIN_TOKENS = 512


class PrefillStatus:
    def __init__(self, text: str, console=None):
        from rich.console import Console

        self.console = console or Console(stderr=True)
        self._status = self.console.status(text, spinner="dots")
        self._running = False

    @classmethod
    def for_stderr(cls, tokens: int, quiet: bool, what: str = "") -> "PrefillStatus | None":
        if quiet or tokens < PREFILL_STATUS_MIN_TOKENS or not sys.stderr.isatty():
            return None
        return cls(f"prefilling {tokens:,} tokens{what}")

    def start(self) -> "PrefillStatus":
        self._status.start()
        self._running = True
        return self

    def stop(self) -> None:
        """Idempotent: at the first streamed text, and again when the generation returns or fails."""
        if self._running:
            self._status.stop()
            self._running = False
