"""What a value must be, said once for the library and the notebooks. A kind (:func:`boolean`, :func:`integer`,
:func:`number`, ...) is a function of a value: None where the value is of that kind, else what was expected, in
words. :func:`check` raises on an argument of the wrong kind; :func:`check_parameters` checks a notebook's papermill
parameters in the cell after its parameters cell, before any work: a misspelled ``-p lamda 0.5`` would be a new
variable nobody reads, and ``-r train False`` the string "False", which Python takes as true.
"""

from __future__ import annotations

import ast
import difflib
import math
import numbers as _numbers
import os
import sys

import numpy as np

_INJECTED_HEADER = "# Parameters"  # the first line of papermill's cell (papermill.translators)
_PAPERMILL_NAMES = ("PAPERMILL_INPUT_PATH", "PAPERMILL_OUTPUT_PATH")


def assigned_names(source: str) -> list[str]:
    """The names a cell's top-level statements assign, in order (``a = 1``, ``a: int = 1``, ``a, b = ...``)."""
    names: list[str] = []
    for node in ast.parse(source).body:
        targets = node.targets if isinstance(node, ast.Assign) else \
            [node.target] if isinstance(node, (ast.AnnAssign, ast.AugAssign)) else []
        for target in targets:
            for leaf in ast.walk(target):
                if isinstance(leaf, ast.Name) and leaf.id not in names:
                    names.append(leaf.id)
    return names


def check_parameters(history: list[str] | None = None, namespace: dict | None = None, **kinds) -> list[str]:
    """Check the names papermill injected (an unknown one is named with the closest known one), then the value of
    every parameter in ``kinds`` (``name=kind``: :func:`boolean`, :func:`integer`, :func:`number`, :func:`numbers`,
    :func:`integers`, :func:`text`, :func:`path`, :func:`mapping`, each in :func:`optional` where None is allowed);
    ValueError for the first bad one. Returns the injected names.

    history: the sources of the cells run so far (IPython's ``In``, the default): papermill's cell is the last one
    starting with ``# Parameters``, the parameters cell the one before it. namespace: default the caller's globals.
    """
    if history is None:
        from IPython import get_ipython  # a notebook's kernel

        shell = get_ipython()
        history = list(shell.user_ns.get("In", [])) if shell is not None else []
    if namespace is None:
        namespace = sys._getframe(1).f_globals  # the cell's globals: IPython's user namespace
    injected = _injected_names(history)
    for name, kind in kinds.items():
        if name not in namespace:
            raise ValueError(f"check_parameters: the notebook has no parameter {name!r} to check")
        problem = kind(namespace[name])
        if problem:
            value = namespace[name]
            hint = ""
            if isinstance(value, str) and kind(_parse_literal(value)) is None:
                hint = (" (a string: papermill's -r passes text as it is; give the value with -p or -y, e.g. "
                        f"-p {name} {value})")
            raise ValueError(f"parameter {name!r} must be {problem}, got {value!r}{hint}")
    return injected


def _parse_literal(text: str):
    try:
        return ast.literal_eval(text.strip())
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return text


def _injected_names(history: list[str]) -> list[str]:
    injected_at = next((i for i in range(len(history) - 1, -1, -1)
                        if history[i].lstrip().startswith(_INJECTED_HEADER)), None)
    if injected_at is None:
        return []
    if injected_at == 0 or not history[injected_at - 1].strip():
        raise ValueError("papermill injected parameters, but no parameters cell ran before them: the notebook "
                         "needs a cell tagged 'parameters'")
    known = assigned_names(history[injected_at - 1])
    injected = [name for name in assigned_names(history[injected_at]) if name not in _PAPERMILL_NAMES]
    unknown = [name for name in injected if name not in known]
    if unknown:
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
            hints.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ValueError(f"unknown parameter{'s' if len(unknown) > 1 else ''} {', '.join(hints)}: this notebook "
                         f"takes {', '.join(known)}")
    return injected


def check(name: str, value, of):
    """``value`` where the kind ``of`` accepts it, else ValueError "<name> must be <what it expects>, got <value>"."""
    problem = of(value)
    if problem:
        raise ValueError(f"{name} must be {problem}, got {value!r}")
    return value


def kind(expected: str, test):
    """The kind of the values that pass ``test``, ``expected`` in words."""
    return lambda value: None if test(value) else expected


def _range(low, high, low_open=False, high_open=False):
    """A range in words (">= 0 and < 1", "" for none) and its test of a number."""
    words = " and ".join(([f"{'>' if low_open else '>='} {low:g}"] if low is not None else [])
                         + ([f"{'<' if high_open else '<='} {high:g}"] if high is not None else []))
    return words, lambda v: ((low is None or (v > low if low_open else v >= low))
                             and (high is None or (v < high if high_open else v <= high)))


def boolean():
    """True or False (not the string "False", not 0 or 1)."""
    return kind("True or False", lambda value: isinstance(value, (bool, np.bool_)))


def integer(low=None, high=None):
    """An integer (not a bool) in [low, high]."""
    words, inside = _range(low, high)
    return kind(f"an integer {words}".rstrip(),
                lambda v: isinstance(v, _numbers.Integral) and not isinstance(v, bool) and inside(v))


def number(low=None, high=None, low_open=False, high_open=False):
    """A finite real number (not a bool) in the range (``low_open``: > low, else >= low)."""
    words, inside = _range(low, high, low_open, high_open)
    return kind(f"a finite number {words}".rstrip(), lambda v: isinstance(v, _numbers.Real)
                and not isinstance(v, bool) and math.isfinite(v) and inside(v))


def _sequence(item, what: str, min_len: int, distinct: bool, shown):
    length = "non-empty list of " if min_len == 1 else f"list of at least {min_len} " if min_len > 1 else "list of "
    expected = (f"a {length}{what}"
                + (" that differ as shown" if distinct and shown else " without repeats" if distinct else ""))

    def problem(value):
        if not isinstance(value, (list, tuple)) or len(value) < min_len or any(item(v) for v in value):
            return expected
        keys = [shown(v) if shown else v for v in value]
        if distinct and len(set(keys)) != len(keys):
            return expected + (f" (to the digits shown: {', '.join(keys)})" if shown else "")
        return None
    return problem


def numbers(low=None, high=None, low_open=False, high_open=False, min_len=1, distinct=False):
    """A list of finite numbers in the range, at least ``min_len`` of them; ``distinct``: no two the same as
    the notebook shows them (``f"{value:g}"``: 0.5 and 0.5000001 would be one column)."""
    words = _range(low, high, low_open, high_open)[0]
    return _sequence(number(low, high, low_open, high_open), f"numbers {words}".rstrip(), min_len, distinct,
                     (lambda v: f"{v:g}") if distinct else None)


def integers(low=None, high=None, min_len=1, distinct=False):
    """A list of integers in [low, high], at least ``min_len``; ``distinct``: no repeats."""
    return _sequence(integer(low, high), f"integers {_range(low, high)[0]}".rstrip(), min_len, distinct, None)


def text(*choices):
    """A string; one of ``choices`` where given."""
    if choices:
        return kind("one of " + ", ".join(repr(c) for c in choices), lambda v: isinstance(v, str) and v in choices)
    return kind("a non-empty string", lambda v: isinstance(v, str) and v)


def path(file: bool = False):
    """A non-empty path (a string or os.PathLike); ``file``: a file to write, so not an existing folder."""
    def problem(value):
        if not isinstance(value, (str, os.PathLike)) or not str(value):
            return "a non-empty path" + (" of a file to write" if file else "")
        if file and os.path.isdir(os.path.expanduser(str(value))):
            return "the path of a file to write, not of a folder (add a file name, e.g. results.json)"
        return None
    return problem


def mapping():
    """A dict."""
    return kind("a mapping (a dict such as {\"partition\": \"gpu\"})", lambda value: isinstance(value, dict))


def optional(of):
    """``of`` (a kind) or None."""
    def problem(value):
        expected = None if value is None else of(value)
        return None if expected is None else f"None or {expected}"
    return problem
