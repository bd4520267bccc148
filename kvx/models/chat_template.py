"""A model's chat template, compiled in jinja2's sandbox and rendered under limits.

A template is code that came with the checkpoint: it may raise (raise_exception, a bad filter, 1/0),
recurse, nest loops until it never ends in practice, or build a gigantic string. Each of these ends in a
one-line KvxError instead of a traceback, a hang or an exhausted machine:

- any exception while rendering is reported with its first line;
- rendering stops after RENDER_SECONDS (a timer signal: only where kvx renders from the main thread, on
  POSIX; elsewhere the other limits still hold);
- the output stops at a size proportional to the messages (MAX_OUTPUT_OVERHEAD beyond twice their length);
- `*` may not repeat a string or list into more than MAX_REPEAT items, and `**` exponents stay small.
"""

from __future__ import annotations

import json
import signal
import threading
from contextlib import contextmanager
from datetime import datetime
from typing import Any

from kvx.errors import KvxError

RENDER_SECONDS = 10.0
MAX_OUTPUT_OVERHEAD = 1 << 20
MAX_REPEAT = 1 << 20
MAX_EXPONENT = 1024


class _Timeout(Exception):
    pass


def _sandbox():
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Guarded(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "**"})

        def call_binop(self, context, operator, left, right):
            if operator == "*":
                for seq, times in ((left, right), (right, left)):
                    if isinstance(seq, (str, list, tuple)) and isinstance(times, int) and len(seq) * times > MAX_REPEAT:
                        raise jinja2.TemplateError(f"repeats a sequence into more than {MAX_REPEAT} items")
            if operator == "**" and isinstance(right, (int, float)) and abs(right) > MAX_EXPONENT:
                raise jinja2.TemplateError(f"raises to a power above {MAX_EXPONENT}")
            return super().call_binop(context, operator, left, right)

    return Guarded


def compile_template(source: str) -> Any:
    import jinja2
    import jinja2.ext

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    def tojson(value: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        # Jinja's own tojson escapes HTML characters, which chat templates do not expect.
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = _sandbox()(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise KvxError(f"the model's chat template is not valid Jinja: {exc}") from None
    except (RecursionError, MemoryError, ValueError, TypeError) as exc:
        raise KvxError(f"the model's chat template cannot be compiled: {_first_line(exc)}") from None


def render(template: Any, messages: list[dict[str, Any]], **variables: Any) -> str:
    """The template's text for `messages`, or a one-line KvxError saying how the template failed."""
    import jinja2

    limit = 2 * sum(len(str(m.get("content", ""))) for m in messages) + MAX_OUTPUT_OVERHEAD
    parts: list[str] = []
    size = 0
    try:
        with _time_limit(RENDER_SECONDS):
            for piece in template.generate(messages=messages, **variables):
                size += len(piece)
                if size > limit:
                    raise KvxError(f"the model's chat template writes more than {limit} characters "
                                   "for these messages (does it loop?)")
                parts.append(piece)
    except _Timeout:
        raise KvxError(f"the model's chat template did not finish within {RENDER_SECONDS:g} s "
                       "(does it loop?)") from None
    except KvxError:
        raise
    except jinja2.TemplateError as exc:
        raise KvxError(f"the model's chat template refused the messages: {_first_line(exc)}") from None
    except Exception as exc:  # the template is foreign code: any failure of it is the checkpoint's, not kvx's
        raise KvxError(f"the model's chat template failed: {type(exc).__name__}: {_first_line(exc)}") from None
    return "".join(parts)


@contextmanager
def _time_limit(seconds: float):
    usable = (hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
              and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0))
    if not usable:
        yield
        return

    def expire(signum, frame):
        raise _Timeout()

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
