"""Which slice of the decoder one tensor-parallel rank holds, and loading only that slice.

Rank r of N holds a contiguous range of kv heads with their query heads (a kv head's whole group stays on
one rank, so attention needs no communication), and a contiguous range of the MLP's intermediate units:
q/k/v and gate/up are split by output rows (column-parallel), o_proj and down_proj by input columns
(row-parallel; the model all-reduces their outputs). With fewer kv heads than ranks each kv head is
replicated on N / Hkv ranks and its group's query heads are split among them, as vLLM does.

The embedding and the LM head are replicated: sampling happens once, on rank 0, over the full logits, and
a vocabulary-split head would all-gather V logits per sequence per step (and a split embedding add an
all-reduce) to save V x D per rank; with tied embeddings (the default model) the head is the embedding
every rank needs anyway. Norm weights are tiny and replicated.

The rank's model is built with a *local* config (its own head and unit counts), so the runtime sizes its
pool, caches and kernels for the rank's heads without knowing about the others.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from kvx.errors import KvxError
from kvx.models.config import ModelConfig


@dataclass(frozen=True)
class Shard:
    rank: int
    world: int
    kv_lo: int  # kv heads [kv_lo, kv_hi) of the full model
    kv_hi: int
    q_lo: int  # query heads [q_lo, q_hi)
    q_hi: int
    i_lo: int  # intermediate units [i_lo, i_hi)
    i_hi: int

    @property
    def kv_heads(self) -> int:
        return self.kv_hi - self.kv_lo

    @property
    def q_heads(self) -> int:
        return self.q_hi - self.q_lo


def check_world(config: ModelConfig, world: int) -> None:
    """KvxError unless the model splits over `world` ranks."""
    H, Hkv = config.num_heads, config.num_kv_heads
    if world < 1:
        raise KvxError(f"--tensor-parallel must be at least 1, got {world}")
    if Hkv < world and (world % Hkv or H % world):
        raise KvxError(f"--tensor-parallel {world}: the model's {Hkv} kv heads cannot be replicated evenly "
                       f"over {world} ranks (use a multiple of {Hkv} that divides its {H} query heads)")
    if world > config.intermediate_size:
        raise KvxError(f"--tensor-parallel {world}: more ranks than the model's {config.intermediate_size} MLP units")


def shard_for(config: ModelConfig, rank: int, world: int) -> Shard:
    """Rank `rank`'s share. Kv heads are split as evenly as possible, the lower ranks taking the extra ones
    (a model with 3 kv heads on 2 ranks: 2 and 1), so rank 0, which schedules, holds the most: a request it
    can ever hold fits every rank (runtime/parallel/plan.py); with fewer kv heads than ranks they are
    replicated."""
    check_world(config, world)
    H, Hkv, I = config.num_heads, config.num_kv_heads, config.intermediate_size
    G = H // Hkv
    if Hkv >= world:
        kv_lo, kv_hi = -(-rank * Hkv // world), -(-(rank + 1) * Hkv // world)
        q_lo, q_hi = kv_lo * G, kv_hi * G
    else:
        kv_lo = rank * Hkv // world
        kv_hi = kv_lo + 1
        q_lo, q_hi = rank * H // world, (rank + 1) * H // world
    return Shard(rank, world, kv_lo, kv_hi, q_lo, q_hi, rank * I // world, (rank + 1) * I // world)


def replica_groups(config: ModelConfig, world: int) -> list[list[int]]:
    """Per kv head, the ranks holding it (with fewer kv heads than ranks, N / Hkv ranks each; else one)."""
    shards = [shard_for(config, r, world) for r in range(world)]
    return [[s.rank for s in shards if s.kv_lo <= h < s.kv_hi] for h in range(config.num_kv_heads)]


def local_config(config: ModelConfig, shard: Shard) -> ModelConfig:
    """The config of the rank's slice: its head and unit counts, everything else as the model's."""
    return replace(config, num_heads=shard.q_heads, num_kv_heads=shard.kv_heads,
                   intermediate_size=shard.i_hi - shard.i_lo, model_kv_heads=config.num_kv_heads)


def largest_share(config: ModelConfig, world: int) -> ModelConfig:
    """The local config of the rank holding the most (kv heads, query heads, MLP units): what one device of
    `world` must hold (kvx profile --plan --tensor-parallel)."""
    shards = [shard_for(config, r, world) for r in range(world)]
    return local_config(config, max(shards, key=lambda s: (s.kv_heads, s.q_heads, s.i_hi - s.i_lo)))


def slice_of(name: str, config: ModelConfig, shard: Shard) -> tuple[int, int, int] | None:
    """(dim, lo, hi) of the tensor `name` the rank reads, or None for a replicated tensor."""
    d = config.head_dim
    if not name.startswith("model.layers."):
        return None
    leaf = name.split(".", 3)[3]  # 'self_attn.q_proj.weight', 'mlp.down_proj.weight', ...
    if leaf.startswith("self_attn.q_proj."):
        return 0, shard.q_lo * d, shard.q_hi * d
    if leaf.startswith(("self_attn.k_proj.", "self_attn.v_proj.")):
        return 0, shard.kv_lo * d, shard.kv_hi * d
    if leaf == "self_attn.o_proj.weight":
        return 1, shard.q_lo * d, shard.q_hi * d
    if leaf in ("mlp.gate_proj.weight", "mlp.up_proj.weight"):
        return 0, shard.i_lo, shard.i_hi
    if leaf == "mlp.down_proj.weight":
        return 1, shard.i_lo, shard.i_hi
    return None


def load_sharded(model_dir: str | Path, rank: int, world: int, tp, device="cpu", dtype="float32",
                 tokenizer: bool = True):
    """(model, tokenizer or None) of rank `rank` of `world`: only the rank's slices are read from the
    safetensors files; the model all-reduces through `tp` (anything with all_reduce(tensor) -> tensor)."""
    from kvx.models.config import load_config
    from kvx.models.loader import load_state_dict
    from kvx.models.tokenizer import Tokenizer
    from kvx.models.transformer import Transformer

    config = load_config(model_dir)
    tok = Tokenizer.from_dir(model_dir) if tokenizer else None
    shard = shard_for(config, rank, world)
    if config.num_kv_heads < world:  # every rank at the same point: new process groups
        tp.join_replicas(replica_groups(config, world))
    state = load_state_dict(model_dir, config, dtype, device, shard=shard)
    if rank != 0:  # o_proj's bias is added once: on rank 0 (the others add zeros)
        for i in range(config.num_layers):
            name = f"model.layers.{i}.self_attn.o_proj.bias"
            if name in state:
                state[name] = state[name].new_zeros(state[name].shape)
    model = Transformer(local_config(config, shard), state, tp=tp, full_config=config)
    model.shard = shard
    # The whole model's, as load_model's: a stored context made on ranks answers on one device and back.
    from kvx.models.fingerprint import model_fingerprint, tokenizer_fingerprint

    model.fingerprint = model_fingerprint(model_dir)
    if tok is not None:
        tok.fingerprint = tokenizer_fingerprint(model_dir)
    return model, tok
