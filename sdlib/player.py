"""Interactive figures for the static book: precomputed frames played by ``book/_static/sdbook.js``.

A notebook computes, ahead of time, the y values of every line for every combination of slider values it
depends on, and displays :func:`player_html` of that specification. In the built book, sdbook.js (served
from the build, no network, no kernel) draws the lines for the sliders' current values as an SVG plot. In
Jupyter the output shows a short note instead: notebook readers use the live ipywidgets version.
"""

from __future__ import annotations

import html
import itertools
import json
import math
from typing import Callable, Sequence


def Slider(name: str, label: str, values: Sequence[float], initial: float | None = None,
           fmt: str = "{:g}") -> dict:
    """A slider over precomputed ``values``; ``initial`` is one of them (the first by default)."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError(f"slider {name!r}: values must not be empty")
    index = 0 if initial is None else min(range(len(values)), key=lambda i: abs(values[i] - initial))
    return {"name": name, "label": label, "values": values, "labels": [fmt.format(v) for v in values],
            "initial": index}


def _round(value: float, digits: int) -> float | None:
    value = float(value)
    return float(f"{value:.{digits}g}") if math.isfinite(value) else None  # JSON has no NaN: sdbook.js skips null


def frames(function: Callable[..., Sequence[float]], sliders: Sequence[dict], depends: Sequence[str],
           digits: int = 4) -> list:
    """``function(**{name: value})`` for every combination of the ``depends`` sliders' values, in the
    order the player indexes them (the last name varies fastest), each rounded to ``digits`` digits."""
    by_name = {slider["name"]: slider for slider in sliders}
    unknown = [name for name in depends if name not in by_name]
    if unknown:
        raise ValueError(f"depends names unknown sliders {unknown}; sliders are {list(by_name)}")
    out = [[_round(v, digits) for v in function(**dict(zip(depends, combo)))]
           for combo in itertools.product(*(by_name[name]["values"] for name in depends))]
    return out if depends else out[0]


def player_html(spec: dict, note: str = "") -> "IPython.display.HTML":  # noqa: F821
    """The HTML the book's player turns into sliders and an SVG plot (see book/_static/sdbook.js).

    Glue it (``myst_nb.glue(name, player_html(...), display=False)``) and show it with a ``glue:figure``
    directive: the book then numbers and captions it like any figure.

    spec: ``sliders`` (from :func:`Slider`), ``series`` (each with ``y``: one list, or :func:`frames` over
    its ``depends``; optional ``x``, ``color``, ``width``, ``dash``, ``marker``, ``scatter``, ``label``),
    shared ``x``, ``xlim``, ``ylim``, ``ylog``, ``xticks``, ``xlabel``, ``ylabel``, ``legend`` (``"top-right"``,
    ``"top-left"`` or ``"bottom-left"``), ``title`` (``{name}`` is replaced by a
    slider's value), ``alt`` (the figure's text alternative), ``width`` and ``height`` in SVG units.
    """
    from IPython.display import HTML

    for key in ("sliders", "series", "xlim", "ylim", "xlabel", "ylabel", "alt"):
        if key not in spec:
            raise ValueError(f"player spec needs {key!r}")
    # "</" would end the <script> element early; JSON allows the escaped form.
    data = json.dumps(spec, separators=(",", ":"), allow_nan=False).replace("</", "<\\/")
    fallback = html.escape(note or "Interactive figure: open this page in the built book to move the sliders.")
    return HTML(f'<div class="sd-player"><p class="sd-player-fallback"><em>{fallback}</em></p>'
                f'<script type="application/json">{data}</script></div>')
