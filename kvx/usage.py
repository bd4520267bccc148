"""The command-line parser's usage errors as one line: `kvx: error: --temperature/-t: ... (see ...)`.

Typer now vendors its own click (`typer._click`) whose exceptions are not click's; older typers raise
click's own. Both families are recognised, so `main()` never lets a usage error out as a traceback
whichever typer is installed.
"""

from __future__ import annotations

import importlib
import re


def _modules() -> list:
    found = []
    for name in ("typer._click.exceptions", "typer.exceptions", "click.exceptions"):
        try:
            found.append(importlib.import_module(name))
        except ImportError:
            pass
    return found


def _classes(name: str) -> tuple[type, ...]:
    return tuple({getattr(m, name) for m in _modules() if isinstance(getattr(m, name, None), type)})


def exit_code(exc: BaseException) -> int | None:
    """The status an Exit asks for; None if exc is not the parser's Exit."""
    if isinstance(exc, _classes("Exit")):
        return int(getattr(exc, "exit_code", 0) or 0)
    return None


def is_abort(exc: BaseException) -> bool:
    return isinstance(exc, _classes("Abort"))


def is_no_args_help(exc: BaseException) -> bool:
    """`kvx` alone: the parser raises its help text as an error (click >= 8.2)."""
    return isinstance(exc, _classes("NoArgsIsHelpError"))


def usage_error_line(exc: BaseException) -> str | None:
    """One line naming the option and what is wrong with its value; None if exc is not a usage error."""
    if not isinstance(exc, _classes("ClickException")):
        return None
    param = getattr(exc, "param", None)
    if param is not None and type(exc).__name__ == "BadParameter":
        names = "/".join(getattr(param, "opts", None) or [str(param.name).upper()])
        text = f"{names}: {_lower_first(str(exc.message))}{_bad_input(exc)}"
    else:
        text = _lower_first(exc.format_message())
    text = re.sub(r"\s+", " ", text).strip().rstrip(".")
    ctx = getattr(exc, "ctx", None)
    path = getattr(ctx, "command_path", None) or "kvx"
    return f"{text} (see '{path} --help')"


def help_text(exc: BaseException) -> str:
    ctx = getattr(exc, "ctx", None)
    return ctx.get_help() if ctx is not None else exc.format_message()


def _lower_first(text: str) -> str:
    # "Input should be ..." reads as the middle of a sentence after the option's name; "JSON ..." stays.
    return text[:1].lower() + text[1:] if text[1:2].islower() else text


def _bad_input(exc: BaseException) -> str:
    """' (got "abc")': the rejected value, when the parser kept it (typer's pydantic coercion does)."""
    errors = getattr(exc.__cause__, "errors", None)
    try:
        value = errors()[0]["input"] if callable(errors) else None
    except (IndexError, KeyError, TypeError):
        return ""
    return "" if value is None else f", got {str(value)!r}"
