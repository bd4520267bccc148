"""`--against kvpress` with one prefill per sample gives what kvpress's own pipeline gives, press by press.

Needs kvpress (and the transformers version it pins), which the test extra does not install: kvpress 0.5
requires transformers < 5.3. To run these, make an environment with `pip install -e '.[kvpress]' pytest`.
"""

from __future__ import annotations

import pytest
import torch

kvpress = pytest.importorskip("kvpress")

from kvx.eval import tasks as task_gen  # noqa: E402
from kvx.eval.kvpress_baseline import OWN_PIPELINE, PRESSES, KvpressBaseline  # noqa: E402
from kvx.eval.prompt import prompt_text  # noqa: E402
from kvx.models.hub import pull_default_model  # noqa: E402
from kvx.models.tokenizer import Tokenizer  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def baseline():
    return KvpressBaseline(pull_default_model(quiet=True), "cpu", torch.float32)


@pytest.fixture(scope="module")
def prompt():
    folder = pull_default_model(quiet=True)
    tok = Tokenizer.from_dir(folder)
    sample = task_gen.generate("passkey", tok, 768, seed=3, depth=0.5, haystack="noise")
    return prompt_text(sample, tok)


@pytest.fixture(scope="module")
def passkey():
    folder = pull_default_model(quiet=True)
    sample = task_gen.generate("passkey", Tokenizer.from_dir(folder), 768, seed=3, depth=0.5, haystack="noise")
    return sample.answers[0]


def _pipeline_cache(baseline, prompt, press_name, budget):
    """Run kvpress's own pipeline; its cache afterwards holds the compressed context (answers trimmed)."""
    from transformers import DynamicCache

    press = baseline.make_press(press_name, budget, n_context=1000)
    cache = DynamicCache()
    with torch.inference_mode():
        out = baseline.pipe(prompt.context, question=prompt.question or None, answer_prefix=prompt.answer_prefix,
                            press=press, max_new_tokens=8, cache=cache)
    masks = [getattr(layer.self_attn, "masked_key_indices", None) for layer in baseline.model.model.layers]
    return out["answer"], cache, masks


@pytest.mark.parametrize("aware", [False, True], ids=["agnostic", "aware"])
@pytest.mark.parametrize("press_name", sorted(set(PRESSES) - OWN_PIPELINE))
def test_shared_prefill_equals_the_pipeline(baseline, prompt, press_name, aware):
    shared = baseline.prefill(prompt, aware=aware)
    name = "kvpress:" + press_name
    if aware:  # kvpress's query-aware setting: the question at the end of the context, none after it
        prompt = type(prompt)(context=prompt.context + prompt.question, question="",
                              answer_prefix=prompt.answer_prefix)
    want_answer, want_cache, want_masks = _pipeline_cache(baseline, prompt, name, "25%")
    got_cache = shared.compress(name, "25%")
    got_masks = [getattr(layer.self_attn, "masked_key_indices", None) for layer in baseline.model.model.layers]
    assert len(got_cache.layers) == len(want_cache.layers)
    for got_mask, want_mask in zip(got_masks, want_masks):
        assert (got_mask is None) == (want_mask is None)
        if got_mask is not None:
            for g, w in zip(got_mask, want_mask):
                assert torch.equal(g, w)
    for got, want, mask in zip(got_cache.layers, want_cache.layers, got_masks):
        assert got.keys.shape == want.keys.shape
        keys = got.keys.clone()
        if mask is not None:
            # Head-wise presses only mask: kvpress's attention patch overwrote the masked keys of the
            # pipeline's cache in place while it answered, so compare the keys it still attends to.
            b, h, t = mask
            keys[b, h, t] = want.keys[b, h, t]
        torch.testing.assert_close(keys, want.keys, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got.values, want.values, rtol=1e-5, atol=1e-5)
    # A press that keeps 25% must really have dropped entries, or only masked them (head-wise AdaKV).
    full_len = shared.cache.layers[0].keys.shape[2]
    if press_name in ("ada-snapkv", "criticalkv") and got_masks[0] is not None:
        assert got_cache.layers[0].keys.shape[2] == full_len
    else:
        assert got_cache.layers[0].keys.shape[2] == pytest.approx(full_len * 0.25, abs=2)
    row = shared.answer(name, "25%", max_tokens=8)
    assert row.prediction == want_answer
    assert row.kv_bytes_held == sum(t.numel() * t.element_size() for layer in want_cache.layers
                                    for t in (layer.keys, layer.values))


def test_full_cache_answers_the_passkey(baseline, prompt, passkey):
    shared = baseline.prefill(prompt)
    row = shared.answer("kvpress:full", "100%", max_tokens=8)
    assert row.kv_bytes_held == row.kv_bytes_full
    want, _, _ = _pipeline_cache(baseline, prompt, "kvpress:full", "100%")
    assert row.prediction == want
    assert passkey in row.prediction


@pytest.mark.parametrize("aware", [False, True], ids=["agnostic", "aware"])
def test_kvzip_rows_are_the_pipelines_own(baseline, prompt, aware):
    """KVzipPress runs its own reconstruction passes, so its row comes from kvpress's pipeline itself: the
    same answer as calling the pipeline with the press, and a cache that holds everything (it masks)."""
    shared = baseline.prefill(prompt, aware=aware)
    if aware:
        prompt = type(prompt)(context=prompt.context + prompt.question, question="",
                              answer_prefix=prompt.answer_prefix)
    want_answer, want_cache, _ = _pipeline_cache(baseline, prompt, "kvpress:kvzip", "25%")
    row = shared.answer("kvpress:kvzip", "25%", max_tokens=8)
    assert row.prediction == want_answer
    assert row.kv_bytes_held == row.kv_bytes_full
