"""`kvx eval --tensor-parallel N`: the same grid on N ranks, each holding its slice of the model and of every
cache (models/sharding.py). Every rank runs the whole evaluation over the same samples and variants, the
compressions select as one device (runtime/parallel/selection.py) and the tokens are rank 0's; only rank 0
(this process) writes the results file and shows the progress, the others keep their rows in memory.
"""

from __future__ import annotations

from kvx.eval.results import ResultsFile


class _Unwritten(ResultsFile):
    """Another rank's view of the results: the rows already in the file (read at start, as rank 0 did), and
    the new ones in memory only."""

    def _write(self, text: str) -> None:
        pass


def eval_rank(tp, folder: str, device: str, dtype: str, config, out_path: str, results=None, quiet: bool = True,
              run=None):
    from kvx.eval.runner import run_eval
    from kvx.options import load_rank
    from kvx.runtime.engine.model_runner import ModelRunner

    llm, tok = load_rank(folder, tp, device, dtype)
    engine = ModelRunner(llm, tok)
    if tp.rank == 0:
        return run(engine, config, results)
    run_eval(engine, config, _Unwritten(out_path))
    return None
