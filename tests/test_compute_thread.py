"""The server runs the model on one thread (kvx/serve/compute_thread.py): the thread that loads it is the
thread that steps it, and the event loop's thread runs no tensor op (a second thread running parallel ops
made every CPU op 1.4-2.2x slower: benchmarks/engine_thread.py)."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

import kvx.serve.server as server_module
from kvx.errors import KvxError
from kvx.serve.compute_thread import ComputeThread
from serve_helpers import live_server, tiny_model_dir


def test_run_returns_what_the_thread_computed_and_raises_what_it_raised():
    t = ComputeThread("test-compute")
    caller = threading.get_ident()
    ident = t.run(threading.get_ident)
    assert ident != caller
    assert t.run(threading.get_ident) == ident  # always the same thread
    with pytest.raises(KvxError, match="bad flag"):
        t.run(lambda: (_ for _ in ()).throw(KvxError("bad flag")))
    assert t.run(lambda: 41 + 1) == 42  # an error does not end the thread
    t.close()
    t.join(5)
    assert not t.is_alive()


def test_start_runs_a_loop_on_the_same_thread_and_the_thread_ends_with_it():
    t = ComputeThread("test-compute")
    ident = t.run(threading.get_ident)
    seen, stop = [], threading.Event()

    def loop():
        seen.append(threading.get_ident())
        stop.wait(5)

    t.start(loop)
    deadline = time.monotonic() + 5
    while not seen and time.monotonic() < deadline:
        time.sleep(0.01)
    assert seen == [ident] and t.is_alive()
    stop.set()
    t.join(5)
    assert not t.is_alive()


def test_the_server_loads_its_model_on_the_thread_that_steps_it(tmp_path, monkeypatch):
    loaded_on = []
    real = server_module.build_batch

    def recording_build_batch(*args, **kwargs):
        loaded_on.append(threading.get_ident())
        return real(*args, **kwargs)

    monkeypatch.setattr(server_module, "build_batch", recording_build_batch)
    model = tiny_model_dir(tmp_path)
    with live_server(str(model), dtype="float32") as server:
        stepped_on = []
        batch = server.ctx.engine_loop.batch
        real_step = batch.step

        def recording_step():
            stepped_on.append(threading.get_ident())
            return real_step()

        batch.step = recording_step
        r = httpx.post(server.url + "/v1/completions", json={"prompt": "w7 w8 w9", "max_tokens": 3}, timeout=60)
        assert r.status_code == 200, r.text
    assert len(loaded_on) == 1 and loaded_on[0] != threading.get_ident()
    assert stepped_on and set(stepped_on) == {loaded_on[0]}
