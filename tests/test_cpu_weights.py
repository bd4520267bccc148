"""The CPU's packed linear weights (kvx/models/cpu_weights.py): logits against float32 within a stated
tolerance on every architecture's tiny checkpoint, the int8 kernel's two paths agreeing, and `--dtype auto`
packing while an explicit --dtype does not."""

from __future__ import annotations

import pytest
import torch

from checkpoints import VARIANTS, make_checkpoint
from kvx.errors import KvxError
from kvx.models import Transformer
from kvx.models.cpu_weights import Int8Weight, W8A8Weight, calibrate, describe, pack, resolve_format
from test_models import DenseCache

PREFILL = 24
DECODE_STEPS = 6
# Relative L2 distance of a step's logits from float32's (||got - fp32|| / ||fp32||). bfloat16 rounds each
# weight to 8 significant bits and the matmul's inputs and output to bfloat16; int8 keeps 127 levels per
# output row. Measured on these checkpoints (seed 7's tokens): at most 1.3% (bfloat16) and 2.6% (int8); on
# the default model's 200-token prose prefill: 0.8% and 2.3%. w8a8 also rounds every activation row to 127
# levels: at most 6.6% here (int8 measured the same way: 3.0%).
TOLERANCE = {"bfloat16": 0.02, "int8": 0.05, "w8a8": 0.08}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return {name: make_checkpoint(name, root, seed=i)[0] for i, name in enumerate(VARIANTS)}


def _logits(model: Transformer, ids: torch.Tensor) -> list[torch.Tensor]:
    """The prefill's logits, then each decode step's (one token at a time)."""
    cache = DenseCache(model)
    with torch.no_grad():
        out = [model(ids[:PREFILL], torch.arange(PREFILL), cache.attend)]
        for t in range(PREFILL, PREFILL + DECODE_STEPS):
            out.append(model(ids[t:t + 1], torch.tensor([t]), cache.attend))
    return out


@pytest.mark.parametrize("fmt", ["bfloat16", "int8", "w8a8"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_packed_logits_match_float32(checkpoints, variant, fmt):
    ref_model = Transformer.from_pretrained(checkpoints[variant])
    ids = torch.randint(0, ref_model.config.vocab_size, (PREFILL + DECODE_STEPS,),
                        generator=torch.Generator().manual_seed(7))
    ref = _logits(ref_model, ids)
    model = Transformer.from_pretrained(checkpoints[variant])
    # w8a8's smoothing is calibrated on other tokens than the ones scored
    calib = torch.randint(0, ref_model.config.vocab_size, (32,), generator=torch.Generator().manual_seed(8))
    pack(model, fmt, calibrate(model, calib) if fmt == "w8a8" else None)
    from kvx.kernels import cpu_native

    native = " (C kernels)" if fmt == "int8" and cpu_native.library() is not None else ""
    assert model.weight_format == fmt and describe(model) == f"{fmt} weights{native}"
    assert all(layer.qkv is None and layer.down is None for layer in model.layers)  # float32 copies released
    assert model.dtype == torch.float32  # activations, embedding and the cache stay float32
    got = _logits(model, ids)
    for step, (g, r) in enumerate(zip(got, ref)):
        assert g.dtype == torch.float32 and g.shape == r.shape
        rel = ((g - r).norm() / r.norm()).item()
        assert rel <= TOLERANCE[fmt], f"{variant} {fmt} step {step}: relative distance {rel:.4f}"
        assert rel > 0  # the packed weights did run
    # the kept-statistics' o_proj stays readable: its dequantized values, within the format's rounding
    o_ref, o = ref_model.o_proj_weight(0), model.o_proj_weight(0)
    assert o.dtype == torch.float32 and o.shape == o_ref.shape
    assert ((o - o_ref).norm() / o_ref.norm()).item() <= TOLERANCE[fmt]


def test_int8_decode_rows_are_independent_and_the_prefill_path_agrees():
    """A decode step's rows (a batch: up to 64) equal each row alone bit for bit, so a sequence's greedy
    tokens in a batch are its tokens alone; a prefill's rows (widened to bfloat16) compute the same product
    within bfloat16 rounding."""
    from kvx.models.cpu_weights import _INT8_KERNEL_ROWS

    gen = torch.Generator().manual_seed(3)
    w = Int8Weight(torch.randn(96, 64, generator=gen) * 0.1)
    x = torch.randn(_INT8_KERNEL_ROWS + 8, 64, generator=gen)
    batch = w.linear(x[:16])
    assert torch.equal(batch, torch.cat([w.linear(x[i:i + 1]) for i in range(16)]))
    prefill = w.linear(x)  # more rows than the int8 kernel takes
    exact = x.to(torch.bfloat16).float() @ w.dequantized().t()
    for y in (batch, prefill[:16]):
        assert y.dtype == torch.float32
        assert ((y - exact[:16]).norm() / exact[:16].norm()).item() < 1e-2
    assert ((prefill - exact).norm() / exact.norm()).item() < 1e-2
    bias = torch.randn(96, generator=gen)
    assert torch.allclose(w.linear(x[:16], bias), batch + bias)


@pytest.mark.parametrize("rows", [1, 5, 16, 100])
def test_w8a8_rows_are_independent_and_compute_the_smoothed_product(rows):
    """w8a8 quantizes each activation row by its own range against a fixed anchor row, and sums integers:
    a row's output in a batch equals it alone bit for bit, prefill-sized batches included; the product is
    x @ W.T within int8 rounding of both sides, smoothing included (it moves ranges, not values)."""
    gen = torch.Generator().manual_seed(rows)
    w = torch.randn(80, 64, generator=gen) * 0.1
    x = torch.randn(rows, 64, generator=gen)
    x[:, 5] *= 30  # an outlier channel, as real activations have
    plain, smoothed = W8A8Weight(w), W8A8Weight(w, x.abs().amax(0))
    exact = x @ w.t()
    # the smoothed weight's rows are scaled by the outlier's column, so its own rounding is coarser
    for packed, w_tol in ((plain, 0.01), (smoothed, 0.05)):
        y = packed.linear(x)
        assert y.dtype == torch.float32 and y.shape == (rows, 80)
        assert torch.equal(y, torch.cat([packed.linear(x[i:i + 1]) for i in range(rows)]))
        assert ((y - exact).norm() / exact.norm()).item() < 0.03
        assert ((packed.dequantized() - w).norm() / w.norm()).item() < w_tol
    err = lambda p: ((p.linear(x) - exact).norm() / exact.norm()).item()  # noqa: E731
    assert err(smoothed) < err(plain)  # the outlier channel's range moved into the weight
    bias = torch.randn(80, generator=gen)
    assert torch.equal(smoothed.linear(x, bias), smoothed.linear(x) + bias)


def test_weight_format_option(monkeypatch, checkpoints):
    from kvx.options import cpu_weight_format, load

    monkeypatch.delenv("KVX_CPU_WEIGHTS", raising=False)
    assert resolve_format() == "int8"
    assert cpu_weight_format("auto", "cpu") == "int8"
    assert cpu_weight_format("float32", "cpu") == "float32"  # exact parity stays one flag away
    assert cpu_weight_format("bfloat16", "cpu") == "float32"  # an explicit dtype: the whole model in it
    assert cpu_weight_format("auto", "cuda") == "float32"
    monkeypatch.setenv("KVX_CPU_WEIGHTS", "bfloat16")
    assert cpu_weight_format("auto", "cpu") == "bfloat16"
    folder = str(checkpoints["llama_gqa_llama3"])
    llm, _ = load(folder, "cpu", "auto", quiet=True) if _has_tokenizer(folder) else (None, None)
    if llm is not None:
        assert llm.weight_format == "bfloat16"
    monkeypatch.setenv("KVX_CPU_WEIGHTS", "int4")
    with pytest.raises(KvxError, match="KVX_CPU_WEIGHTS"):
        cpu_weight_format("auto", "cpu")
    model = Transformer.from_pretrained(checkpoints["llama_gqa_llama3"], dtype=torch.bfloat16)
    with pytest.raises(KvxError, match="float32 model on the CPU"):
        pack(model, "int8")


def _has_tokenizer(folder: str) -> bool:
    from pathlib import Path

    return (Path(folder) / "tokenizer.json").exists()


def test_summary_line_says_which_weights_ran(cli, tmp_path, monkeypatch):
    """`kvx generate`'s summary line ends with the weights that ran: packed under --dtype auto on the CPU
    (KVX_CPU_WEIGHTS picks the format), float32 under --dtype float32."""
    from serve_helpers import tiny_model_dir

    folder = tiny_model_dir(tmp_path)
    code, _, err = cli("generate", "--model", str(folder), "--max-tokens", "3", "hello world")
    assert code == 0, err
    from kvx.kernels import cpu_native

    native = " (C kernels)" if cpu_native.library() is not None else ""  # the machine builds them, or not
    assert err.strip().splitlines()[-1].endswith(" · int8 weights" + native)
    monkeypatch.setenv("KVX_CPU_WEIGHTS", "w8a8")
    code, out_w8a8, err = cli("generate", "--model", str(folder), "--max-tokens", "3", "--jsonl",
                              stdin=b'{"prompt": "hello world"}\n{"prompt": "hello world", "max_tokens": 2}\n')
    assert code == 0, err
    import json

    first, second = (json.loads(line) for line in out_w8a8.splitlines())
    assert first["generated_tokens"] == 3 and second["generated_tokens"] == 2
    assert first["text"].startswith(second["text"])  # rows independent: in a batch of two, the same tokens
    code, _, err = cli("generate", "--model", str(folder), "--max-tokens", "3", "hello world")
    assert code == 0, err
    assert err.strip().splitlines()[-1].endswith(" · w8a8 weights")
    monkeypatch.delenv("KVX_CPU_WEIGHTS")
    code, _, err = cli("generate", "--model", str(folder), "--max-tokens", "3", "--dtype", "float32", "hello world")
    assert code == 0, err
    assert err.strip().splitlines()[-1].endswith(" · float32 weights")


def test_eval_rows_name_packed_weights_and_are_not_mixed_with_float32(cli, tmp_path):
    """`kvx eval` rows made with packed CPU weights say so in their dtype, so resuming a float32 results
    file with them (or the other way round) is refused instead of mixing two models' scores."""
    import json

    from serve_helpers import tiny_model_dir

    folder = str(tiny_model_dir(tmp_path))
    out = tmp_path / "rows.jsonl"
    args = ["eval", "--model", folder, "--task", "passkey", "--context", "256", "--samples", "1",
            "--budgets", "50%", "--policies", "snapkv", "--quiet", "--out", str(out)]
    code, _, err = cli(*args)
    assert code == 0, err
    dtypes = {json.loads(line)["dtype"] for line in out.read_text().splitlines()}
    assert dtypes == {"float32 (int8 weights)"}
    code, _, err = cli(*args, "--dtype", "float32")
    assert code == 2 and "holds results of dtype float32 (int8 weights), not float32" in err
