"""Starting the ranks of a tensor-parallel run, and ending it with one line when one of them fails.

`run_ranks(world, fn, args)` runs fn(tp, *args) on every rank and returns rank 0's result:
- under torchrun (RANK / WORLD_SIZE / MASTER_ADDR in the environment) this process is one rank; torchrun
  started the others, on this machine or on several (`torchrun --nnodes`);
- otherwise kvx starts the ranks itself: this process is rank 0 (it owns the command line, prints and
  streams), ranks 1..N-1 are spawned processes (torch.multiprocessing's spawn context) that print nothing.

NCCL between GPUs (rank r on cuda:r, or LOCAL_RANK under torchrun), gloo on the CPU. Every rank runs the
same steps (the same options, the same requests); the tokens are rank 0's (broadcast each step), and a
compression's statistics are gathered so every rank selects alike (selection.py).

Failure: a spawned rank that raises sends its error to rank 0 before exiting; a watchdog thread in rank 0
sees any rank's exit (a signal included) and ends the run with one line naming the rank and the cause,
stopping the others, so nothing hangs; every collective also has a timeout (group.py). A spawned rank
exits when rank 0 goes away.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time

from kvx.errors import KvxError

EXIT_RANK_FAILED = 1


class RankFailed(KvxError):
    """A rank failed; the message names it."""


_PASS_THROUGH = (KvxError, KeyboardInterrupt, SystemExit, BrokenPipeError)


def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ


def rank_device(device: str, local_rank: int) -> str:
    return f"cuda:{local_rank}" if device.startswith("cuda") else "cpu"


def run_ranks(world: int, fn, args: tuple = (), rank0_kwargs: dict | None = None, device: str = "cpu"):
    """fn(tp, *args) on `world` ranks (fn a module-level function, args picklable); rank 0 also gets
    rank0_kwargs (callbacks that stay in this process). Returns rank 0's result (None on another rank
    under torchrun)."""
    if under_torchrun():
        return _run_torchrun(world, fn, args, rank0_kwargs or {}, device)
    return _run_spawned(world, fn, args, rank0_kwargs or {}, device)


def _threads(world: int) -> None:
    """The ranks of one machine share its cores: each takes its part (never more than it had)."""
    import torch

    torch.set_num_threads(max(1, min(torch.get_num_threads(), (os.cpu_count() or 1) // world)))


def _run_torchrun(world: int, fn, args, rank0_kwargs, device):
    from kvx.runtime.parallel.group import TPGroup

    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if size != world:
        raise KvxError(f"--tensor-parallel {world} but torchrun started {size} processes (WORLD_SIZE)")
    local = int(os.environ.get("LOCAL_RANK", rank))
    tp = TPGroup.start(rank, world, rank_device(device, local), "env://")
    if rank != 0:
        _silence()
    try:
        result = fn(tp, *args, **(rank0_kwargs if rank == 0 else {}))
    finally:
        tp.close()
    return result if rank == 0 else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _silence() -> None:
    devnull = open(os.devnull, "w")
    sys.stdout = devnull


def _follower(rank: int, world: int, init_method: str, device: str, fn, args, errors, parent: int) -> None:
    """A spawned rank: runs fn, reports its error to rank 0, exits when rank 0 is gone."""
    _silence()
    sys.stderr = open(os.devnull, "w")
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
    try:
        from kvx.runtime.parallel.group import TPGroup

        _threads(world)
        tp = TPGroup.start(rank, world, rank_device(device, rank), init_method)
        fn(tp, *args)
        tp.close()
    except BaseException as exc:  # noqa: BLE001 - reported to rank 0, which prints it
        errors.put((rank, describe(exc)))
        os._exit(EXIT_RANK_FAILED)
    os._exit(0)


def _watch_parent(parent: int) -> None:
    while True:
        if os.getppid() != parent:
            os._exit(EXIT_RANK_FAILED)
        time.sleep(0.5)


def describe(exc: BaseException) -> str:
    if isinstance(exc, KvxError):
        return str(exc)
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


class _Monitor:
    """Rank 0's watchdog over the spawned ranks."""

    def __init__(self, procs: dict, errors):
        self.procs, self.errors = procs, errors
        self.lock = threading.Lock()
        self.main_failed = False
        self.dead: tuple[int, str] | None = None
        self.stopped = threading.Event()

    def start(self) -> None:
        threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self) -> None:
        while not self.stopped.wait(0.1):
            found = self._find_dead()
            if found is None:
                continue
            with self.lock:
                self.dead = found
                if self.main_failed:
                    return  # the main thread reports it
            time.sleep(0.5)  # let the main thread fail its collective and report it
            with self.lock:
                if self.main_failed or self.stopped.is_set():
                    return
            self.report_and_exit(found)

    def _find_dead(self) -> tuple[int, str] | None:
        for rank, proc in self.procs.items():
            code = proc.exitcode
            if code is not None and code != 0:
                return rank, self._why(rank, code)
        return None

    def _why(self, rank: int, code: int) -> str:
        reported = {}
        while not self.errors.empty():
            r, cause = self.errors.get()
            reported[r] = cause
        if rank in reported:
            return f"failed: {reported[rank]}"
        if code < 0:
            try:
                return f"died: killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"died: killed by signal {-code}"
        return f"died with exit code {code}"

    def wait_dead(self, seconds: float) -> tuple[int, str] | None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            found = self.dead or self._find_dead()
            if found is not None:
                return found
            time.sleep(0.05)
        return None

    def stop_all(self) -> None:
        self.stopped.set()
        for proc in self.procs.values():
            if proc.exitcode is None:
                proc.kill()
        for proc in self.procs.values():
            proc.join(5)

    def report_and_exit(self, found: tuple[int, str]) -> None:
        rank, cause = found
        self.stop_all()
        print(f"kvx: error: tensor-parallel rank {rank} {cause}; the run was stopped", file=sys.stderr, flush=True)
        os._exit(EXIT_RANK_FAILED)


def _run_spawned(world: int, fn, args, rank0_kwargs, device):
    import torch.multiprocessing as mp

    from kvx.runtime.parallel.group import TPGroup, timeout_s

    init_method = f"tcp://127.0.0.1:{_free_port()}"
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    procs = {}
    for rank in range(1, world):
        proc = ctx.Process(target=_follower, args=(rank, world, init_method, device, fn, args, errors, os.getpid()),
                           daemon=True)
        proc.start()
        procs[rank] = proc
    monitor = _Monitor(procs, errors)
    monitor.start()
    tp = None
    import torch

    threads = torch.get_num_threads()  # given back when the run ends (a test process goes on)
    try:
        _threads(world)
        tp = TPGroup.start(0, world, rank_device(device, 0), init_method)
        result = fn(tp, *args, **rank0_kwargs)
    except BaseException as exc:
        with monitor.lock:
            monitor.main_failed = True
        own = isinstance(exc, _PASS_THROUGH)  # rank 0's own user error, Ctrl-C, a closed pipe: as on one rank
        found = None if own else monitor.wait_dead(3.0)  # another rank's death explains a failed collective
        monitor.stop_all()
        if tp is not None:
            tp.close()
        if found is not None:
            raise RankFailed(f"tensor-parallel rank {found[0]} {found[1]}; the run was stopped") from None
        if own:
            raise
        # Rank 0 failed to start, or a collective failed or timed out (a rank stopped answering): one line.
        raise RankFailed(f"tensor-parallel rank 0 failed: {describe(exc)}; the other ranks were stopped") from exc
    finally:
        torch.set_num_threads(threads)
    monitor.stopped.set()
    for proc in procs.values():
        proc.join(timeout_s())
        if proc.exitcode is None:
            proc.kill()
    tp.close()
    failed = monitor._find_dead()
    if failed is not None:
        raise RankFailed(f"tensor-parallel rank {failed[0]} {failed[1]}")
    return result
