"""KVzip (arXiv 2505.23416): score the context by how much the model needs it to reconstruct it.

Question-agnostic. After the context is prefilled, the model is fed a reconstruction prompt ("Repeat the
previous context exactly.", the end of the user turn, then the context itself, in chunks of `chunk`
tokens; from the second chunk on the prompt asks to continue from the last `cue` tokens of the previous
chunk) on top of the context's cache. For every layer and kv group:

    s[g, j] = max_{h in g} max_{t in pass(j)} Ã[h, t, j]        (KVzip+: Ã[h,t,j]·‖v_j W_O^h‖₂ / ‖x_t‖₂)

where pass(j) is the reconstruction pass of the chunk holding key j and Ã is the softmax of that pass's
queries over the attention sinks, that chunk's keys and the pass's own keys (as the authors' code and
kvpress compute it). The sinks are the chat template's prefix (the system prompt, kept whole: the
authors' code never evicts it and uses all of it as the sinks; `keep_prefix=false` takes only the first
`sinks` tokens, as kvpress does, and leaves the rest of the prefix unscored, so it goes first), or the
first `sinks` tokens when there is no template or it is shorter; they are protected inside the budget.
Selection is model-wide: one top-K over the
raw scores of every layer and head (the `global` allocator with normalize=false): the scores are
probabilities and comparable as they are. `--allocation ada --policy-arg alpha=0` selects per layer
(one top-K over the heads of each layer, uniform layer totals: kvpress's layerwise=True).

The reconstruction pass itself lives in kvx/runtime/compression/reconstruction.py (its K/V never enter the
cache), its attention and column max in kvx/kernels/reconstruction.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from kvx.kernels.stats import LayerStats, StatsRequest
from kvx.policies.base import ScoreContext, Scorer

FIRST_PROMPT = "\n\nRepeat the previous context exactly."
NEXT_PROMPT = "\n\nRepeat the part of the previous context exactly, starting with"


@dataclass
class KVzipScorer(Scorer):
    name = "kvzip"
    reconstructs = True  # the engine runs runtime/compression/reconstruction.py after the prefill
    sinks: int = field(default=4, metadata={"min": 0, "help": "first tokens always kept (attention sinks)"})
    chunk: int = field(default=2048, metadata={"min": 1, "help": "context tokens reconstructed per pass"})
    cue: int = field(default=8, metadata={"min": 0, "help": "last tokens of the previous chunk that cue the next"})
    plus: bool = field(default=False, metadata={"help": "KVzip+: weight by ||v W_O^h||_2 / ||x_t||_2"})
    keep_prefix: bool = field(default=True, metadata={
        "help": "keep the chat template's prefix (system prompt) whole as the sinks, as the authors' code "
                "(false: only the first `sinks` tokens, as kvpress)"})
    window: int = field(default=0, metadata={"min": 0, "help": "most recent context tokens protected"})

    def request(self) -> StatsRequest:
        return StatsRequest(reconstruction=self.chunk, reconstruction_cue=self.cue,
                            reconstruction_sinks=self.sinks, reconstruction_plus=self.plus,
                            reconstruction_keep_prefix=self.keep_prefix,
                            value_out_norm=self.plus)

    def score(self, stats: LayerStats, ctx: ScoreContext) -> Tensor:
        if stats.col_max is None:
            raise RuntimeError("kvzip needs the reconstruction pass's statistics (runtime/compression/reconstruction.py)")
        s = stats.col_max.float()
        if self.plus:
            s = s * stats.value_out_norm.float()
        H, n = s.shape
        return s.reshape(ctx.num_kv_heads, H // ctx.num_kv_heads, n).amax(dim=1)
