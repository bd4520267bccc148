"""The Triton interpreter (TRITON_INTERPRET=1) for tests that run Triton kernels on the CPU.

Triton reads TRITON_INTERPRET when it decorates a function, and its standard library (tl.cdiv, tl.sum)
is decorated when triton is first imported. A test module that needs the interpreter calls
`request_interpreter()` at import, before anything imports triton; if something imported it earlier,
`interpreter_active()` is false and `rerun_in_fresh_process` runs the module's interpreter cases in a new
process where the variable is set first.
"""

from __future__ import annotations

import os
import subprocess
import sys

import torch

HAS_CUDA = torch.cuda.is_available()


def request_interpreter() -> None:
    """Switch the interpreter on for this process, when CUDA is absent and triton is not imported yet."""
    if not HAS_CUDA and "triton" not in sys.modules:
        os.environ["TRITON_INTERPRET"] = "1"


def interpreter_active() -> bool:
    try:
        import triton.language as tl
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:
        return False
    return isinstance(tl.cdiv, InterpretedFunction)


def rerun_in_fresh_process(test_file: str, keyword: str, timeout: int = 900) -> subprocess.CompletedProcess:
    """`pytest test_file -k keyword` in a new process with the interpreter on; returns the finished run."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", test_file,
                           "-k", keyword], env=env, capture_output=True, text=True, timeout=timeout)
