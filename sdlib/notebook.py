"""Helpers for the book's notebooks that are not part of any chapter's story.

:func:`check_parameters` rejects a papermill parameter that the notebook does not have. Papermill runs a
notebook with ``-p name value`` by inserting, right after the cell tagged ``parameters``, a cell that assigns the
given names; a misspelled name (``-p lamda 0.5``) is then a new variable nobody reads, and the notebook runs
with its defaults. Every notebook calls ``check_parameters()`` in the cell after its parameters cell, before any
work, so that such a run stops at once and names the parameter it does not know.
"""

from __future__ import annotations

import ast
import difflib

__all__ = ["check_parameters", "assigned_names"]

# The first line of the cell papermill injects (papermill.translators: ``comment("Parameters")``).
_INJECTED_HEADER = "# Parameters"
# Names papermill itself may inject (--inject-paths and friends), never the notebook's own parameters.
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


def check_parameters(history: list[str] | None = None) -> list[str]:
    """Raise ValueError if papermill injected a parameter that the notebook's parameters cell does not assign.

    history : the sources of the cells run so far, in order (IPython's ``In``, the default). The injected cell
        is the last one that starts with papermill's ``# Parameters`` header; the notebook's parameters cell is
        the one run just before it. Without an injected cell (an interactive run) there is nothing to check.

    Returns the names that were injected (all known). The error names each unknown parameter, the closest
    known name, and the full list of known ones.
    """
    if history is None:
        try:
            from IPython import get_ipython
        except ImportError:  # pragma: no cover - notebooks always have IPython
            return []
        shell = get_ipython()
        history = list(shell.user_ns.get("In", [])) if shell is not None else []
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
