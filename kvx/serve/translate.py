"""A validated request body and its prompt ids -> the GenerationRequest the batched engine runs.

Sampling follows the API's defaults (temperature 1, top_p 1, a fresh seed when none is given), not the
CLI's greedy default: a client that says nothing gets what the API promises. temperature 0 is greedy.
"""

from __future__ import annotations

import secrets

from kvx.runtime.engine.sampling import SamplingParams
from kvx.runtime.engine.sequence import GenerationRequest
from kvx.serve import compression
from kvx.serve.errors import bad_request
from kvx.serve.settings import RequestDefaults


# Sampling so sharp that only the most likely token can be drawn runs greedy. Below these the sampler's
# float32 arithmetic breaks down (logits / 1e-300 overflow; a top_p that rounds to 0 drops every token), and
# the answer is the greedy one anyway: a nucleus under 1e-6 holds only the top token (whose probability is
# at least 1 / vocabulary), and a temperature under 1e-5 is greedy in vLLM too.
GREEDY_TEMPERATURE = 1e-5
GREEDY_TOP_P = 1e-6


def _stop(value) -> tuple[str, ...]:
    stops = (value,) if isinstance(value, str) else tuple(value or ())
    if any(s == "" for s in stops):
        raise bad_request("stop strings must not be empty", "stop")
    return stops


def generation_request(body, prompt_ids: list[int], defaults: RequestDefaults, context=None) -> GenerationRequest:
    """The engine's request for a body; `context` (a stored context's ResidentContext): prompt_ids are the
    request's own tokens after it, and the context's policy and budget apply."""
    if body.n not in (None, 1):
        raise bad_request(f"n={body.n} is not supported: kvx returns one choice per request (send n requests; "
                          "they are batched)", "n")
    if getattr(body, "best_of", None) not in (None, 1):
        raise bad_request("best_of is not supported", "best_of")
    unsupported = body.unsupported_fields()
    if unsupported:
        raise bad_request(f"{unsupported[0]} is not supported by kvx", unsupported[0])
    temperature = 1.0 if body.temperature is None else body.temperature
    top_p = 1.0 if body.top_p is None else body.top_p
    if temperature < GREEDY_TEMPERATURE or top_p < GREEDY_TOP_P:
        temperature, top_p = 0.0, 1.0
    params = SamplingParams(temperature=temperature, top_k=body.top_k or 0, top_p=top_p,
                            seed=secrets.randbits(63) if body.seed is None else body.seed)
    max_tokens = body.requested_max_tokens()
    common = dict(params=params, max_tokens=defaults.max_tokens if max_tokens is None else max_tokens,
                  stop=_stop(body.stop), stop_at_eos=not body.ignore_eos)
    if context is not None:
        for name in ("kv_policy", "kv_budget", "kv_allocation", "kv_policy_args"):
            if getattr(body, name) is not None:
                raise bad_request(f"{name}: a stored context was compressed with its own policy and budget; drop "
                                  f"{name} from a request with kv_context", name)
        return GenerationRequest(context=context, question_ids=[list(prompt_ids)], **common)
    policy, budget = compression.resolve(defaults, body.kv_policy, body.kv_budget, body.kv_allocation,
                                         body.kv_policy_args)
    return GenerationRequest(prompt_ids=prompt_ids, params=params,
                             max_tokens=defaults.max_tokens if max_tokens is None else max_tokens,
                             policy=policy, budget=budget, stop=_stop(body.stop), stop_at_eos=not body.ignore_eos)
