"""How a generation result is shown: the one-line summary and the JSON object.

Each quantity is named for what it is. Entries kept are compared with the full cache of the same tokens;
bytes in use (the kept entries) with the bytes of that full cache; the decode headroom (free slots the
cache holds for tokens still to come) is shown as headroom, part of what is allocated, never as "held".
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class KvFigures:
    entries_kept: int  # (layer, kv head, token) entries the cache holds at the end
    entries_full: int  # entries a full cache of the same tokens holds
    bytes_in_use: int  # K and V of the kept entries
    bytes_full: int  # K and V of the full cache of the same tokens
    bytes_allocated: int  # what the cache's pools really occupy: in use + headroom
    bytes_peak: int  # the most the pools occupied at any point

    @classmethod
    def of(cls, result) -> "KvFigures":
        full = result.kv_entries_full
        entry = result.kv_bytes_full // full if full else 0
        return cls(entries_kept=result.kv_entries_kept, entries_full=full,
                   bytes_in_use=result.kv_entries_kept * entry, bytes_full=result.kv_bytes_full,
                   bytes_allocated=result.kv_bytes_held, bytes_peak=result.kv_bytes_peak)

    @property
    def bytes_headroom(self) -> int:
        return max(0, self.bytes_allocated - self.bytes_in_use)

    @property
    def kept_fraction(self) -> float | None:
        return self.entries_kept / self.entries_full if self.entries_full else None


def result_json(result, **extra) -> dict:
    """The result as `--json` and `--jsonl` print it (kv_bytes_held is renamed kv_bytes_allocated)."""
    kv = KvFigures.of(result)
    d = result.to_dict()
    for key in ("kv_bytes_held", "kv_bytes_full", "kv_bytes_peak", "kv_entries_kept", "kv_entries_full"):
        d.pop(key, None)
    fraction = kv.kept_fraction
    d.update(
        kv_entries_kept=kv.entries_kept, kv_entries_full=kv.entries_full,
        kv_kept_fraction=None if fraction is None else round(fraction, 6),
        kv_bytes_in_use=kv.bytes_in_use, kv_bytes_full=kv.bytes_full,
        kv_bytes_headroom=kv.bytes_headroom, kv_bytes_allocated=kv.bytes_allocated, kv_bytes_peak=kv.bytes_peak,
    )
    d.update(extra)
    return d


def summary_line(result) -> str:
    """'12 prompt + 8 generated tokens · ... · KV kept 62 of 1,240 entries (5.0%): 96.88 KiB of 1.94 MiB ·
    allocated 11.04 MiB (10.95 MiB of it decode headroom) · int8 weights'."""
    from kvx.runtime.memory import human_bytes

    kv = KvFigures.of(result)
    pol = result.policy + (f" @ {result.budget}" if result.budget else "")
    share = f" ({100 * kv.kept_fraction:.1f}%)" if kv.kept_fraction is not None else ""
    return (
        f"{result.prompt_tokens} prompt + {result.generated_tokens} generated tokens · "
        f"prefill {result.prefill_tokens_per_s:.1f} tok/s · decode {result.decode_tokens_per_s:.1f} tok/s · "
        f"policy {pol} · KV kept {kv.entries_kept:,} of {kv.entries_full:,} entries{share}: "
        f"{human_bytes(kv.bytes_in_use)} of {human_bytes(kv.bytes_full)} · "
        f"allocated {human_bytes(kv.bytes_allocated)} ({human_bytes(kv.bytes_headroom)} of it decode headroom)"
        + (f" · {result.weights}" if result.weights else "")
    )
