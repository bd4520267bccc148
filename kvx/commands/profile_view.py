"""How `kvx profile` shows its report: rich tables on stdout, and the kept-token map as a PNG.

Both read only the kvx.profile/2 dictionary, so what is shown is exactly what --json prints.
"""

from __future__ import annotations

from pathlib import Path

from kvx.errors import KvxError
from kvx.runtime.memory import human_bytes


def _b(n: int | None) -> str:
    return "-" if n is None else human_bytes(n)


def print_report(r: dict) -> None:
    from rich.console import Console

    console = Console()
    pol = r["policy"] + (f" @ {r['budget']}" if r["budget"] else "")
    where = f" · {r['device']}" if r["device"] else ""
    console.print(f"[bold]kvx profile[/bold] ({r['mode']}) · {r['model']} · {r['architecture']} · "
                  f"{pol} · context {r['context']} · batch {r['batch']} · {r['dtype']}{where}")
    console.print(_memory_table(r))
    if r["planned"]["fits"] is not None:
        console.print(_fits_table(r))
    if r["measured"] is not None:
        console.print(_timing_table(r["measured"]))
        console.print(_layer_table(r["measured"]))
    for note in r["notes"]:
        console.print(f"note: {note}")


def _memory_table(r: dict):
    from rich.table import Table

    plan, meas = r["planned"], r["measured"]
    pk = plan["kv"]
    mk = meas["kv"] if meas is not None else None
    table = Table(title="memory", caption="held = kept + decode headroom: what the cache allocates after compression")
    table.add_column("", no_wrap=True)
    for col in ("K", "V", "K + V") + (("planned K + V",) if meas is not None else ()):
        table.add_column(col, justify="right", no_wrap=True)
    table.add_column("", overflow="fold")

    def row(label: str, src: dict | None, key: str, note: str = "") -> None:
        part = (mk if meas is not None else pk)[key]
        planned = [human_bytes(pk[key]["bytes"])] if meas is not None else []
        table.add_row(label, human_bytes(part["k_bytes"]), human_bytes(part["v_bytes"]), human_bytes(part["bytes"]),
                      *planned, note)

    def total(label: str, measured: int | None, planned: int | None, note: str = "") -> None:
        value = measured if meas is not None else planned
        table.add_row(label, "", "", _b(value), *([_b(planned)] if meas is not None else []), note)

    weights = (meas or plan)["weights"]
    fmt = weights.get("format")
    total("weights", meas and meas["weights"]["bytes"], plan["weights"]["bytes"],
          f"{weights['parameters']:,} params" + (f", {fmt}" if fmt else ""))
    kv = mk or pk
    total("KV per token", mk and mk["bytes_per_token"], pk["bytes_per_token"])
    row("KV full", kv, "full", f"{kv['full']['entries']:,} entries")
    row("KV kept", kv, "kept", f"{kv['kept']['entries']:,} entries")
    row("KV held", kv, "held", f"{100 * (kv['held_fraction_of_full'] or 0):.1f}% of full")
    total("  decode headroom", mk and mk["headroom"]["bytes"], pk["headroom"]["bytes"],
          f"{kv['headroom']['tokens']} tokens/head")
    total("KV peak, prefill", mk and mk["peak_prefill_bytes"], pk["peak_prefill_bytes"],
          "before compression")
    if meas is not None:
        peak = meas["peak"]
        total("KV peak, decode", peak["decode"]["kv_bytes"], None)
        if peak["prefill"]["device_bytes"] is not None:
            for phase in ("prefill", "decode"):
                total(f"CUDA peak, {phase}", peak[phase]["device_bytes"], None, "torch.cuda.max_memory_allocated")
        for phase in ("prefill", "decode"):
            p = peak[phase]
            scope = "since start" if p["rss_peak_scope"] == "process" else "process"
            total(f"RSS peak, {phase}", p["rss_peak_bytes"], None, f"{scope}; {_b(p['rss_bytes'])} at the end")
    return table


def _fits_table(r: dict):
    from rich.table import Table

    f = r["planned"]["fits"]
    table = Table(title=f"what fits in {human_bytes(f['memory'])} ({human_bytes(f['free'])} after the weights)",
                  caption="prefill peak: each prompt prefilled whole, one at a time; held only: as if prefill were "
                          f"chunked; batched engine: kvx generate --jsonl / kvx serve with --kv-memory = the free "
                          f"memory, blocks of {f.get('block_size') or '-'} tokens (each segment wastes < 1 block)")
    for col in ("", "max context, batch 1", f"max batch @ {r['context']}"):
        table.add_column(col, justify="right" if col else "left", no_wrap=True)
    table.add_row("uncompressed", f"{f['max_context_full']:,}", f"{f['max_batch_full']:,}")
    if r["budget"] is not None:
        held = "unbounded" if f["max_context_held"] is None else f"{f['max_context_held']:,}"
        table.add_row(f"budget {r['budget']}, prefill peak", f"{f['max_context_budget']:,}",
                      f"{f['max_batch_budget']:,}")
        table.add_row(f"budget {r['budget']}, held only", held, f"{f['max_batch_held']:,}")
    if f.get("block_size"):
        table.add_row(f"batched engine, uncompressed", "", f"{f['max_batch_pool_full']:,}")
        if r["budget"] is not None:
            table.add_row(f"batched engine, budget {r['budget']}", "", f"{f['max_batch_pool_budget']:,}")
    return table


def _timing_table(m: dict):
    from rich.table import Table

    t = m["timings"]
    table = Table(title="time")
    for col in ("phase", "seconds", "rate"):
        table.add_column(col, justify="left" if col == "phase" else "right")
    rate = t["prefill_tokens_per_s"]
    table.add_row("prefill (whole forward pass)", f"{t['prefill_s']:.3f}",
                  "-" if rate is None else f"{rate:.1f} tok/s ({m['tokens']['prompt']} tokens)")
    table.add_row("  of which statistics", f"{t['stats_s']:.3f}", "")
    table.add_row("selection", f"{t['select_s']:.3f}", "")
    table.add_row("compaction", f"{t['compact_s']:.3f}", "")
    rate = t["decode_tokens_per_s"]
    table.add_row("decode", f"{t['decode_s']:.3f}",
                  "-" if rate is None else f"{rate:.1f} tok/s ({m['tokens']['generated']} tokens)")
    if t["decode_evict_s"]:
        table.add_row("  of which decode-time eviction", f"{t['decode_evict_s']:.3f}", "")
    return table


def _layer_table(m: dict):
    from rich.table import Table

    table = Table(title="per layer: tokens kept per kv head after compression")
    for col in ("layer", "kept per kv head", "kept", "K held", "V held", "of full"):
        table.add_column(col, justify="left" if col == "kept per kv head" else "right")
    prompt = m["tokens"]["prompt"]
    for layer, heads in zip(m["layers"], m["kept_map"]):
        full = layer["k_bytes_full"] + layer["v_bytes_full"]
        held = layer["k_bytes_held"] + layer["v_bytes_held"]
        table.add_row(str(layer["layer"]), " ".join(str(n) for n in heads),
                      f"{100 * layer['kept_tokens'] / (prompt * len(heads)):.1f}%",
                      human_bytes(layer["k_bytes_held"]), human_bytes(layer["v_bytes_held"]),
                      f"{100 * held / full:.1f}%" if full else "-")
    return table


# -- the plot ------------------------------------------------------------------------------------------

def check_plot_target(path: Path, plan_only: bool) -> None:
    """Fail before any work: --plot needs a measured run, matplotlib, and a folder to write into."""
    if plan_only:
        raise KvxError("--plot draws a measured run's kept tokens; it cannot be combined with --plan")
    from kvx.inputs import check_writable

    _pyplot()
    check_writable(Path(path), "--plot")


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise KvxError("--plot needs matplotlib: pip install 'kvx[plot]'") from None
    return plt


def write_plot(r: dict, path: Path) -> None:
    """Left: kept tokens per (layer, kv head). Right: kept entries along the context."""
    plt = _pyplot()
    m = r["measured"]
    if m is None:
        raise KvxError("--plot needs a measured run")
    kept = m["kept_map"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, max(4.0, 0.14 * len(kept) + 1.5)),
                                      gridspec_kw={"width_ratios": [1, 2]})
    image = left.imshow(kept, aspect="auto", interpolation="nearest", cmap="viridis")
    left.set_xlabel("kv head")
    left.set_ylabel("layer")
    left.set_xticks(range(len(kept[0])))
    left.set_title("tokens kept per (layer, kv head)")
    fig.colorbar(image, ax=left, label="kept tokens")
    width = m["kept_positions"]["bin_width"]
    counts = m["kept_positions"]["counts"]
    right.bar([i * width for i in range(len(counts))], counts, width=width, align="edge")
    right.set_xlim(0, m["tokens"]["prompt"])
    right.set_xlabel("position in the context (token)")
    right.set_ylabel(f"kept entries per {width} positions")
    right.set_title("where the kept entries are")
    pol = r["policy"] + (f" @ {r['budget']}" if r["budget"] else "")
    fig.suptitle(f"{pol} · {m['tokens']['prompt']} tokens · {r['architecture']}")
    fig.tight_layout()
    try:
        fig.savefig(Path(path).expanduser(), dpi=120)
    except (OSError, ValueError) as exc:
        raise KvxError(f"cannot write the plot {path}: {exc}") from None
    finally:
        plt.close(fig)
