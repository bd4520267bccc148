"""Every linear of the default model's decode step as int8 weights, three ways, on the CPU (issue 36):

    python benchmarks/cpu_gemv_compile.py [--rows 1,4,16] [--threads 2]

- `int8pack`: PyTorch's `_weight_int8pack_mm` (bfloat16 activations), what `--dtype auto` runs today;
- `fbgemm w8a8`: fbgemm's dynamic int8 GEMM (the activations quantized too: KVX_CPU_WEIGHTS=w8a8);
- `compiled`: the product written as a reduction, sum_k float(q[n, k]) * x[m, k] * scale[n], all 121
  matrices in one `torch.compile`d graph (inductor's C++: the int8 weights widened in registers, float32
  activations).

The default model's shapes with random weights; time per decode step's worth of linears (the LM head
included), and each way's largest error against a float64 product on one matrix.
"""

from __future__ import annotations

import argparse
import time
import warnings


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="1,4,16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=10)
    a = ap.parse_args()
    import torch

    warnings.filterwarnings("ignore")
    torch.set_num_threads(a.threads)
    shapes = [(960, 576), (576, 576), (3072, 576), (576, 1536)] * 30 + [(49152, 576)]
    gen = torch.Generator().manual_seed(0)
    mats = []
    for out, inp in shapes:
        w = torch.randn(out, inp, generator=gen) * 0.05
        s = w.abs().amax(1) / 127
        mats.append((torch.round(w / s[:, None]).to(torch.int8), s))
    packed = [torch.ops.quantized.linear_prepack(torch.quantize_per_channel(
        q.float() * s[:, None], s.double(), torch.zeros(len(s), dtype=torch.long), 0, torch.qint8), None)
        for q, s in mats]

    def reduction(x, q, s):
        return (q.to(torch.float32)[None] * x[:, None, :]).sum(-1) * s

    def all_reductions(x1, x2):
        return [reduction(x1 if q.shape[1] == 576 else x2, q, s) for q, s in mats]

    compiled = torch.compile(all_reductions, dynamic=False)
    ways = {
        "int8pack": lambda x1, x2: [torch._weight_int8pack_mm((x1 if q.shape[1] == 576 else x2).bfloat16(), q,
                                                              s.bfloat16()) for q, s in mats],
        "fbgemm w8a8": lambda x1, x2: [torch.ops.quantized.linear_dynamic(x1 if q.shape[1] == 576 else x2, p)
                                       for (q, _), p in zip(mats, packed)],
        "compiled": compiled,
    }
    print("| rows | " + " | ".join(ways) + " |\n|---|" + "---|" * len(ways))
    with torch.inference_mode():
        t0 = time.perf_counter()
        compiled(torch.randn(1, 576), torch.randn(1, 1536))
        first = time.perf_counter() - t0
        for m in (int(r) for r in a.rows.split(",")):
            x1, x2 = torch.randn(m, 576, generator=gen), torch.randn(m, 1536, generator=gen)
            cells = []
            for f in ways.values():
                f(x1, x2)
                f(x1, x2)
                t0 = time.perf_counter()
                for _ in range(a.repeats):
                    f(x1, x2)
                cells.append(f"{(time.perf_counter() - t0) / a.repeats * 1e3:.2f} ms")
            print(f"| {m} | " + " | ".join(cells) + " |", flush=True)
        x1, x2 = torch.randn(1, 576, generator=gen), torch.randn(1, 1536, generator=gen)
        q, s = mats[2]
        ref = (x1.double() @ q.double().T) * s.double()
        errs = {name: (f(x1, x2)[2].double() - ref).abs().max().item() for name, f in ways.items()}
    print(f"\nfirst compile {first:.1f} s; largest error on one 3072 x 576 matrix (|ref| up to "
          f"{ref.abs().max().item():.2f}): " + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()))


if __name__ == "__main__":
    main()
