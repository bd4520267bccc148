"""The process group a tensor-parallel rank computes with: all-reduce for the row-parallel layers, an
all-gather for a compression's statistics, a broadcast of rank 0's decisions. Every collective runs under
the group's timeout (torch.distributed's, set at start-up), so a rank that stops answering ends the run
instead of hanging it."""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor

DEFAULT_TIMEOUT_S = 300.0  # KVX_TP_TIMEOUT overrides: the longest a collective waits for a peer
START_TIMEOUT_S = 600.0  # the longest the spawned ranks take to meet


def timeout_s() -> float:
    return float(os.environ.get("KVX_TP_TIMEOUT", DEFAULT_TIMEOUT_S))


class TPGroup:
    """Rank `rank` of `world`; `device` is where its tensors live (gloo: the CPU, NCCL: its GPU)."""

    def __init__(self, rank: int, world: int, device: torch.device):
        self.rank, self.world, self.device = rank, world, torch.device(device)
        self.comm_s = 0.0  # wall time spent in collectives (the benchmark's communication share)
        self.calls = 0
        self.plans = None  # the process group of rank 0's plans (start())
        self.replicas = None  # the process group of the ranks holding this rank's kv head (join_replicas())

    @classmethod
    def start(cls, rank: int, world: int, device: str, init_method: str) -> "TPGroup":
        backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(torch.device(device))
        timeout = timedelta(seconds=timeout_s())
        if init_method.startswith("tcp://"):
            # The ranks kvx spawns meet at rank 0's store; starting a rank (importing torch, on a busy
            # machine) may take longer than a collective may: the meeting waits up to START_TIMEOUT_S (a rank
            # that dies on the way is seen at once by rank 0's watchdog).
            host, port = init_method[len("tcp://"):].rsplit(":", 1)
            store = dist.TCPStore(host, int(port), world, is_master=rank == 0,
                                  timeout=timedelta(seconds=max(timeout_s(), START_TIMEOUT_S)))
            dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
        else:
            dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world, timeout=timeout)
        group = cls(rank, world, torch.device(device))
        # Rank 0's plans (plan.py) travel on a group of their own, on the CPU, without the collectives'
        # timeout: a server's ranks wait for the next request as long as it takes (a rank that dies closes
        # its connections, which ends the wait at once).
        group.plans = dist.new_group(backend="gloo", timeout=timedelta(days=365))
        return group

    def join_replicas(self, groups: list[list[int]]) -> None:
        """With fewer kv heads than ranks: `groups` lists, per kv head, the ranks holding it. Every rank
        calls this with the same groups (torch.distributed.new_group's rule) and keeps its own; the
        replicas then sum (sum_replicas) and gather (gather_replicas) what each computes over its part
        of the head's query heads."""
        for ranks in groups:
            group = dist.new_group(ranks, timeout=timedelta(seconds=timeout_s()))
            if self.rank in ranks:
                self.replicas = group

    def sum_replicas(self, t: Tensor) -> Tensor:
        """The sum over the ranks holding this rank's kv head (the same shape on each)."""
        t = t.contiguous()
        self._timed(dist.all_reduce, t, dist.ReduceOp.SUM, self.replicas)
        return t

    def gather_replicas(self, t: Tensor, dim: int) -> Tensor:
        """The replicas' `t` concatenated along `dim` in rank order (their query heads, in the model's order)."""
        t = t.contiguous()
        out = [torch.empty_like(t) for _ in range(dist.get_world_size(self.replicas))]
        self._timed(dist.all_gather, out, t, self.replicas)
        return torch.cat(out, dim=dim)

    def _timed(self, fn, *args):
        import time

        t0 = time.perf_counter()
        out = fn(*args)
        self.comm_s += time.perf_counter() - t0
        self.calls += 1
        return out

    def all_reduce(self, t: Tensor) -> Tensor:
        """The sum over ranks (the row-parallel o_proj / down_proj outputs); bitwise the same on every rank."""
        t = t.contiguous()
        self._timed(dist.all_reduce, t)
        return t

    def all_reduce_max(self, t: Tensor) -> Tensor:
        """The elementwise maximum over ranks (a row-parallel slice's row maxima: the whole row's)."""
        t = t.contiguous()
        self._timed(dist.all_reduce, t, dist.ReduceOp.MAX)
        return t

    def all_gather(self, t: Tensor) -> list[Tensor]:
        """Every rank's `t` (the same shape on each), in rank order."""
        t = t.contiguous()
        out = [torch.empty_like(t) for _ in range(self.world)]
        self._timed(dist.all_gather, out, t)
        return out

    def gather_objects(self, obj) -> list | None:
        """Rank 0: every rank's `obj` (picklable: a stored context's kept entries, on the host), in rank
        order; None on the other ranks. On the plans' gloo group: host objects, whatever the backend."""
        out = [None] * self.world if self.rank == 0 else None
        self._timed(dist.gather_object, obj, out, 0, self.plans)
        return out

    def broadcast_ints(self, values: list[int], n: int) -> list[int]:
        """Rank 0's n ints on every rank (its decisions: the tokens it sampled). Every rank runs the same
        steps, so every rank knows n; a rank that disagrees fails the collective instead of hanging it."""
        if n == 0:
            return []
        buf = (torch.tensor(values, dtype=torch.long, device=self.device) if self.rank == 0
               else torch.empty(n, dtype=torch.long, device=self.device))
        self._timed(dist.broadcast, buf, 0)
        return buf.tolist()

    def agree(self, flag: bool) -> bool:
        """True on every rank when it is true on every rank (an admission every rank can promise)."""
        t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=self.device)
        self._timed(dist.all_reduce, t, dist.ReduceOp.MIN)
        return bool(t.item())

    def min_int(self, value: int) -> int:
        t = torch.tensor([value], dtype=torch.long, device=self.device)
        self._timed(dist.all_reduce, t, dist.ReduceOp.MIN)
        return int(t.item())

    def send_plan(self, plan) -> None:
        """Rank 0: what the other ranks must do before the next step (any picklable object)."""
        self._timed(dist.broadcast_object_list, [plan], 0, self.plans)

    def recv_plan(self):
        box = [None]
        dist.broadcast_object_list(box, 0, self.plans)
        return box[0]

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
