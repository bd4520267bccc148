"""The one thread that owns the BatchEngine (a ComputeThread: the one that loaded the model).

The engine is single-threaded, so everything that touches it happens here: requests and cancellations
arrive through a thread-safe inbox, the thread steps the batch while it has work (one scheduler iteration
per step: admit, at most one prefill, one batched decode step), and hands text pieces and finished
sequences back to each request's asyncio queue with `call_soon_threadsafe`. The event loop never waits
for the model.

Stopping drains: submissions are refused (503) at once, work already accepted runs to its end (or is
cancelled by its handler), then the thread exits.

Faults: the engine fails a request whose own prefill or decode raised (its state FAILED, `internal` when
the cause is a bug), and frees its blocks. An exception that escapes `step()` itself is handled here: the
requests that ended in that step get their answers, the admitted ones fail (500) and are cancelled through
the engine so their blocks and reservations go back, the waiting ones stay queued, and the thread goes on.

Metrics are observed here, where the tokens are made: after each step every live request's new output
tokens give its time to first token and the gaps between tokens; a request's end gives its end-to-end
latency and finish reason.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time

from kvx.errors import KvxError
from kvx.serve.compute_thread import ComputeThread
from kvx.runtime.engine.sequence import CANCELLED, FAILED, FINISHED, WAITING
from kvx.serve.metrics import ABORT, FINISHED_REASON, RateMeter, ServeMetrics

log = logging.getLogger("kvx.serve")

# What a job's event queue carries, in order: ACCEPTED or (REFUSED, message); then (TEXT, piece) while it
# streams; then (DONE, the finished Sequence) or (BROKEN, message) when the engine itself failed.
ACCEPTED, REFUSED, TEXT, DONE, BROKEN = "accepted", "refused", "text", "done", "broken"
_SUBMIT, _CANCEL, _CALL, _STOP = "submit", "cancel", "call", "stop"


class QueueFull(Exception):
    pass


class ShuttingDown(Exception):
    pass


class Job:
    """One API request as the engine thread and the event loop share it. Create it on the event loop."""

    def __init__(self, request, stream: bool, arrived: float | None = None):
        self.loop = asyncio.get_running_loop()
        self.arrived = time.perf_counter() if arrived is None else arrived  # perf_counter at the request's arrival
        self.tokens_seen = 0  # engine thread: output tokens already timed, and when the first and last came
        self.first_token_at = self.last_token_at = 0.0
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
    def __init__(self, batch, max_queue: int, idle_wait: float = 0.25, thread: ComputeThread | None = None):
        """thread: the ComputeThread that built `batch` (server.build_context); the loop runs on it, since the
        model must run on the thread that loaded it (compute_thread.py). None: a thread of its own."""
        if max_queue < 1:
            raise KvxError("--max-queue must be at least 1")
        self.batch = batch
        self.max_queue = max_queue
        self.idle_wait = idle_wait  # how often an idle engine refreshes the metrics
        self.snapshot: dict = {}
        self.metrics = ServeMetrics(lambda: self.snapshot)
        cfg = batch.engine.config
        # K+V bytes of one token in every (layer, kv head): what a full cache holds per token.
        self._token_bytes = cfg.num_layers * cfg.num_kv_heads * batch.pool.block_bytes // batch.pool.block_size
        self._prompt_tokens = 0
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()  # guards _queued and _accepting (both threads write them)
        self._queued = 0  # accepted by submit() and not admitted to the batch yet
        self._accepting = True
        self._waiting: set[Job] = set()  # engine thread: in the batch's waiting queue
        self._live: set[Job] = set()  # engine thread: submitted and not done
        self._meter = RateMeter()
        self._thread = thread or ComputeThread("kvx-engine")

    # -- the event loop's side ---------------------------------------------------------------------
    def start(self) -> None:
        self._publish()
        self._thread.start(self._run)

    def submit(self, job: Job) -> None:
        """Hand a job to the engine; QueueFull / ShuttingDown at once when it cannot be taken."""
        with self._lock:
            if not self._accepting:
                raise ShuttingDown()
            if self._queued >= self.max_queue:
                self.metrics.rejections.inc()
                raise QueueFull()
            self._queued += 1
        self._inbox.put((_SUBMIT, job))

    def cancel(self, job: Job) -> None:
        """Stop a job (its client went away); the engine thread frees its blocks at its next turn."""
        self._inbox.put((_CANCEL, job))

    async def call(self, fn):
        """fn() run on the engine thread between two steps (what touches the engine's state, e.g. a stored
        context's residency); its result, or its exception, comes back here."""
        if not self.alive:
            raise ShuttingDown()
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        self._inbox.put((_CALL, (fn, loop, done)))
        return await done

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
            except Exception as exc:  # a bug: fail what it concerns, keep the thread (and the server) alive
                log.exception("the engine loop failed")
                self._recover(_internal(exc))
            try:
                self._publish()
            except Exception:
                log.exception("could not publish the engine's state")
            if stopping and not self.batch.has_work:
                self._take_inbox(block=False)  # calls that came with the stop (a context being saved)
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
            elif kind == _CALL:
                self._call(*job)
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
            self._leave_queue()
            job.post(REFUSED, str(exc))
            return
        except Exception as exc:
            log.exception("the engine could not take a request")
            self._leave_queue()
            job.post(BROKEN, _internal(exc))
            return
        job.seq = seq
        self._live.add(job)
        self._waiting.add(job)
        self._prompt_tokens += seq.prompt_tokens
        job.post(ACCEPTED)

    @staticmethod
    def _call(fn, loop, done) -> None:
        try:
            result, error = fn(), None
        except Exception as exc:  # handed to the caller, who raises it on the event loop
            result, error = None, exc

        def settle() -> None:
            if not done.cancelled():
                done.set_exception(error) if error is not None else done.set_result(result)
        try:
            loop.call_soon_threadsafe(settle)
        except RuntimeError:  # the event loop is closed
            pass

    def _cancel(self, job: Job) -> None:
        if job not in self._live:
            return  # refused, or already done
        self.batch.cancel(job.seq)  # its blocks go back to the pool now
        self.batch.finished.clear()  # reported here; the next step() must not report it again
        self._retire(job)

    def _step(self) -> None:
        done = self.batch.step()  # it returns and forgets what finished (nothing grows for the server's life)
        self._after_step(done)

    def _after_step(self, done) -> None:
        now = time.perf_counter()
        for job in self._live:
            self._time_tokens(job, now)
        for seq in done:
            job = seq.request.id
            if job in self._live:
                self._retire(job)
                job.post(DONE, seq)
        for job in [j for j in self._waiting if j.seq.state != WAITING]:
            self._waiting.discard(job)
            self._leave_queue()

    def _time_tokens(self, job: Job, now: float) -> None:
        """Observe the output tokens `job` gained since the last look (one per step at most)."""
        n = len(job.seq.out_ids)
        if n <= job.tokens_seen:
            job.tokens_seen = min(job.tokens_seen, n)  # a new answer (another question) starts over
            return
        m = self.metrics
        if job.tokens_seen == 0:
            m.ttft.observe(now - job.arrived)
            for _ in range(n - 1):  # tokens that came together (never in one step today) have no gap
                m.itl.observe(0.0)
        else:
            gap = (now - job.last_token_at) / (n - job.tokens_seen)
            for _ in range(n - job.tokens_seen):
                m.itl.observe(gap)
        if job.tokens_seen == 0:
            job.first_token_at = now
        job.tokens_seen, job.last_token_at = n, now

    def _retire(self, job: Job) -> None:
        self._live.discard(job)
        if job in self._waiting:
            self._waiting.discard(job)
            self._leave_queue()
        seq, m = job.seq, self.metrics
        if seq.state == CANCELLED:
            m.success.labels(ABORT).inc()
        elif seq.state == FINISHED and seq.results:
            m.success.labels(FINISHED_REASON.get(seq.results[-1].finish_reason, "stop")).inc()
            m.e2e.observe(time.perf_counter() - job.arrived)
            n = seq.results[-1].generated_tokens
            if n > 1 and job.tokens_seen:
                m.tpot.observe((job.last_token_at - job.first_token_at) / (n - 1))

    def _recover(self, message: str) -> None:
        """After an exception escaped the engine: answer what ended, fail what was admitted (releasing its
        blocks through the engine), leave the waiting requests queued."""
        finished, self.batch.finished = list(self.batch.finished), []
        try:
            self._after_step(finished)
        except Exception:
            log.exception("could not report the requests that ended before the failure")
        for job in list(self._live):
            seq = job.seq
            if seq.done:  # ended in the failed step (its blocks are back): answer it as it ended
                self._retire(job)
                job.post(DONE, seq)
            elif seq.state != WAITING or job not in self._waiting:  # admitted: the step may have touched it
                self._fail(job, message)
        self.batch.finished.clear()  # reported here; the next step() must not report them again
        for seq in list(self.batch.scheduler.running) + list(self.batch.scheduler.waiting):
            if seq.request.id not in self._live and not seq.done:  # no handler waits on it: never leave it
                self._release(seq)

    def _fail(self, job: Job, message: str) -> None:
        self._release(job.seq)
        job.seq.state = FAILED
        self._retire(job)
        job.post(BROKEN, message)

    def _release(self, seq) -> None:
        """Give seq's blocks and reservation back; if the engine cannot, at least its reservation."""
        try:
            self.batch.cancel(seq)
        except Exception:
            log.exception("could not cancel a request after an engine failure")
            self.batch.scheduler.finish(seq)  # its reservation, and out of the lists

    def _leave_queue(self) -> None:
        with self._lock:
            self._queued -= 1

    def _publish(self) -> None:
        self._meter.add(self.batch.generated_tokens)
        # One assignment: the event loop reads a consistent snapshot without a lock.
        full = sum(s.prompt_tokens + len(s.out_ids) for s in self.batch.scheduler.running) * self._token_bytes
        self.snapshot = {**self.batch.stats(), "queued": self._queued, "tokens_per_s": self._meter.rate(),
                         "prompt_tokens": self._prompt_tokens, "bytes_full": full}


def _internal(exc: Exception) -> str:
    return f"internal error in the engine ({type(exc).__name__}: {exc})"
