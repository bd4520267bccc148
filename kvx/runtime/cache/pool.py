"""The shared KV pool: fixed-size blocks that every running sequence draws from.

One pool serves all layers (a block belongs to one (sequence, layer, kv head) segment at a time), so a
single free list caps and accounts the whole KV cache: what a compaction frees is at once usable by any
other request, in any layer. A block holds `block_size` consecutive entries of one segment: keys (RoPE'd),
values, absolute positions and the decode-time attention mass H2O / TOVA keep per key.

Admission works on reservations: a request reserves the most blocks it can ever hold before it starts,
so allocations inside the engine never fail and nothing is evicted by running out of memory. Blocks are
addressed by index only, so a tensor-parallel rank can own a pool of its own kv heads' blocks.
"""

from __future__ import annotations

import torch

from kvx.errors import KvxError

# Entries per block. Small enough that the waste per segment (< one block) stays small at a 5% budget,
# large enough that block tables stay short at long contexts.
DEFAULT_BLOCK_SIZE = 32


class PoolExhausted(RuntimeError):
    """An allocation beyond the pool's free blocks: a reservation was wrong. A bug, not a user's error, so
    not a KvxError: it must never read as bad input (exit 2)."""


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str):
        if num_blocks <= 0 or block_size <= 0:
            raise KvxError("the KV pool needs at least one block of at least one entry")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.head_dim = head_dim
        self.dtype = dtype
        self.device = torch.device(device)
        # empty, not zeros: on the CPU untouched pages cost nothing. A block is zeroed when it is handed out
        # instead: its slots past a segment's length are then finite (so a zero probability zeroes them in
        # the reference attention) and its mass reads zero.
        # One block more than the cap, never handed out: the scratch block that the padding sequences of a
        # captured batched step (runtime/engine/batch_step.py) write to and read from.
        self.scratch = num_blocks
        self.k = torch.empty(num_blocks + 1, block_size, head_dim, dtype=dtype, device=self.device)
        self.v = torch.empty(num_blocks + 1, block_size, head_dim, dtype=dtype, device=self.device)
        self.pos = torch.zeros(num_blocks + 1, block_size, dtype=torch.int64, device=self.device)
        self.mass = torch.zeros(num_blocks + 1, block_size, dtype=torch.float32, device=self.device)
        if self.device.type != "meta":
            self.k[num_blocks].zero_()
            self.v[num_blocks].zero_()
        self._free = list(range(num_blocks - 1, -1, -1))  # a stack: low block ids are handed out first
        self.reserved = 0  # blocks promised to admitted requests (held or still to be allocated)

    @classmethod
    def for_memory(cls, memory_bytes: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                   device, block_size: int = DEFAULT_BLOCK_SIZE) -> "BlockPool":
        """A pool whose K+V blocks fit in memory_bytes."""
        per_block = block_bytes(block_size, head_dim, dtype)
        n = memory_bytes // per_block
        if n < 1:
            raise KvxError(f"--kv-memory {memory_bytes} bytes holds no block ({per_block} bytes each)")
        return cls(int(n), block_size, head_dim, dtype, device)

    # -- flat views: slot s of the pool is entry s % B of block s // B -----------------------------
    @property
    def k_flat(self):
        return self.k.view(-1, self.head_dim)

    @property
    def v_flat(self):
        return self.v.view(-1, self.head_dim)

    @property
    def pos_flat(self):
        return self.pos.view(-1)

    @property
    def mass_flat(self):
        return self.mass.view(-1)

    # -- accounting -------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def block_bytes(self) -> int:
        """K + V bytes of one block (positions and mass are bookkeeping, not counted as KV)."""
        return block_bytes(self.block_size, self.head_dim, self.dtype)

    @property
    def bytes_total(self) -> int:
        return self.num_blocks * self.block_bytes

    def blocks_for(self, entries: int) -> int:
        return -(-max(entries, 0) // self.block_size)

    # -- reservations (admission) -----------------------------------------------------------------
    def can_reserve(self, blocks: int) -> bool:
        return self.reserved + blocks <= self.num_blocks

    def reserve(self, blocks: int) -> None:
        if not self.can_reserve(blocks):
            raise PoolExhausted(f"cannot reserve {blocks} blocks: {self.num_blocks - self.reserved} unreserved")
        self.reserved += blocks

    def release(self, blocks: int) -> None:
        self.reserved -= blocks
        assert self.reserved >= 0, "released more blocks than were reserved"

    # -- blocks -----------------------------------------------------------------------------------
    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise PoolExhausted(f"the KV pool has {len(self._free)} free blocks, {n} were asked for")
        blocks = [self._free.pop() for _ in range(n)]
        if blocks:
            idx = torch.tensor(blocks, device=self.device)
            self.k[idx] = 0
            self.v[idx] = 0
            self.mass[idx] = 0.0
        return blocks

    def free(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))

    def stats(self) -> dict:
        return {"blocks_total": self.num_blocks, "blocks_used": self.num_used, "blocks_free": self.num_free,
                "blocks_reserved": self.reserved, "block_size": self.block_size,
                "bytes_total": self.bytes_total, "bytes_used": self.num_used * self.block_bytes}


def block_bytes(block_size: int, head_dim: int, dtype: torch.dtype) -> int:
    """K + V bytes of one block."""
    return 2 * block_size * head_dim * torch.empty((), dtype=dtype).element_size()


# Bytes per slot beside K and V that the pool allocates: the int64 position and the float32 mass.
SLOT_EXTRA_BYTES = 12


def pool_block_bytes(block_size: int, head_dim: int, dtype: torch.dtype) -> int:
    """Bytes one block occupies in memory: K, V, positions and mass (what the memory check counts)."""
    return block_bytes(block_size, head_dim, dtype) + block_size * SLOT_EXTRA_BYTES


def default_kv_memory(device: torch.device | str) -> int:
    """The KV pool's size when --kv-memory is not given: a share of what the device has free.

    GPU: 60% of the memory free once the model is loaded (the rest: a long prompt's prefill activations). CPU: a quarter of the available memory, at most 4 GiB — the pool is allocated lazily by the
    OS, but a cap keeps one kvx process from crowding out the rest of the machine.
    """
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.6)
    available = _meminfo_available()
    return min(4 << 30, available // 4) if available else 1 << 30


def _meminfo_available() -> int:
    """Bytes the OS can hand out without swapping (psutil: MemAvailable on Linux); 0 when unknown."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:  # noqa: BLE001 - a platform psutil cannot read: the caller falls back to 1 GiB
        return 0
