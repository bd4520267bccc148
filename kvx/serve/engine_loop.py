"""The one thread that owns the BatchEngine.

The engine is single-threaded, so everything that touches it happens here: requests and cancellations
arrive through a thread-safe inbox, the thread steps the batch while it has work (one scheduler iteration
per step: admit, at most one prefill, one batched decode step), and hands text pieces and finished
sequences back to each request's asyncio queue with `call_soon_threadsafe`. The event loop never waits
for the model.

Stopping drains: submissions are refused (503) at once, work already accepted runs to its end (or is
cancelled by its handler), then the thread exits.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading

from kvx.errors import KvxError
from kvx.runtime.sequence import CANCELLED, FAILED, FINISHED, WAITING
from kvx.serve.metrics import RateMeter

log = logging.getLogger("kvx.serve")

# What a job's event queue carries, in order: ACCEPTED or (REFUSED, message); then (TEXT, piece) while it
# streams; then (DONE, the finished Sequence) or (BROKEN, message) when the engine itself failed.
ACCEPTED, REFUSED, TEXT, DONE, BROKEN = "accepted", "refused", "text", "done", "broken"
_SUBMIT, _CANCEL, _STOP = "submit", "cancel", "stop"
_OUTCOME = {FINISHED: "finished", CANCELLED: "cancelled", FAILED: "failed"}


class QueueFull(Exception):
    pass


class ShuttingDown(Exception):
    pass


class Job:
    """One API request as the engine thread and the event loop share it. Create it on the event loop."""

    def __init__(self, request, stream: bool):
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()
        self.request = request
        request.id = self  # a finished Sequence leads back to its job
        if stream:
            request.on_text = lambda seq, question, piece: self.post(TEXT, piece)
        self.seq = None  # the engine thread's, once submitted
        self.ended = False  # the handler has read the last event (refused, done or broken)

    def post(self, kind: str, value=None) -> None:
        """Queue an event for the handler (from any thread)."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass

    async def next_event(self) -> tuple[str, object]:
        kind, value = await self.events.get()
        if kind in (REFUSED, DONE, BROKEN):
            self.ended = True
        return kind, value


class EngineLoop:
    def __init__(self, batch, max_queue: int, idle_wait: float = 0.25):
        if max_queue < 1:
            raise KvxError("--max-queue must be at least 1")
        self.batch = batch
        self.max_queue = max_queue
        self.idle_wait = idle_wait  # how often an idle engine refreshes the metrics
        self.outcomes = {"finished": 0, "cancelled": 0, "failed": 0, "rejected": 0}
        self.snapshot: dict = {}
        self._prompt_tokens = 0
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()  # guards _queued, _accepting and outcomes (both threads write them)
        self._queued = 0  # accepted by submit() and not admitted to the batch yet
        self._accepting = True
        self._waiting: set[Job] = set()  # engine thread: in the batch's waiting queue
        self._live: set[Job] = set()  # engine thread: submitted and not done
        self._meter = RateMeter()
        self._thread = threading.Thread(target=self._run, name="kvx-engine", daemon=True)

    # -- the event loop's side ---------------------------------------------------------------------
    def start(self) -> None:
        self._publish()
        self._thread.start()

    def submit(self, job: Job) -> None:
        """Hand a job to the engine; QueueFull / ShuttingDown at once when it cannot be taken."""
        with self._lock:
            if not self._accepting:
                raise ShuttingDown()
            if self._queued >= self.max_queue:
                self.outcomes["rejected"] += 1
                raise QueueFull()
            self._queued += 1
        self._inbox.put((_SUBMIT, job))

    def cancel(self, job: Job) -> None:
        """Stop a job (its client went away); the engine thread frees its blocks at its next turn."""
        self._inbox.put((_CANCEL, job))

    def release(self, job: Job) -> None:
        """The handler is done with `job`: cancel it unless it already ended."""
        if not job.ended:
            self.cancel(job)

    def stop(self, timeout: float | None = None) -> None:
        """Refuse new jobs, let the accepted ones end, and wait for the thread."""
        with self._lock:
            self._accepting = False
        self._inbox.put((_STOP, None))
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # -- the engine thread --------------------------------------------------------------------------
    def _run(self) -> None:
        stopping = False
        while True:
            try:
                stopping |= self._take_inbox(block=not self.batch.has_work)
                if self.batch.has_work:
                    self._step()
                self._publish()
            except Exception as exc:  # a bug: fail what is running, keep the thread (and the server) alive
                log.exception("the engine loop failed")
                self._fail_all(_internal(exc))
            if stopping and not self.batch.has_work:
                return

    def _take_inbox(self, block: bool) -> bool:
        """Carry out what the event loop asked for; True when asked to stop."""
        stop = False
        try:
            item = self._inbox.get(timeout=self.idle_wait) if block else self._inbox.get_nowait()
        except queue.Empty:
            return False
        while True:
            kind, job = item
            if kind == _SUBMIT:
                self._submit(job)
            elif kind == _CANCEL:
                self._cancel(job)
            else:
                stop = True
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return stop

    def _submit(self, job: Job) -> None:
        try:
            seq = self.batch.submit(job.request)
        except KvxError as exc:  # can never run: too long, or larger than the whole pool
            self._leave_queue(outcome="rejected")
            job.post(REFUSED, str(exc))
            return
        except Exception as exc:
            log.exception("the engine could not take a request")
            self._leave_queue(outcome="failed")
            job.post(BROKEN, _internal(exc))
            return
        job.seq = seq
        self._live.add(job)
        self._waiting.add(job)
        self._prompt_tokens += seq.prompt_tokens
        job.post(ACCEPTED)

    def _cancel(self, job: Job) -> None:
        if job not in self._live:
            return  # refused, or already done
        self.batch.cancel(job.seq)  # its blocks go back to the pool now
        self.batch.finished.clear()  # reported here; the next step() must not report it again
        self._retire(job)

    def _step(self) -> None:
        done = self.batch.step()  # it returns and forgets what finished (nothing grows for the server's life)
        for seq in done:
            job = seq.request.id
            self._retire(job)
            job.post(DONE, seq)
        for job in [j for j in self._waiting if j.seq.state != WAITING]:
            self._waiting.discard(job)
            self._leave_queue()

    def _retire(self, job: Job) -> None:
        self._live.discard(job)
        if job in self._waiting:
            self._waiting.discard(job)
            self._leave_queue()
        with self._lock:
            self.outcomes[_OUTCOME.get(job.seq.state, "failed")] += 1

    def _fail_all(self, message: str) -> None:
        for job in list(self._live):
            try:
                self.batch.cancel(job.seq)
            except Exception:
                log.exception("could not cancel a request after an engine failure")
            job.seq.state = FAILED
            self._retire(job)
            job.post(BROKEN, message)
        self.batch.finished.clear()  # reported here; the next step() must not report them again
        if self.batch.has_work:  # sequences the failed step left half-retired: forget them
            self.batch.scheduler.running.clear()
            self.batch.scheduler.waiting.clear()

    def _leave_queue(self, outcome: str | None = None) -> None:
        with self._lock:
            self._queued -= 1
            if outcome:
                self.outcomes[outcome] += 1

    def _publish(self) -> None:
        self._meter.add(self.batch.generated_tokens)
        # One assignment: the event loop reads a consistent snapshot without a lock.
        self.snapshot = {**self.batch.stats(), "queued": self._queued, "tokens_per_s": self._meter.rate(),
                         "prompt_tokens": self._prompt_tokens}


def _internal(exc: Exception) -> str:
    return f"internal error in the engine ({type(exc).__name__}: {exc})"
