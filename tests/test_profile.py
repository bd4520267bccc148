"""`kvx profile`: the planner against hand formulas and real parameter counts, the measured report against
the planner on the default model, the JSON schema, and the user errors."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest
import torch

from checkpoints import make_checkpoint
from kvx.commands.profile import ProfileSettings, filler_ids, prompt_ids, run_profile
from kvx.errors import KvxError
from kvx.models.config import load_config
from kvx.policies import parse_budget
from kvx.runtime.memory import DTYPE_BYTES, kv_bytes_per_token, parameter_count, parse_size, plan

# Tiny config.json files as the families write them (GQA and MHA, a head_dim that is not hidden / heads).
CONFIGS = {
    "llama_gqa": dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=64, intermediate_size=96,
                      num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=2, vocab_size=128,
                      max_position_embeddings=4096, tie_word_embeddings=False),
    "llama_mha": dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=48, intermediate_size=80,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, vocab_size=100,
                      max_position_embeddings=2048, tie_word_embeddings=True),
    "qwen2": dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_size=64, intermediate_size=96,
                  num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2, vocab_size=128,
                  max_position_embeddings=32768),
    "qwen3": dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", hidden_size=64, intermediate_size=96,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32, vocab_size=128,
                  max_position_embeddings=40960),
    "mistral": dict(architectures=["MistralForCausalLM"], model_type="mistral", hidden_size=64,
                    intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                    vocab_size=128, max_position_embeddings=32768, sliding_window=16),
}

LLAMA_70B = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=8192, intermediate_size=28672,
                 num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8, head_dim=128,
                 vocab_size=128256, max_position_embeddings=131072, tie_word_embeddings=False,
                 rope_theta=500000.0, torch_dtype="bfloat16",
                 rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                   original_max_position_embeddings=8192))

TOP_KEYS = {"schema", "mode", "model", "architecture", "config", "device", "dtype", "context", "batch", "policy",
            "budget", "decode_steps", "planned", "measured", "notes"}
KV_KEYS = {"bytes_per_token", "entry_bytes", "full", "kept", "held", "headroom", "held_fraction_of_full",
           "peak_prefill_bytes"}
FITS_KEYS = {"memory", "free", "max_context_full", "max_context_budget", "max_context_held", "max_batch_full",
             "max_batch_budget", "max_batch_held", "block_size", "max_batch_pool_full", "max_batch_pool_budget"}
MEASURED_KEYS = {"tokens", "weights", "kv", "layers", "kept_map", "kept_positions", "peak", "timings", "agreement"}
PEAK_KEYS = {"kv_bytes", "kv_bytes_end", "device_bytes", "rss_bytes", "rss_peak_bytes", "rss_peak_scope"}
TIMING_KEYS = {"prefill_s", "stats_s", "select_s", "compact_s", "decode_s", "decode_evict_s",
               "prefill_tokens_per_s", "decode_tokens_per_s"}


def write_config(tmp_path, name: str, raw: dict):
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(raw))
    return folder / "config.json"


# -- the planner ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(CONFIGS))
def test_planned_kv_bytes_equal_the_hand_formula(tmp_path, name):
    raw = CONFIGS[name]
    cfg = load_config(write_config(tmp_path, name, raw))
    L, hkv = raw["num_hidden_layers"], raw["num_key_value_heads"]
    d = raw.get("head_dim", raw["hidden_size"] // raw["num_attention_heads"])
    rng = random.Random(name)
    for dtype, nbytes in DTYPE_BYTES.items():
        tokens = rng.randint(1, 50_000)
        p = plan(cfg, tokens, dtype=dtype)
        assert kv_bytes_per_token(cfg, nbytes) == p.kv_bytes_per_token == 2 * L * hkv * d * nbytes
        assert p.kv_bytes_full == 2 * L * hkv * d * nbytes * tokens
        assert p.kv_bytes_held == p.kv_bytes_kept == p.kv_bytes_full == p.kv_bytes_peak_prefill
        # a budget: the kept entries are exactly what Budget.total_entries allows, each 2 * d * bytes
        batch, headroom = rng.randint(1, 5), rng.randint(0, 20)
        p = plan(cfg, tokens, batch=batch, budget=parse_budget("7%"), dtype=dtype, headroom_tokens=headroom)
        kept = round(0.07 * L * hkv * tokens)
        assert p.kv_bytes_full == 2 * L * hkv * d * nbytes * tokens * batch
        assert p.kv_bytes_kept == kept * 2 * d * nbytes * batch
        assert p.kv_bytes_held == (kept + L * hkv * headroom) * 2 * d * nbytes * batch
        held_one = p.kv_bytes_held // batch
        assert p.kv_bytes_peak_prefill == (batch - 1) * held_one + max(p.kv_bytes_full // batch, held_one)


@pytest.mark.parametrize("variant", ["llama_gqa_llama3", "llama_tied_mha", "qwen2", "qwen3", "mistral"])
def test_parameter_count_equals_transformers(tmp_path, variant):
    path, hf = make_checkpoint(variant, tmp_path)
    assert parameter_count(load_config(path)) == hf.num_parameters()


def test_parameter_count_with_attention_bias(tmp_path):
    path, hf = make_checkpoint("llama_gqa_llama3", tmp_path, attention_bias=True)  # q, k, v and o biases
    assert parameter_count(load_config(path)) == hf.num_parameters()


def test_llama_70b_plan(tmp_path):
    cfg = load_config(write_config(tmp_path, "llama70b", LLAMA_70B))
    p = plan(cfg, 131072, batch=8, budget=parse_budget("5%"), dtype="bfloat16", memory=parse_size("640GiB"))
    assert abs(p.weight_bytes - 70.6e9 * 2) / (70.6e9 * 2) < 0.01
    assert p.kv_bytes_per_token == 2 * 80 * 8 * 128 * 2
    assert p.kv_bytes_full == 2 * 80 * 8 * 128 * 2 * 131072 * 8  # 320 GiB for 8 sequences
    assert p.kv_bytes_kept == round(0.05 * 80 * 8 * 131072) * 512 * 8
    free = parse_size("640GiB") - p.weight_bytes
    assert p.fits.max_batch_full == free // (p.kv_bytes_per_token * 131072)
    with pytest.raises(KvxError, match="smaller than the weights"):
        plan(cfg, 8192, dtype="bfloat16", memory=parse_size("80GiB"))


def test_fits_are_the_largest_that_fit(tmp_path):
    cfg = load_config(write_config(tmp_path, "llama_gqa", CONFIGS["llama_gqa"]))
    memory, headroom, context = 50_000_000, 8, 3000
    budget = parse_budget("10%")
    p = plan(cfg, context, budget=budget, dtype="float16", memory=memory, headroom_tokens=headroom)
    f = p.fits
    free = memory - p.weight_bytes
    assert f.free == free

    def bytes_at(c: int) -> tuple[int, int, int]:  # (full, held, prefill peak) of one sequence of c tokens
        q = plan(cfg, c, budget=budget, dtype="float16", headroom_tokens=headroom)
        full = q.kv_bytes_full + q.kv_bytes_headroom
        return full, q.kv_bytes_held, q.kv_bytes_peak_prefill

    for index, best in ((0, f.max_context_full), (1, f.max_context_held), (2, f.max_context_budget)):
        assert bytes_at(best)[index] <= free < bytes_at(best + 1)[index]
    full, held, peak = bytes_at(context)
    assert f.max_batch_full == free // full
    assert f.max_batch_held == free // held
    b = f.max_batch_budget  # b sequences: b - 1 compressed, one being prefilled
    assert (b - 1) * held + peak <= free < b * held + peak
    # a per-head token budget holds the same bytes at any context: no memory bound once compressed
    q = plan(cfg, context, budget=parse_budget("64"), dtype="float16", memory=memory)
    assert q.fits.max_context_held is None and q.fits.max_context_budget == q.fits.max_context_full


def test_parse_size_and_bad_settings(tmp_path):
    assert parse_size("80GiB") == 80 * 2**30
    assert parse_size("24GB") == 24 * 10**9
    assert parse_size("1.5 TiB") == int(1.5 * 2**40)
    assert parse_size("123456") == 123456
    for bad in ("", "GiB", "-3GiB", "12XB", "0", "1e9"):
        with pytest.raises(KvxError):
            parse_size(bad)
    cfg = load_config(write_config(tmp_path, "qwen2", CONFIGS["qwen2"]))
    with pytest.raises(KvxError, match="keeps nothing"):
        plan(cfg, 100, budget=parse_budget("0.01%"))
    for kwargs in (dict(context=0), dict(context=10, batch=0), dict(context=10, dtype="int8")):
        with pytest.raises(KvxError):
            plan(cfg, **kwargs)


def test_plan_report_schema(tmp_path):
    path = write_config(tmp_path, "llama70b", LLAMA_70B)
    s = ProfileSettings(model=str(path), context=131072, batch=8, budget="5%", memory="2TiB", plan_only=True)
    r = run_profile(s, quiet=True)
    json.loads(json.dumps(r))  # JSON-safe
    assert set(r) == TOP_KEYS
    assert r["schema"] == "kvx.profile/2" and r["mode"] == "plan" and r["measured"] is None
    assert r["dtype"] == "bfloat16"  # --dtype auto in --plan is the checkpoint's dtype
    assert set(r["planned"]) == {"weights", "kv", "fits"}
    assert set(r["planned"]["kv"]) == KV_KEYS and set(r["planned"]["fits"]) == FITS_KEYS
    assert r["planned"]["kv"]["held"]["slots"] == (round(0.05 * 80 * 8 * 131072) + 80 * 8 * 8) * 8
    assert any("prefilled whole" in note for note in r["notes"])


@pytest.mark.parametrize("settings, fragment", [
    (dict(budget="0%"), "out of range"),
    (dict(budget="0"), "keeps nothing"),
    (dict(budget="0.0001%", context=100), "keeps nothing"),
    (dict(memory="1KB"), "smaller than the weights"),
    (dict(memory="lots"), "cannot read memory size"),
    (dict(context=0), "--context"),
    (dict(batch=0), "--batch"),
    (dict(decode_steps=-1), "--decode-steps"),
    (dict(dtype="int8"), "unknown dtype"),
    (dict(policy="snapkv"), "needs a --budget"),
    (dict(policy="full", budget="5%"), "takes no --budget"),
    (dict(policy="nope", budget="5%"), "unknown policy"),
    (dict(prompt_file="x.txt"), "--prompt-file is for a measured run"),
])
def test_plan_errors_are_one_line(tmp_path, settings, fragment):
    path = write_config(tmp_path, "llama_gqa", CONFIGS["llama_gqa"])
    with pytest.raises(KvxError, match=fragment) as info:
        run_profile(ProfileSettings(model=str(path), plan_only=True, **settings), quiet=True)
    assert "\n" not in str(info.value)


def test_plot_needs_a_measured_run(tmp_path):
    from kvx.commands.profile_view import check_plot_target

    with pytest.raises(KvxError, match="--plan"):
        check_plot_target(tmp_path / "map.png", plan_only=True)
    with pytest.raises(KvxError, match="does not exist"):
        check_plot_target(tmp_path / "missing" / "map.png", plan_only=False)


# -- packed CPU weights: planned bytes are the bytes the model holds ------------------------------------

@pytest.mark.parametrize("fmt", ["float32", "int8", "bfloat16", "w8a8"])
@pytest.mark.parametrize("variant", ["llama_gqa_llama3", "llama_tied_mha", "qwen2", "qwen3", "mistral"])
def test_planned_weight_bytes_equal_what_a_packed_model_holds(variant, fmt, tmp_path):
    from checkpoints import make_checkpoint
    from kvx.models.config import load_config
    from kvx.models.cpu_weights import pack
    from kvx.models.weight_bytes import resident_weights
    from kvx.models.transformer import Transformer
    from kvx.runtime.memory import parameter_count

    path, _ = make_checkpoint(variant, tmp_path)
    cfg = load_config(path)
    model = Transformer.from_pretrained(path)
    pack(model, fmt)
    count, nbytes = resident_weights(model)
    p = plan(cfg, 64, dtype="float32", weight_format=fmt)
    assert count == p.parameters == parameter_count(cfg)
    assert nbytes == p.weight_bytes
    if fmt == "int8":  # about a quarter of float32's bytes for the matrices, the embedding still float32
        assert p.weight_bytes < plan(cfg, 64, dtype="float32").weight_bytes


# -- measured on the default model -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def default_model():
    from kvx.models import load_model
    from kvx.models.hub import pull_default_model

    folder = pull_default_model(quiet=True)
    llm, tok = load_model(folder, device="cpu", dtype=torch.float32)
    return llm, tok, folder


@pytest.fixture(scope="module")
def measured(default_model):
    """Two runs that differ only in the budget (10% and 20%), 200 tokens, 2 decode steps."""
    return {b: run_profile(ProfileSettings(context=200, policy="laprox", budget=b, decode_steps=2),
                           loaded=default_model) for b in ("10%", "20%")}


@pytest.mark.slow
def test_a_measured_profile_under_dtype_auto_runs_int8_weights_as_planned():
    """--dtype auto on the CPU profiles what kvx generate runs: int8 linear weights, float32 activations and
    cache; the planned weight bytes are the packed ones, and the measured bytes equal them."""
    r = run_profile(ProfileSettings(context=120, policy="snapkv", budget="20%", decode_steps=1, device="cpu"),
                    quiet=True)
    m, p = r["measured"], r["planned"]
    assert r["dtype"] == "float32"
    assert p["weights"]["format"] == m["weights"]["format"] == "int8"
    assert m["weights"] == p["weights"] and m["agreement"]["weights"] == 1.0
    f32 = run_profile(ProfileSettings(context=120, plan_only=True, dtype="float32"), quiet=True)
    assert m["weights"]["bytes"] < 0.6 * f32["planned"]["weights"]["bytes"]  # the embedding stays float32


@pytest.mark.slow
def test_prompt_is_exactly_context_tokens(default_model, tmp_path):
    _, tok, _ = default_model
    filler = prompt_ids(tok, 300)
    assert len(filler) == 300 and filler == prompt_ids(tok, 300)  # deterministic
    assert filler == filler_ids(tok, 300)[:300]
    text = "The passkey is 4821. " * 5
    ids = prompt_ids(tok, 300, text)
    assert len(ids) == 300 and ids[:len(tok.encode(text))] == tok.encode(text)
    long_text = "Remember this sentence well. " * 200
    assert prompt_ids(tok, 50, long_text) == tok.encode(long_text)[:50]


@pytest.mark.slow
def test_measured_bytes_equal_planned(measured):
    r = measured["10%"]
    assert set(r) == TOP_KEYS and r["mode"] == "measured" and r["schema"] == "kvx.profile/2"
    m, p = r["measured"], r["planned"]
    assert set(m) == MEASURED_KEYS and set(m["kv"]) == KV_KEYS
    assert set(m["peak"]["prefill"]) == PEAK_KEYS and set(m["timings"]) == TIMING_KEYS
    assert m["tokens"] == {"prompt": 200, "generated": 2}
    assert m["weights"] == p["weights"]  # the default model is a Llama: loaded parameters == planned
    mk, pk = m["kv"], p["kv"]
    headroom = pk["headroom"]["bytes"]
    assert pk["headroom"]["tokens"] == 2 and headroom == 30 * 3 * 2 * mk["entry_bytes"]
    # The engine holds whole blocks of 32 entries: measured slots are the planned ones rounded up per
    # (layer, kv head) segment, less than one block more each (90 segments).
    segments, block = 30 * 3, 32
    assert mk["kept"] == pk["kept"] and mk["full"] == pk["full"]
    assert pk["held"]["slots"] <= mk["held"]["slots"] < pk["held"]["slots"] + segments * block
    assert mk["held"]["slots"] % block == 0
    assert mk["peak_prefill_bytes"] == segments * -(-200 // block) * block * mk["entry_bytes"]
    assert pk["peak_prefill_bytes"] == pk["full"]["bytes"]
    assert m["agreement"]["weights"] == m["agreement"]["kv_full"] == 1.0
    assert 1.0 <= m["agreement"]["kv_held"] < 1.0 + segments * block / pk["held"]["slots"]
    # the per-(layer, head) map, the per-layer bytes and the position histogram all add up to the same
    kept_map = m["kept_map"]
    assert len(kept_map) == 30 and all(len(row) == 3 for row in kept_map)
    assert sum(map(sum, kept_map)) == mk["kept"]["entries"] == round(0.10 * 30 * 3 * 200)
    assert sum(layer["k_bytes_held"] + layer["v_bytes_held"] for layer in m["layers"]) == mk["held"]["bytes"]
    assert sum(layer["k_bytes_full"] + layer["v_bytes_full"] for layer in m["layers"]) == mk["full"]["bytes"]
    assert sum(m["kept_positions"]["counts"]) == mk["kept"]["entries"]
    # decode appends into the headroom: nothing is reallocated, and its peak is the held cache
    assert m["peak"]["decode"]["kv_bytes"] == m["peak"]["decode"]["kv_bytes_end"] == mk["held"]["bytes"]
    assert m["peak"]["prefill"]["rss_peak_bytes"] >= m["weights"]["bytes"]
    t = m["timings"]
    assert t["prefill_s"] > t["stats_s"] > 0 and t["select_s"] > 0 and t["decode_s"] > 0
    assert t["decode_tokens_per_s"] > 0


@pytest.mark.slow
def test_budget_scales_measured_bytes(measured):
    k10 = measured["10%"]["measured"]["kv"]
    k20 = measured["20%"]["measured"]["kv"]
    assert k20["kept"]["bytes"] / k10["kept"]["bytes"] == pytest.approx(2.0, rel=0.01)
    assert k20["full"] == k10["full"]
    grown = k20["held"]["bytes"] - k10["held"]["bytes"]
    # the same headroom in both; whole blocks per segment move the difference by less than 90 blocks
    assert abs(grown - (k20["kept"]["bytes"] - k10["kept"]["bytes"])) < 30 * 3 * 32 * k10["entry_bytes"]


@pytest.mark.slow
def test_uncompressed_run_holds_the_full_cache(default_model):
    r = run_profile(ProfileSettings(context=64, decode_steps=2), loaded=default_model)
    mk, pk = r["measured"]["kv"], r["planned"]["kv"]
    assert r["policy"] == "full" and r["budget"] is None
    assert mk["kept"] == pk["kept"] and mk["full"] == pk["full"] and mk["kept"] == mk["full"]
    # the prompt and its headroom up front, in whole blocks of 32 per (layer, kv head)
    assert mk["held"]["slots"] == 30 * 3 * -(-(64 + 2) // 32) * 32
    assert pk["held"]["bytes"] == mk["full"]["bytes"] + 30 * 3 * 2 * mk["entry_bytes"]
    assert r["measured"]["peak"]["prefill"]["kv_bytes"] == mk["held"]["bytes"]


@pytest.mark.slow
def test_measured_errors(default_model, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    for settings, fragment in ((dict(context=8193), "longer than the model's context"),
                               (dict(batch=2), "--batch applies to --plan"),
                               (dict(prompt_file=str(empty)), "empty"),
                               (dict(prompt_file=str(tmp_path / "none.txt")), "not found")):
        with pytest.raises(KvxError, match=fragment):
            run_profile(ProfileSettings(**settings), loaded=default_model)


@pytest.mark.slow
def test_plot_and_table(measured, tmp_path, capsys):
    from kvx.commands.profile_view import print_report, write_plot

    target = tmp_path / "map.png"
    write_plot(measured["10%"], target)
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    print_report(measured["10%"])
    out = capsys.readouterr().out
    for fragment in ("KV held", "KV peak, prefill", "RSS peak, decode", "compaction", "per layer"):
        assert fragment in out


# -- the command line (once kvx/cli.py registers `profile`) ------------------------------------------------

def _registered() -> bool:
    from kvx.cli import app

    return any((c.name or c.callback.__name__) == "profile" for c in app.registered_commands)


@pytest.mark.skipif(not _registered(), reason="kvx/cli.py does not register `profile` yet")
def test_cli(tmp_path):
    def kvx(*args):
        return subprocess.run([sys.executable, "-m", "kvx", "profile", *args], capture_output=True, text=True,
                              timeout=300)

    config = write_config(tmp_path, "llama70b", LLAMA_70B)
    proc = kvx("--plan", "--model", str(config), "--context", "131072", "--batch", "8", "--budget", "5%",
               "--dtype", "bfloat16", "--memory", "640GiB", "--json")
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    assert r["schema"] == "kvx.profile/2" and r["planned"]["fits"]["max_batch_budget"] > 8
    for args in (["--plan", "--model", str(config), "--memory", "80GiB"],
                 ["--plan", "--model", str(config), "--budget", "0%"],
                 ["--plan", "--model", str(config), "--memory", "eighty"],
                 ["--plan", "--model", str(config), "--context", "-5"],
                 ["--context", "999999"]):
        proc = kvx(*args)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("kvx: error:") and proc.stdout == ""
