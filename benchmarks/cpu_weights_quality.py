"""How far each CPU weight format's decode steps move the default model's next-token distribution from
float32's, on prose, teacher-forced one token at a time (the decode path: every product has one row).

    python benchmarks/cpu_weights_quality.py [--tokens 512] [--formats int8,int8-pytorch,w8a8,bfloat16]

For each format: the mean KL divergence KL(float32 || format) of the next-token distributions, the share of
positions whose top-1 token equals float32's, and the mean negative log-likelihood of the prose's own next
tokens (float32's printed first). `int8` runs kvx's C kernels (float32 activations) where they build;
`int8-pytorch` the same int8 weights through PyTorch's kernel (activations rounded to bfloat16).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def decode_logits(model, ids):
    """Logits at every position, one token per forward, over a plain growing cache."""
    import torch
    import torch.nn.functional as F

    keys, values = {}, {}

    def attend(layer, q, k, v, positions, q_pre):
        keys[layer] = k if layer not in keys else torch.cat([keys[layer], k], dim=1)
        values[layer] = v if layer not in values else torch.cat([values[layer], v], dim=1)
        return F.scaled_dot_product_attention(q[None], keys[layer][None], values[layer][None],
                                              enable_gqa=q.shape[0] != k.shape[0])[0]

    out = []
    with torch.inference_mode():
        for t, tok in enumerate(ids):
            out.append(model(torch.tensor([tok]), torch.tensor([t]), attend)[0].float())
    return torch.stack(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--formats", default="int8,int8-pytorch,w8a8,bfloat16")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    import torch

    from kvx.eval.bench import prose_ids
    from kvx.kernels import cpu_native
    from kvx.models.cpu_weights import pack
    from kvx.options import calibration_for, load

    torch.set_num_threads(a.threads)
    model, tok = load(None, "cpu", "float32", quiet=True)
    ids = prose_ids(tok, a.tokens + 1)
    target = torch.tensor(ids[1:])
    ref = decode_logits(model, ids[:-1]).log_softmax(-1)
    nll = lambda lp: -lp.gather(1, target[:, None]).mean().item()  # noqa: E731
    print(f"| weights | KL from float32 | top-1 = float32's | NLL |\n|---|---|---|---|\n| float32 | 0 | 100% | {nll(ref):.4f} |")
    lib = cpu_native.library()
    for fmt in a.formats.split(","):
        m, _ = load(None, "cpu", "float32", quiet=True)
        cpu_native._loaded[:] = [None if fmt == "int8-pytorch" else lib]  # which int8 kernel the packing lays out for
        base = fmt.removesuffix("-pytorch")
        pack(m, base, calibration_for(m, tok) if base == "w8a8" else None)
        lp = decode_logits(m, ids[:-1]).log_softmax(-1)
        kl = (ref.exp() * (ref - lp)).sum(-1).mean().item()
        top1 = (lp.argmax(-1) == ref.argmax(-1)).float().mean().item()
        print(f"| {fmt} | {kl:.4f} | {100 * top1:.1f}% | {nll(lp):.4f} |", flush=True)
    cpu_native._loaded[:] = [lib]


if __name__ == "__main__":
    main()
