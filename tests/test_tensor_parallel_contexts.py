"""Stored contexts on tensor-parallel ranks: `kvx compress --tp 2` writes the file one device writes, and
`kvx generate --load-context --tp 2` answers as one device does, from a file made either way.

The ranks are started by the installed `kvx` (gloo on the CPU), float32 weights: the exact comparison
(the ranks' partial sums round apart from one device's in the last bits, so keys and values are compared
within a tolerance and everything chosen — positions, lengths, targets, tokens — exactly).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from checkpoints import make_model_folder
from kvx.models.config import ModelConfig
from kvx.models.sharding import shard_for
from kvx.runtime.contexts.stored import ContextInfo, StoredContext
from kvx.runtime.parallel.stored_shards import rank_share, whole_context
from test_tensor_parallel import MODELS, _kvx

DOC = ("The harbour office keeps a ledger of every ship. " * 6 + "The secret code is 4817. "
       + "Gulls circle the old lighthouse at dawn. " * 6)
QUESTIONS = ["What is the secret code?", "What circles the lighthouse?"]


def _config(kv_heads: int, heads: int = 12) -> ModelConfig:
    return ModelConfig(architecture="llama", vocab_size=64, hidden_size=heads * 8, intermediate_size=32,
                       num_layers=2, num_heads=heads, num_kv_heads=kv_heads, head_dim=8, rope_theta=10000.0,
                       rope_scaling=None, rms_norm_eps=1e-5, tie_word_embeddings=True, qkv_bias=False,
                       qk_norm=False, sliding_window=None, max_position_embeddings=256, bos_token_id=1,
                       eos_token_ids=[2], torch_dtype="float32")


def _random_context(cfg: ModelConfig, seed: int) -> StoredContext:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 9, (cfg.num_layers, cfg.num_kv_heads), generator=g).numpy().astype(np.int64)
    keys, values, positions, mass = [], [], [], []
    for layer in range(cfg.num_layers):
        n = int(lengths[layer].sum())
        keys.append(torch.randn(n, cfg.head_dim, generator=g))
        values.append(torch.randn(n, cfg.head_dim, generator=g))
        positions.append(torch.cat([torch.randperm(40, generator=g)[:int(k)].sort().values for k in lengths[layer]]))
        mass.append(torch.rand(n, generator=g))
    info = ContextInfo("m", "t", "float32", {"name": "h2o"}, {"fraction": 0.2}, {"raw": True, "system": None}, 40)
    return StoredContext(keys=keys, values=values, positions=positions, lengths=lengths, position=40, info=info,
                         mass=mass, head_budget=(lengths + 1).tolist(),
                         recent_q=torch.randn(cfg.num_layers, cfg.num_heads, 3, cfg.head_dim, generator=g),
                         lengths_after_compress=lengths.tolist())


@pytest.mark.parametrize("kv_heads", [1, 2, 3, 4])  # replicated, even, uneven, even
def test_shares_put_together_are_the_whole(kv_heads):
    cfg = _config(kv_heads)
    whole = _random_context(cfg, kv_heads)
    shards = [shard_for(cfg, r, 2) for r in range(2)]
    parts = [rank_share(whole, s, kv_heads, 2) for s in shards]
    for s, part in zip(shards, parts):
        assert part.lengths.shape == (cfg.num_layers, s.kv_heads)
        assert part.recent_q.shape[1] == s.q_heads
    back = whole_context(parts, shards, kv_heads)
    assert np.array_equal(back.lengths, whole.lengths)
    assert back.head_budget == whole.head_budget and back.lengths_after_compress == whole.lengths_after_compress
    for name in ("keys", "values", "positions", "mass"):
        for a, b in zip(getattr(back, name), getattr(whole, name)):
            assert torch.equal(a, b), name  # a replicated head's mass: two halves summed, exactly
    assert torch.equal(back.recent_q, whole.recent_q)
    if kv_heads == 1:  # each replica holds half the head's mass, so their eviction rounds sum to the whole
        assert torch.equal(parts[0].mass[0] + parts[1].mass[0], whole.mass[0])


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return {kv: make_model_folder(tmp_path_factory.mktemp(f"tp_ctx_{kv}"), max_position_embeddings=8192,
                                  **MODELS[name][1])
            for kv, name in (("uneven", "llama_3kv"), ("replicated", "llama_1kv"))}


def _compress(folder, policy, out, tp):
    done = _kvx("compress", "--model", str(folder), "--context", "-", "--policy", policy, "--budget", "30%",
                "--dtype", "float32", "--raw", "-o", str(out), "--json", "--tp", str(tp), input=DOC, timeout=180)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _answer(folder, file, tp):
    args = ["generate", "--model", str(folder), "--load-context", str(file), "--max-tokens", "24", "--json",
            "--quiet", "--dtype", "float32", "--tp", str(tp)]
    for q in QUESTIONS:
        args += ["-q", q]
    done = _kvx(*args, timeout=180)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.parametrize("kv,policy", [("uneven", "kvzip"), ("uneven", "h2o"), ("replicated", "h2o"),
                                       ("replicated", "ahakv")])
def test_a_context_compressed_on_two_ranks_is_one_devices(folders, tmp_path, kv, policy):
    folder = folders[kv]
    one, two = tmp_path / "one.kvc", tmp_path / "two.kvc"
    s1, s2 = _compress(folder, policy, one, 1), _compress(folder, policy, two, 2)
    assert s2["entries_kept"] == s1["entries_kept"] and s2["file_bytes"] == s1["file_bytes"]
    with safe_open(str(one), "pt") as a, safe_open(str(two), "pt") as b:
        assert set(a.keys()) == set(b.keys())
        for name in a.keys():
            x, y = a.get_tensor(name), b.get_tensor(name)
            if x.dtype.is_floating_point:  # keys, values, mass, recent queries: the ranks' rounding only
                assert torch.allclose(x, y, rtol=1e-3, atol=1e-4), name
            else:  # positions, lengths, targets: what was chosen
                assert torch.equal(x, y), name
        meta_a, meta_b, names = a.metadata(), b.metadata(), set(a.keys())
    assert meta_a["lengths_after_compress"] == meta_b["lengths_after_compress"]
    if policy != "kvzip":  # a decode-time policy's state travelled: the mass (h2o), the recent queries (ahakv)
        assert {"mass.0", "recent_q"} & names and "head_budget" in names

    reference = _answer(folder, one, 1)
    tokens = [(r["text"], r["generated_tokens"]) for r in reference["results"]]
    assert all(n > 0 for _, n in tokens)
    for file, tp in ((two, 2), (one, 2), (two, 1)):  # either file, on either number of ranks
        got = _answer(folder, file, tp)
        assert [(r["text"], r["generated_tokens"]) for r in got["results"]] == tokens, (file.name, tp)
        assert [r["kv_entries_kept"] for r in got["results"]] == [r["kv_entries_kept"] for r in reference["results"]]


def test_jsonl_context_file_lines_on_two_ranks_equal_one(folders, tmp_path):
    """Lines naming .kvc files in one batch: each file's entries reach rank 1 once (with its first line),
    the lines on one file share its blocks, and the answers are one device's."""
    folder = folders["replicated"]
    h2o, snap = tmp_path / "h2o.kvc", tmp_path / "snap.kvc"
    _compress(folder, "h2o", h2o, 1)
    _compress(folder, "snapkv", snap, 2)
    lines = "\n".join(json.dumps(x) for x in [
        {"id": "a", "context_file": str(h2o), "question": QUESTIONS[0]},
        {"id": "b", "context_file": str(snap), "questions": QUESTIONS},
        {"id": "c", "prompt": "the quick brown fox " * 10, "policy": "tova", "budget": "30%"},
        {"id": "d", "context_file": str(h2o), "question": QUESTIONS[1]},
        {"id": "e", "context_file": str(snap), "question": QUESTIONS[1]}]) + "\n"
    args = ["generate", "--jsonl", "--model", str(folder), "--max-tokens", "24", "--dtype", "float32", "--ordered",
            "--max-batch", "3", "--quiet"]
    one, two = _kvx(*args, input=lines, timeout=180), _kvx(*args, "--tp", "2", input=lines, timeout=180)
    assert one.returncode == 0 and two.returncode == 0, (one.stderr, two.stderr)
    got = [json.loads(x) for x in two.stdout.splitlines()]
    want = [json.loads(x) for x in one.stdout.splitlines()]
    assert len(want) == 5 and all("error" not in w for w in want), want

    def answers(rows):
        return [(r["id"], [(x["text"], x["generated_tokens"], x["kv_entries_kept"]) for x in r.get("results", [r])])
                for r in rows]

    assert answers(got) == answers(want)


def test_serve_contexts_on_two_ranks_answer_as_one(folders):
    """kvx serve --tp 2: a context compressed in the server (every rank compresses its heads, rank 0 gathers
    them), concurrent questions on it, then deleted (rank 1 forgets it too)."""
    import concurrent.futures

    import httpx
    from test_serve_cli import ServeProcess

    model = str(folders["uneven"])

    def run(*extra):
        server = ServeProcess("--model", model, "--kv-memory", "32MiB", "--dtype", "float32", *extra)
        try:
            made = httpx.post(server.url + "/v1/contexts", json={"text": DOC, "kv_policy": "ada-snapkv",
                                                                 "kv_budget": "25%"}, timeout=180)
            assert made.status_code == 200, made.text
            made = made.json()
            bodies = [{"model": "tiny", "messages": [{"role": "user", "content": q}], "max_tokens": 16,
                       "temperature": 0, "kv_context": made["id"]} for q in QUESTIONS * 2]
            with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
                replies = list(pool.map(lambda b: httpx.post(server.url + "/v1/chat/completions", json=b,
                                                             timeout=120), bodies))
            assert all(r.status_code == 200 for r in replies), [r.text for r in replies]
            texts = [r.json()["choices"][0]["message"]["content"] for r in replies]
            cached = [r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] for r in replies]
            gone = httpx.delete(f"{server.url}/v1/contexts/{made['id']}", timeout=30)
            assert gone.status_code == 200
            after = httpx.post(server.url + "/v1/chat/completions", json=bodies[0], timeout=60)
            assert after.status_code == 404
            ok = httpx.post(server.url + "/v1/completions", json={"model": "tiny", "prompt": "a b c", "max_tokens": 4},
                            timeout=60)
            assert ok.status_code == 200  # the ranks still step together after the delete
            return made, texts, cached
        finally:
            server.close()

    made1, texts1, cached1 = run()
    made2, texts2, cached2 = run("--tp", "2")
    assert texts2 == texts1 and cached2 == cached1 and all(c == made1["context_tokens"] for c in cached1)
    for key in ("context_tokens", "entries_kept", "entries_full", "bytes_full"):
        assert made2[key] == made1[key], key
