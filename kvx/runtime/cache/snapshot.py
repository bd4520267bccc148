"""The compressed context a question-agnostic request comes back to between its questions.

Without decode-time eviction an answer only appends, so rewinding the lengths and the
position is enough; with it each answer runs in a copy of the context's cache (small: already compressed),
released when the answer ends, so eviction while answering never touches the context.
"""

from __future__ import annotations

from dataclasses import replace


class ContextSnapshot:
    def __init__(self, req):
        self.cache = req.cache
        self.position = req.position
        self.lengths = req.cache.lengths()
        self.recent_q = list(req.recent_q)
        self.head_budget = None if req.head_budget is None else [list(h) for h in req.head_budget]
        self.timings = replace(req.timings)  # a copy: the first answer adds to the request's own

    def begin_answer(self, req) -> None:
        """Before a question is prefilled over the context."""
        if req.evicts_while_decoding:
            copy = self.cache.clone()
            copy.beside = self.cache.bytes_allocated()  # the context stays while the copy is answered in
            copy.peak_bytes = max(self.cache.peak_bytes, copy.bytes_allocated() + copy.beside)
            req.cache = copy

    def restore(self, req) -> None:
        """Back to the context as it was when the snapshot was taken."""
        if req.cache is not self.cache:
            req.cache.release()
            req.cache = self.cache
        self.cache.rewind(self.lengths)
        req.position = self.position
        req.recent_q = list(self.recent_q)
        req.head_budget = None if self.head_budget is None else [list(h) for h in self.head_budget]
        req.timings = replace(self.timings)

    def release(self, req) -> None:
        """At the request's end: the context's cache, unless the request holds it (and releases it)."""
        if req.cache is not self.cache:
            self.cache.release()
