"""The measured side of `kvx profile`: run prefill, compression and a few decode steps, and record what
the runtime really allocated, where the memory peaked and where the time went.

Phases: "prefill" is everything before the first decoded token (the forward pass over the prompt, the
policy's statistics, selection, compaction); "decode" is the decode steps. Peaks are taken per phase:
- KV: the cache's own high-water mark (PagedKVCache.peak_bytes: whole blocks of the pool), reset between
  phases;
- CUDA: torch.cuda.max_memory_allocated, reset between phases (weights and activations included);
- CPU process: VmHWM from /proc/self/status, reset between phases through /proc/self/clear_refs where the
  kernel allows it (else the peak since the process started, marked so), and VmRSS at the phase's end.
"""

from __future__ import annotations

import resource
import sys
from dataclasses import asdict, dataclass, field, replace

import torch

from kvx.models.weight_bytes import resident_weights
from kvx.runtime.engine.batch_engine import BatchEngine
from kvx.runtime.compression.decode_eviction import DECODE_SLACK
from kvx.runtime.engine.model_runner import ModelRunner
from kvx.runtime.memory import Plan
from kvx.runtime.cache.pool import DEFAULT_BLOCK_SIZE, pool_block_bytes
from kvx.runtime.engine.state import SequenceState, Timings
from kvx.runtime.engine.scheduler import worst_case_blocks
from kvx.runtime.engine.sequence import GenerationRequest

# /2: measured over the engine's block tables, so slots and bytes held are whole blocks of the pool.
SCHEMA = "kvx.profile/2"
POSITION_BINS = 64


@dataclass
class PhasePeak:
    kv_bytes: int  # most K + V bytes the cache allocated during the phase
    kv_bytes_end: int  # K + V bytes allocated when the phase ended
    device_bytes: int | None  # CUDA allocator peak during the phase; None on the CPU
    rss_bytes: int | None  # process resident set when the phase ended
    rss_peak_bytes: int | None  # process high-water mark
    rss_peak_scope: str | None  # "phase" (reset before it) or "process" (since the process started)


@dataclass
class Measurement:
    device: str
    dtype: str
    policy: str
    budget: str | None
    prompt_tokens: int
    generated_tokens: int
    headroom_tokens: int  # free slots per (layer, kv head) after compression (what compress() was given)
    parameters: int
    weight_bytes: int
    weight_format: str  # what the linear weights are stored as (int8, ..., or the model's dtype)
    entry_bytes: int
    kept_map: list[list[int]]  # tokens kept per (layer, kv head) right after compression
    slots_map: list[list[int]]  # slots allocated per (layer, kv head) right after compression
    full_bytes_per_layer: int  # K + V bytes of one layer's uncompressed cache of the prompt
    kept_position_counts: list[int]  # kept entries per bin of positions along the prompt
    position_bin_width: int
    prefill: PhasePeak
    decode: PhasePeak
    timings: Timings
    notes: list[str] = field(default_factory=list)

    @property
    def entries_full(self) -> int:
        return len(self.kept_map) * len(self.kept_map[0]) * self.prompt_tokens

    @property
    def entries_kept(self) -> int:
        return sum(map(sum, self.kept_map))

    @property
    def slots_held(self) -> int:
        return sum(map(sum, self.slots_map))


def effective_headroom(policy, budget, n_tokens: int, decode_steps: int) -> int:
    """Free slots per head compress() will be given: a decode-time policy evicts as it goes, so the engine
    caps its headroom at DECODE_SLACK."""
    if _compresses(policy, budget, n_tokens) and policy.decode_mode:
        return min(decode_steps, DECODE_SLACK)
    return decode_steps


def _compresses(policy, budget, n_tokens: int) -> bool:
    return SequenceState(cache=None, policy=policy, budget=budget).compresses and not budget.keeps_everything(n_tokens)


def measure(model, tokenizer, ids: list[int], policy=None, budget=None, decode_steps: int = 8) -> Measurement:
    """Prefill `ids`, compress with (policy, budget) keeping `decode_steps` free slots per head, decode,
    in a pool sized as the engine sizes a lone request's (its worst case in blocks)."""
    engine = ModelRunner(model, tokenizer)
    cfg = engine.config
    n = len(ids)
    limit = cfg.max_position_embeddings
    compresses = _compresses(policy, budget, n)
    headroom = effective_headroom(policy, budget, n, decode_steps)
    notes = ["bytes held are whole blocks of the KV pool "
             f"({DEFAULT_BLOCK_SIZE} entries each): every (layer, kv head) segment rounds up to one"]
    steps = min(decode_steps, max(0, limit - n))
    blocks = worst_case_blocks(cfg, DEFAULT_BLOCK_SIZE, n, 0, decode_steps, policy, budget)
    batch = BatchEngine(engine, blocks * pool_block_bytes(DEFAULT_BLOCK_SIZE, cfg.head_dim, engine.dtype),
                        max_batch=1)
    # An uncompressed run allocates the prompt and its decode headroom up front, as `kvx generate` does.
    req = engine.new_request(batch.pool, capacity=n if compresses else n + headroom, policy=policy,
                             budget=budget)

    scope = _reset_peaks(engine.device)
    logits = engine.prefill(req, ids)
    engine.compress(req, headroom=headroom)
    prefill = _phase_peak(req, engine.device, scope)
    if prefill.rss_peak_scope == "process":
        notes.append("the process peak (VmHWM) could not be reset: it is the peak since the process started")

    kept_map = req.cache.lengths()
    slots_map = [list(lc.capacities) for lc in req.cache.layers]
    counts, width = _position_histogram(req, n)

    if steps < decode_steps:
        notes.append(f"the model's context ({limit} tokens) leaves room for {steps} of the {decode_steps} "
                     f"decode steps asked for; use a shorter --context to time decoding")
    req.cache.peak_bytes = req.cache.bytes_allocated()
    scope = _reset_peaks(engine.device)
    out_ids, held_at_end = [], req.cache.bytes_allocated()
    if steps:
        # Every step asked for is timed: an end-of-sequence token does not stop a profile.
        seq = batch.adopt(req, GenerationRequest(prompt_ids=list(ids), max_tokens=steps, stop_at_eos=False,
                                                 policy=policy, budget=budget), logits)
        batch.run()
        out_ids = seq.results[0].token_ids
        held_at_end = seq.results[0].kv_bytes_held  # measured as the answer ended, before its blocks went back
    decode = replace(_phase_peak(req, engine.device, scope), kv_bytes_end=held_at_end)

    parameters, weight_bytes = resident_weights(model)
    return Measurement(
        device=str(engine.device), dtype=str(engine.dtype).removeprefix("torch."),
        policy=req.policy.name if req.compresses else "full",
        budget=None if budget is None else str(budget),
        prompt_tokens=n, generated_tokens=len(out_ids), headroom_tokens=headroom,
        parameters=parameters, weight_bytes=weight_bytes,
        weight_format=getattr(model, "weight_format", None) or str(model.dtype).removeprefix("torch."),
        entry_bytes=engine.entry_bytes(), kept_map=kept_map, slots_map=slots_map,
        full_bytes_per_layer=engine.config.num_kv_heads * n * engine.entry_bytes(),
        kept_position_counts=counts, position_bin_width=width,
        prefill=prefill, decode=decode, timings=req.timings, notes=notes,
    )


def _position_histogram(req: SequenceState, n: int) -> tuple[list[int], int]:
    """Kept entries per bin of absolute positions, over every (layer, kv head)."""
    width = -(-n // min(POSITION_BINS, n))
    bins = -(-n // width)
    counts = torch.zeros(bins, dtype=torch.long)
    for lc in req.cache.layers:
        positions = torch.cat([lc.head_positions(g) for g in range(len(lc.tables))]).cpu()
        counts += torch.bincount(positions // width, minlength=bins)[:bins]
    return counts.tolist(), width


def _reset_peaks(device: torch.device) -> str:
    """Start a phase: reset the CUDA peak and the process peak. Returns the process peak's scope."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    try:
        # "5" resets the peak resident set size (VmHWM) to the current one (Linux >= 4.0).
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return "phase"
    except OSError:
        return "process"


def _phase_peak(req: SequenceState, device: torch.device, scope: str) -> PhasePeak:
    device_bytes = None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        device_bytes = int(torch.cuda.max_memory_allocated(device))
    rss, hwm = _process_memory()
    return PhasePeak(kv_bytes=req.cache.peak_bytes, kv_bytes_end=req.cache.bytes_allocated(),
                     device_bytes=device_bytes, rss_bytes=rss, rss_peak_bytes=hwm,
                     rss_peak_scope=None if hwm is None else scope)


def _process_memory() -> tuple[int | None, int | None]:
    """(resident set size, its peak) in bytes. The RSS comes from psutil. The peak is Linux's VmHWM, which
    psutil does not report and which _reset_peaks resets per phase; without it, ru_maxrss (the peak over
    the process's life)."""
    import psutil

    try:
        rss = int(psutil.Process().memory_info().rss)
    except Exception:  # noqa: BLE001 - a platform psutil cannot read
        rss = None
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return rss, _kib(line.split(":", 1)[1].strip())
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss, peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere


def _kib(value: str | None) -> int | None:
    if not value:
        return None
    number, *unit = value.split()
    return int(number) * 1024 if unit and unit[0].lower() == "kb" else int(number)


# -- the report ----------------------------------------------------------------------------------------

def _kv_part(count: int, entry_bytes: int, what: str = "entries") -> dict:
    half = count * entry_bytes // 2
    return {what: count, "k_bytes": half, "v_bytes": half, "bytes": 2 * half}


def plan_kv(p: Plan) -> dict:
    return {
        "bytes_per_token": p.kv_bytes_per_token,
        "entry_bytes": p.entry_bytes,
        "full": _kv_part(p.kv_entries_full, p.entry_bytes),
        "kept": _kv_part(p.kv_entries_kept, p.entry_bytes),
        "held": _kv_part(p.kv_slots_held, p.entry_bytes, "slots"),
        "headroom": {"tokens": p.headroom_tokens, "bytes": p.kv_bytes_headroom},
        "held_fraction_of_full": _ratio(p.kv_bytes_held, p.kv_bytes_full),
        "peak_prefill_bytes": p.kv_bytes_peak_prefill,
    }


def measured_kv(m: Measurement) -> dict:
    heads = len(m.kept_map) * len(m.kept_map[0])
    held = m.slots_held * m.entry_bytes
    return {
        "bytes_per_token": heads * m.entry_bytes,
        "entry_bytes": m.entry_bytes,
        "full": _kv_part(m.entries_full, m.entry_bytes),
        "kept": _kv_part(m.entries_kept, m.entry_bytes),
        "held": _kv_part(m.slots_held, m.entry_bytes, "slots"),
        "headroom": {"tokens": m.headroom_tokens, "bytes": held - m.entries_kept * m.entry_bytes},
        "held_fraction_of_full": _ratio(held, m.entries_full * m.entry_bytes),
        "peak_prefill_bytes": m.prefill.kv_bytes,
    }


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 6) if b else None


def report(mode: str, model: str, cfg, p: Plan, policy: str | None, decode_steps: int,
           m: Measurement | None = None) -> dict:
    """The `kvx.profile/2` JSON object (docs/profile.md). Every key is present in both modes."""
    return {
        "schema": SCHEMA,
        "mode": mode,
        "model": model,
        "architecture": cfg.architecture,
        "config": {
            "num_layers": cfg.num_layers, "num_heads": cfg.num_heads, "num_kv_heads": cfg.num_kv_heads,
            "head_dim": cfg.head_dim, "hidden_size": cfg.hidden_size,
            "intermediate_size": cfg.intermediate_size, "vocab_size": cfg.vocab_size,
            "max_position_embeddings": cfg.max_position_embeddings,
        },
        "device": None if m is None else m.device,
        "dtype": p.dtype,
        "context": p.context,
        "batch": p.batch,
        "policy": policy,
        "budget": p.budget,
        "decode_steps": decode_steps,
        "planned": {
            "weights": {"parameters": p.parameters, "bytes": p.weight_bytes, "format": p.weight_format or p.dtype},
            "kv": plan_kv(p),
            "fits": None if p.fits is None else asdict(p.fits),
        },
        "measured": None if m is None else _measured_dict(m, p),
        "notes": [] if m is None else list(m.notes),
    }


def _measured_dict(m: Measurement, p: Plan) -> dict:
    kv = measured_kv(m)
    t = m.timings
    half_full = m.full_bytes_per_layer // 2
    layers = [
        {"layer": i, "kept_tokens": sum(kept), "k_bytes_full": half_full, "v_bytes_full": half_full,
         "k_bytes_held": sum(slots) * m.entry_bytes // 2, "v_bytes_held": sum(slots) * m.entry_bytes // 2}
        for i, (kept, slots) in enumerate(zip(m.kept_map, m.slots_map))
    ]
    return {
        "tokens": {"prompt": m.prompt_tokens, "generated": m.generated_tokens},
        "weights": {"parameters": m.parameters, "bytes": m.weight_bytes, "format": m.weight_format},
        "kv": kv,
        "layers": layers,
        "kept_map": m.kept_map,
        "kept_positions": {"bin_width": m.position_bin_width, "counts": m.kept_position_counts},
        "peak": {"prefill": asdict(m.prefill), "decode": asdict(m.decode)},
        "timings": {
            **{k: round(v, 6) for k, v in asdict(t).items()},
            "prefill_tokens_per_s": round(m.prompt_tokens / t.prefill_s, 3) if t.prefill_s else None,
            "decode_tokens_per_s": round(m.generated_tokens / t.decode_s, 3) if t.decode_s else None,
        },
        "agreement": {
            "weights": _ratio(m.weight_bytes, p.weight_bytes),
            "kv_full": _ratio(kv["full"]["bytes"], p.kv_bytes_full),
            "kv_held": _ratio(kv["held"]["bytes"], p.kv_bytes_held),
            "kv_peak_prefill": _ratio(kv["peak_prefill_bytes"], p.kv_bytes_peak_prefill),
        },
    }
